// LSH hashing by random rotations, and the per-round sort by (bucket, position)
// (CPU reference). Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

#include "kernels/cpu/matmul.h"

namespace reformer::cpu {

template <class T>
void lsh_rotations(T* R, uint64_t seed, uint64_t step, int layer, int head, int n_hashes, int dh,
                   int n_buckets, int factor0);
template <class T>
void lsh_hash(int32_t* buckets, const T* qk, int64_t ld, const T* R, int64_t L, int dh,
              int n_hashes, int n_buckets, int factor0, int heads = 1);
// The op interface's form (kernels/ops.h): qk an Operand in T (its rows
// of stride ld, the op's own).
template <class T>
void lsh_hash(int32_t* buckets, Operand<T> qk, int64_t ld, const T* R, int64_t L, int dh,
              int n_hashes, int n_buckets, int factor0, int heads) {
  if (qk.bf16) throw ShapeError("lsh_hash: bf16 inputs need a backend that keeps them");
  lsh_hash(buckets, qk.p, ld, R, L, dh, n_hashes, n_buckets, factor0, heads);
}
void lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes, int n_buckets);
void lsh_pack_buckets(int32_t* packed, const int32_t* buckets, int64_t n, int n_buckets);
void lsh_unpack_buckets(int32_t* buckets, const int32_t* packed, int64_t n);
void lsh_decode_keys(int32_t* keys, int32_t* sets, int32_t* history, const int32_t* buckets,
                     int64_t bucket_stride, int units, int64_t capacity, int64_t pos);

}  // namespace reformer::cpu
