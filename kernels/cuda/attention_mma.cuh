// Tensor-core pieces of the bf16 attention kernels (attention_mma_forward.cu,
// attention_mma_backward.cu): the m16n8k16 bf16 mma with fp32 accumulation,
// fragment loads from shared memory and the gathered bf16 tile loads.
// Internal to those files (unnamed namespace, as attention_common.cuh).
//
// Fragment layout of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for
// lane = 4 * gr + t4 (gr = lane / 4 in 0..7, t4 = lane % 4):
//  - A (16 x 16, row major), four 32-bit registers of two bf16 each (the
//    lower column in the low half): a0 = A[gr][2t4, 2t4+1],
//    a1 = A[gr+8][2t4, 2t4+1], a2 = A[gr][2t4+8, +9], a3 = A[gr+8][2t4+8, +9];
//  - B (16 x 8, k x n): b0 = B[2t4, 2t4+1][gr], b1 = B[2t4+8, +9][gr];
//  - C (16 x 8, fp32): c0, c1 = C[gr][2t4, 2t4+1], c2, c3 = C[gr+8][2t4, 2t4+1].
// Every product here is C = A B with A stored row major [m][k] and B stored
// as B^T row major [n][k] in shared memory, so both fragments are pairs of
// adjacent bf16 (one 32-bit load each). An accumulator tile pair
// (C tiles 2kk and 2kk+1 of one 16-row strip) is the A fragment of k-step kk
// of the next product (pack_a).
// Shared rows are padded by 8 bf16 (16 bytes): with row strides of
// 36, 68 or 20 words the eight rows gr of a fragment load fall in distinct
// banks.
#pragma once

#include <cuda_bf16.h>

#include "kernels/cuda/attention_common.cuh"

namespace reformer {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kMmaWarps = 4;                 // warps per block
constexpr int kMmaBlock = 32 * kMmaWarps;    // threads per block
constexpr int kMmaRows = 16 * kMmaWarps;     // rows per block: 16 per warp

// Row stride (bf16 elements) of a shared tile whose rows hold n values.
constexpr int mma_stride(int n) { return n + 8; }

// Two floats as one bf16x2 register (round to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c += a b (one m16n8k16 tile).
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragment of the 16 x 16 block at (row0, col0) of a row-major tile s
// (stride st).
__device__ __forceinline__ void load_a(uint32_t* a, const bf16* s, int st, int row0, int col0,
                                       int lane) {
  const bf16* p = s + (row0 + (lane >> 2)) * st + col0 + 2 * (lane & 3);
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * st);
  a[2] = ld32(p + 8);
  a[3] = ld32(p + 8 * st + 8);
}

// B fragment (k0 .. k0+15) x (n0 .. n0+7) of B where s holds B^T row major
// (element (k, n) at s[n * st + k]).
__device__ __forceinline__ void load_b(uint32_t* b, const bf16* s, int st, int n0, int k0,
                                       int lane) {
  const bf16* p = s + (n0 + (lane >> 2)) * st + k0 + 2 * (lane & 3);
  b[0] = ld32(p);
  b[1] = ld32(p + 8);
}

// The A fragment of k-step kk from fp32 accumulator tiles c[2kk], c[2kk+1]
// (C layout, columns 16kk .. 16kk+15 of a 16-row strip), rounded to bf16.
__device__ __forceinline__ void pack_a(uint32_t* a, const float* c0, const float* c1) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// c[nt] (16 x 8*NT strip) += A(16 x DH, rows row0.. of sa) B, B^T = rows
// n0.. of sb; both tiles row major with DH columns (k).
template <int DH, int NT>
__device__ __forceinline__ void mma_strip_nt(float (*c)[4], const bf16* sa, int sta, int row0,
                                             const bf16* sb, int stb, int lane) {
#pragma unroll
  for (int kk = 0; kk < DH; kk += 16) {
    uint32_t a[4];
    load_a(a, sa, sta, row0, kk, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b[2];
      load_b(b, sb, stb, nt * 8, kk, lane);
      mma_bf16(c[nt], a, b[0], b[1]);
    }
  }
}

