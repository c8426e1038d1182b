// Argument checks and constants shared by the CPU and CUDA LSH ops.
#pragma once

#include <cstdint>
#include <climits>
#include <string>

#include "kernels/errors.h"

namespace reformer {

// Bucket ids packed two to an int32 (lsh_pack_buckets): 16 bits each, so
// at most kMaxPackedBuckets buckets.
constexpr int kMaxPackedBuckets = 1 << 16;

// int32 elements holding n packed bucket ids.
inline int64_t lsh_packed_elems(int64_t n) { return (n + 1) / 2; }

// Throws ShapeError unless n_buckets is even and >= 2.
inline void check_lsh_buckets(int n_buckets) {
  if (n_buckets < 2 || n_buckets % 2 != 0)
    throw ShapeError("lsh: n_buckets must be even and >= 2, got " + std::to_string(n_buckets));
}

// Throws ShapeError unless bucket ids in [0, n_buckets) fit 16 bits.
inline void check_lsh_pack(int n_buckets, int64_t n) {
  check_lsh_buckets(n_buckets);
  if (n_buckets > kMaxPackedBuckets)
    throw ShapeError("lsh_pack_buckets: n_buckets = " + std::to_string(n_buckets) +
                     " exceeds the " + std::to_string(kMaxPackedBuckets) +
                     " that 16-bit ids hold");
  if (n < 0) throw ShapeError("lsh_pack_buckets: n must be >= 0, got " + std::to_string(n));
}

// Throws ShapeError unless factor0 == 0, or factor0 is an even factor >= 2 of
// n_buckets whose cofactor n_buckets / factor0 is even too.
inline void check_lsh_factor(int n_buckets, int factor0) {
  check_lsh_buckets(n_buckets);
  if (factor0 == 0) return;
  if (factor0 < 2 || factor0 % 2 != 0 || n_buckets % factor0 != 0 ||
      (n_buckets / factor0) % 2 != 0)
    throw ShapeError("lsh: factor0 = " + std::to_string(factor0) +
                     " must be 0 or an even factor of n_buckets = " + std::to_string(n_buckets) +
                     " with an even cofactor");
}

// lsh_decode_keys: throws ShapeError unless 0 <= pos < capacity, units >= 0
// and every unit's keys start at an int32 offset.
inline void check_lsh_decode(int units, int64_t capacity, int64_t pos) {
  if (pos < 0 || pos >= capacity)
    throw ShapeError("lsh_decode_keys: position " + std::to_string(pos) + " outside [0, " +
                     std::to_string(capacity) + ")");
  if (units < 0 || int64_t(units) * capacity > INT32_MAX)
    throw ShapeError("lsh_decode_keys: " + std::to_string(units) + " units of " +
                     std::to_string(capacity) + " positions do not fit int32 offsets");
}

}  // namespace reformer