// acc[ot] (16 x DH strip) += P B where P (16 x 16*KS) comes as fp32
// accumulator tiles p[0 .. 2*KS) and B^T (DH x 16*KS) is row major in sbt.
template <int DH, int KS>
__device__ __forceinline__ void mma_strip_pv(float (*acc)[4], float (*p)[4],
                                             const bf16* sbt, int stb, int lane) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[4];
    pack_a(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int ot = 0; ot < DH / 8; ++ot) {
      uint32_t b[2];
      load_b(b, sbt, stb, ot * 8, kk * 16, lane);
      mma_bf16(acc[ot], a, b[0], b[1]);
    }
  }
}

// Gathers ROWS rows into a bf16 tile: dst[row * st + d] = src[pos[row] * lds + d]
// for d < DH, zero where pos[row] < 0 or d >= dh.
template <int ROWS, int DH>
__device__ __forceinline__ void load_tile(bf16* dst, int st, const int* pos, const float* src,
                                          int64_t lds, int dh, int tid) {
  for (int e = tid; e < ROWS * DH / 2; e += kMmaBlock) {
    const int row = e / (DH / 2), d = 2 * (e % (DH / 2));
    const int p = pos[row];
    float x = 0.0f, y = 0.0f;
    if (p >= 0) {
      const float* s = src + int64_t(p) * lds + d;
      if (d < dh) x = s[0];
      if (d + 1 < dh) y = s[1];
    }
    *reinterpret_cast<uint32_t*>(dst + row * st + d) = pack_bf16(x, y);
  }
}

// The same rows transposed: dst[d * st + row] (DH rows of ROWS values).
template <int ROWS, int DH>
__device__ __forceinline__ void load_tile_t(bf16* dst, int st, const int* pos, const float* src,
                                            int64_t lds, int dh, int tid) {
  for (int e = tid; e < ROWS / 2 * DH; e += kMmaBlock) {
    const int d = e % DH, row = 2 * (e / DH);
    const int p0 = pos[row], p1 = pos[row + 1];
    float x = 0.0f, y = 0.0f;
    if (d < dh) {
      if (p0 >= 0) x = src[int64_t(p0) * lds + d];
      if (p1 >= 0) y = src[int64_t(p1) * lds + d];
    }
    *reinterpret_cast<uint32_t*>(dst + d * st + row) = pack_bf16(x, y);
  }
}

// Max and sum over the four lanes of a quad (the lanes sharing a C row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Prologue of every mma kernel: this block's round r, chunk c and row tile t,
// the round's permutation (returned; null when FULL), the tile's positions in
// spos[kMmaRows] and (chunked) the chunk list of sign `sign` (chunk_list) in
// swin / *s_n. Ends with __syncthreads().
template <bool FULL>
__device__ __forceinline__ const int32_t* mma_block_start(const AttnGeom& g, int sign, int* spos,
                                                          int* swin, int* s_n, int64_t* r,
                                                          int64_t* c, int64_t* t) {
  *r = *c = *t = 0;
  if (FULL)
    *t = blockIdx.x;
  else
    decode_block(g, r, c, t);
  const int32_t* pr = FULL ? nullptr : g.perm + *r * g.L;
  const int tid = threadIdx.x;
  if (tid < kMmaRows) spos[tid] = tile_position<FULL, kMmaRows>(g, pr, *c, *t, tid);
  if (!FULL && tid == 0) *s_n = chunk_list(swin, *c, sign, g);
  __syncthreads();
  return pr;
}

// The geometry of a call with g.row_tiles counting kMmaRows-row tiles (so
// decode_block and attn_blocks agree with the mma kernels).
inline AttnGeom mma_geom(const AttentionParams& p, const int32_t* perm, bool full) {
  AttnGeom g = make_geom(p, perm, full);
  g.row_tiles = ((full ? p.L : int64_t(p.chunk)) + kMmaRows - 1) / kMmaRows;
  return g;
}

}  // namespace
}  // namespace cuda
}  // namespace reformer
