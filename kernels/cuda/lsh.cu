// LSH hashing by random rotations and the per-round sort (CUDA twin of
// kernels/cpu/lsh.cpp).
//
//  - Rotations: element i of R is lsh_round(rng_normal(make_key(seed,
//    RngPurpose::rotations, step, layer, head), i)), the CPU's stream and
//    rounding (kernels/common/params.h); device logf/cosf may differ from
//    the host's by an ulp, which moves a rounded value by one bf16 ulp in
//    the rare case it lies at a rounding midpoint.
//  - Hash, head widths 32, 64 and 128: one kernel computes y = x @ R on
//    bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation; x and R
//    rounded to bf16 as lsh_round does, R transposed once per call), whose
//    products of bf16 values are exact, and takes the argmax below from the
//    accumulators, so the products never reach memory (hash_mma_kernel).
//    Other widths: x's rows rounded by lsh_round into the op workspace, then
//    y = x @ R for all rounds in one cuBLASLt GEMM per chunk of positions,
//    x [rows, dh] times Rcat [dh, n_hashes * cols] (R's rounds side by side,
//    rounded; cols = rotation_cols(n_buckets, factor0)), with TF32
//    tensor-core math accumulating in fp32 (CUBLAS_COMPUTE_32F_FAST_TF32,
//    exact for bf16 values; plain fp32 if cuBLASLt offers no TF32 kernel for
//    the alignment). Both sum the CPU's products in another order, so
//    buckets agree except at near-ties of a few fp32 ulps. The fp32 products
//    of one chunk (at most kHashScratchBytes, in
//    the op workspace) feed an argmax per (position, round) over
//    concat(y, -y) with the lowest index on ties, as on the CPU; with
//    factorized buckets one such argmax per factor's block, combined as
//    b0 + factor0 * b1. Blocks of at most kThreadArgmaxCols columns (every
//    factorized case up to 65536 buckets) take one thread per (position,
//    round) visiting the columns in order; wider ones one warp.
//  - Sort: one stable CUB radix sort of the (round, bucket) keys, 16 or 32
//    bits, carrying the positions (in increasing order, so ties stay by
//    position) straight into the permutation. The host
//    does not wait for it: a bucket id outside [0, n_buckets) (never produced
//    by lsh_hash) raises kBucketOutOfRange in CudaOps' device error word, and
//    the next host synchronisation point throws ShapeError (kernels/ops.h).
//  - Decode keys: one block per (head, round) scans the bucket history of
//    the positions fed so far and compacts the matches in position order
//    (a CUB block scan per tile), so decoding needs no host round trip.
// All four are bitwise reproducible on one GPU model and toolkit.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <string>

#include "kernels/errors.h"
#include "kernels/common/lsh_checks.h"
#include "kernels/common/params.h"
#include "kernels/common/philox.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr int kArgmaxThreads = 256;       // 8 warps: 8 (position, round) pairs per block
constexpr int kThreadArgmaxCols = 128;    // widest block argmaxed by one thread
// Bound on the fp32 products x @ Rcat held at once: positions are hashed in
// chunks of at most this many bytes of [chunk, n_hashes * cols].
constexpr int64_t kHashScratchBytes = int64_t(256) << 20;

int bits_for(int64_t n) {  // bits to hold values 0..n-1 (at least 1)
  int b = 1;
  while ((int64_t(1) << b) < n) ++b;
  return b;
}

__global__ void rotations_kernel(float* R, RngKey key, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    R[i] = lsh_round(rng_normal(key, uint64_t(i)));
}

// Rcat[d, r * cols + j] = lsh_round(R[r, d, j]): the rounds side by side,
// rows ldy apart, so one GEMM x @ Rcat computes every round.
__global__ void concat_rounds_kernel(float* Rcat, int64_t ldy, const float* R, int dh, int cols,
                                     int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % cols, rd = e / cols;
    const int64_t d = rd % dh, r = rd / dh;
    Rcat[d * ldy + r * cols + j] = lsh_round(R[e]);
  }
}

// A value of qk as the hash reads it: an fp32 value rounded (lsh_round), a
// bf16 value (Operand's bf16 rows, rounded so already) as it is; and a
// pair of them (columns d, d + 1, d even) as the bf16 pair of an mma
// fragment, the lower column in the low half.
__device__ __forceinline__ float hash_value(float x) { return lsh_round(x); }
__device__ __forceinline__ float hash_value(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ uint32_t hash_pair(const float* r, int d) {
  return pack_bf16(r[d], r[d + 1]);
}
__device__ __forceinline__ uint32_t hash_pair(const __nv_bfloat16* r, int d) {
  return *reinterpret_cast<const uint32_t*>(r + d);
}

// xr[i, d] = hash_value(x[i, d]) for rows rows of dh values (row strides ldr, ld).
template <class X>
__global__ void round_rows_kernel(float* xr, int64_t ldr, const X* x, int64_t ld, int dh,
                                  int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / dh, d = e % dh;
    xr[i * ldr + d] = hash_value(x[i * ld + d]);
  }
}

// Running argmax / argmin of one lane's values, visited in increasing k,
// from none(). Strict comparisons keep the lowest k.
struct Extremes {
  float hi, lo;
  int khi, klo;
  // Nothing seen: every value (but NaN and -+inf) replaces these.
  __device__ static Extremes none() { return {-INFINITY, INFINITY, INT_MAX, INT_MAX}; }
  __device__ void see(float v, int k) {
    if (v > hi) {
      hi = v;
      khi = k;
    }
    if (v < lo) {
      lo = v;
      klo = k;
    }
  }
  // Butterfly over the lanes l ^ off, off = lanes / 2 .. 1: every lane of
  // each group of `lanes` ends with the group's extremes, ties to the lowest k.
  __device__ void reduce(int lanes) {
    for (int off = lanes / 2; off > 0; off >>= 1) {
      const float h = __shfl_xor_sync(0xffffffffu, hi, off);
      const float l = __shfl_xor_sync(0xffffffffu, lo, off);
      const int kh = __shfl_xor_sync(0xffffffffu, khi, off);
      const int kl = __shfl_xor_sync(0xffffffffu, klo, off);
      if (h > hi || (h == hi && kh < khi)) {
        hi = h;
        khi = kh;
      }
      if (l < lo || (l == lo && kl < klo)) {
        lo = l;
        klo = kl;
      }
    }
  }
  // The argmax over concat(y, -y) of a block of n columns: the first
  // position of max y if max y >= -min y, else n + the first position of
  // min y; 0 where no value could be ordered (all NaN or infinite).
  __device__ int signed_argmax(int n) const {
    if (-lo > hi) return klo == INT_MAX ? 0 : n + klo;
    return khi == INT_MAX ? 0 : khi;
  }
};

// One warp's argmax over concat(y[0, n), -y[0, n)), lowest index on ties as
// on the CPU: the first position of max y if max y >= -min y, else n + the
// first position of min y. Every lane returns the result. kVec4: y is 16-byte
// aligned and n % 4 == 0.
template <bool kVec4>
__device__ __forceinline__ int warp_signed_argmax(const float* y, int n, int lane) {
  Extremes e = Extremes::none();
  if constexpr (kVec4) {
    const float4* y4 = reinterpret_cast<const float4*>(y);
#pragma unroll 4
    for (int q = lane; q < n / 4; q += 32) {
      const float4 v = __ldcs(y4 + q);  // read once: do not keep in cache
      e.see(v.x, 4 * q);
      e.see(v.y, 4 * q + 1);
      e.see(v.z, 4 * q + 2);
      e.see(v.w, 4 * q + 3);
    }
  } else {
    for (int k = lane; k < n; k += 32) e.see(__ldcs(y + k), k);
  }
  e.reduce(32);
  return e.signed_argmax(n);
}

// One thread's argmax over concat(y[0, n), -y[0, n)), the same as
// warp_signed_argmax: the columns visited in increasing k with strict
// comparisons keep the lowest index on ties. kVec4: y is 16-byte aligned and
// n % 4 == 0.
template <bool kVec4>
__device__ __forceinline__ int thread_signed_argmax(const float* y, int n) {
  Extremes e = Extremes::none();
  if constexpr (kVec4) {
    const float4* y4 = reinterpret_cast<const float4*>(y);
#pragma unroll 4
    for (int q = 0; q < n / 4; ++q) {
      const float4 v = __ldcs(y4 + q);
      e.see(v.x, 4 * q);
      e.see(v.y, 4 * q + 1);
      e.see(v.z, 4 * q + 2);
      e.see(v.w, 4 * q + 3);
    }
  } else {
    for (int k = 0; k < n; ++k) e.see(__ldcs(y + k), k);
  }
  return e.signed_argmax(n);
}

// As argmax_kernel below with one thread per (position, round), the rounds
// of a position in adjacent threads (adjacent column blocks of one row).
template <bool kVec4>
__global__ void argmax_thread_kernel(int32_t* buckets, const float* Y, int64_t ldy, int64_t rows,
                                     int64_t c0, int64_t L, int n_hashes, int cols, int h0) {
  const int64_t seg = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (seg >= rows * n_hashes) return;
  const int64_t i = seg / n_hashes;
  const int r = int(seg - i * n_hashes);
  const float* y = Y + i * ldy + int64_t(r) * cols;
  int b = thread_signed_argmax<kVec4>(y, h0);
  if (h0 < cols) b += 2 * h0 * thread_signed_argmax<kVec4>(y + h0, cols - h0);
  buckets[int64_t(r) * L + c0 + i] = b;
}

// buckets[r, c0 + i] for y = Y[i, r * cols .. + cols): the argmax over
// concat(y0, -y0) for the first block y0 = y[0, h0); when h0 < cols
// (factorized), plus 2 * h0 (= factor0) times the argmax over the second
// block y[h0, cols). One warp per (position, round).
template <bool kVec4>
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(int32_t* buckets, const float* Y, int64_t ldy, int64_t rows, int64_t c0,
                  int64_t L, int n_hashes, int cols, int h0) {
  const int64_t seg = int64_t(blockIdx.x) * (kArgmaxThreads / 32) + threadIdx.x / 32;
  if (seg >= rows * n_hashes) return;
  const int lane = int(threadIdx.x % 32);
  const int64_t i = seg / n_hashes;
  const int r = int(seg % n_hashes);
  const float* y = Y + i * ldy + int64_t(r) * cols;
  int b = warp_signed_argmax<kVec4>(y, h0, lane);
  if (h0 < cols) b += 2 * h0 * warp_signed_argmax<kVec4>(y + h0, cols - h0, lane);
  if (lane == 0) buckets[int64_t(r) * L + c0 + i] = b;
}

// ---- the hash product and its argmax in one kernel (bf16 tensor cores)

// Each warp hashes 32 positions (two m16 tiles), so every B fragment read
// from shared memory feeds four products instead of two: half the ldmatrix
// reads per product (a 512-byte ldmatrix.x4 takes 4 cycles of an SM's
// shared-memory bandwidth). Measured: the enwik8 recipe's 64K step 197.4 ->
// 192.3 ms against 16 positions per warp (bench/RESULTS.md).
constexpr int kHashWarps = 4;
constexpr int kHashM = 2;                            // m16 tiles per warp
constexpr int kHashRows = 16 * kHashM * kHashWarps;  // positions per block
constexpr int kHashTile = 64;                        // rotation columns staged at once
constexpr int kHashGroup = 4;                        // n8 tiles accumulated side by side
constexpr int kHashBlocksPerSm = 3;                  // register budget: 168 a thread

// Shared row stride (bf16) of a staged tile whose rows hold dh values: 16
// bytes of padding put the 8 rows an ldmatrix reads in distinct banks.
constexpr int hash_stride(int dh) { return dh + 8; }
// Shared bytes of hash_mma_kernel: two staged tiles.
constexpr size_t hash_smem_bytes(int dh) {
  return sizeof(__nv_bfloat16) * 2 * size_t(kHashTile) * size_t(hash_stride(dh));
}

// Rt[r, c, d] = bf16(R[r, d, c]) (lsh_round's rounding): each rotation
// column's dh entries contiguous, as hash_mma_kernel stages them.
__global__ void rotations_bf16_kernel(__nv_bfloat16* Rt, const float* R, int dh, int cols,
                                      int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % cols, rd = e / cols;  // e = (r dh + d) cols + c: reads coalesce
    const int64_t d = rd % dh, r = rd / dh;
    Rt[(r * cols + c) * dh + d] = __float2bfloat16_rn(R[e]);
  }
}

// buckets[r, i] for every round r and the kHashRows positions of this block,
// as argmax_kernel computes them from Y = x R, without writing Y: each warp
// holds its 32 rows of x [L, kDh] (row stride ld) rounded to bf16 as A
// fragments (lsh_round's rounding); the block stages Rt [n_hashes, cols,
// kDh] (rotations_bf16_kernel) kHashTile columns at a time (cp.async, double
// buffered), whose B fragments ldmatrix reads two k-steps at a time; the
// products of bf16 values are exact and sum in fp32. Every thread keeps the
// running extremes of its four rows' columns, visited in increasing order,
// and the four lanes of a quad, which share rows, are merged at the end of a
// round, ties to the lowest column. kFactorized: columns [0, h0) and
// [h0, cols) are two blocks, bucket = b0 + 2 h0 b1; else h0 == cols. X:
// float, or bf16 rows (hash_pair: the same fragments for the same values).
template <int kDh, bool kFactorized, class X>
__global__ void __launch_bounds__(kHashWarps * 32, kHashBlocksPerSm)
    hash_mma_kernel(int32_t* buckets, const X* x, int64_t ld, const __nv_bfloat16* Rt,
                    int64_t L, int n_hashes, int cols, int h0) {
  extern __shared__ float4 hash_smem[];
  __nv_bfloat16* tiles_smem = reinterpret_cast<__nv_bfloat16*>(hash_smem);  // [2][kHashTile][stride]
  constexpr int kStride = hash_stride(kDh), kBlocks = kFactorized ? 2 : 1;
  constexpr int kSteps = kDh / 16;  // k-steps of 16
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  // This thread's rows: row[m][h] = tile m's row g (h = 0) or g + 8 (h = 1).
  int64_t row[kHashM][2];
  // Head blockIdx.y of a call's heads (kernels/ops.h): its columns of x,
  // its rotations and its rounds' buckets.
  x += int64_t(blockIdx.y) * kDh;
  Rt += int64_t(blockIdx.y) * n_hashes * cols * kDh;
  buckets += int64_t(blockIdx.y) * n_hashes * L;
#pragma unroll
  for (int m = 0; m < kHashM; ++m) {
    row[m][0] = int64_t(blockIdx.x) * kHashRows + (warp * kHashM + m) * 16 + g;
    row[m][1] = row[m][0] + 8;
  }

  uint32_t a[kHashM][kSteps][4];
#pragma unroll
  for (int m = 0; m < kHashM; ++m) {
    const X* xa = x + row[m][0] * ld;
    const X* xb = x + row[m][1] * ld;
    const bool oka = row[m][0] < L, okb = row[m][1] < L;
    auto pair = [](const X* r, bool ok, int d) { return ok ? hash_pair(r, d) : 0u; };
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      a[m][ks][0] = pair(xa, oka, ks * 16 + 2 * t);
      a[m][ks][1] = pair(xb, okb, ks * 16 + 2 * t);
      a[m][ks][2] = pair(xa, oka, ks * 16 + 2 * t + 8);
      a[m][ks][3] = pair(xb, okb, ks * 16 + 2 * t + 8);
    }
  }

  const int tiles = (cols + kHashTile - 1) / kHashTile;  // per round
  const int total = n_hashes * tiles;
  // Copies tile i (round i / tiles, columns from (i % tiles) * kHashTile)
  // into buffer i % 2; columns past cols are zero.
  auto stage = [&](int i) {
    const int c0 = (i % tiles) * kHashTile;
    const __nv_bfloat16* src = Rt + (int64_t(i / tiles) * cols + c0) * kDh;
    __nv_bfloat16* dst = tiles_smem + (i % 2) * kHashTile * kStride;
    for (int e = int(threadIdx.x); e < kHashTile * (kDh / 8); e += kHashWarps * 32) {
      const int c = e / (kDh / 8), q = 8 * (e % (kDh / 8));
      const bool ok = c0 + c < cols;
      cp_async16(dst + c * kStride + q, ok ? src + int64_t(c) * kDh + q : src, ok);
    }
    cp_async_commit();
  };

  Extremes e[kHashM][2][kBlocks];  // [tile][row g / g + 8][column block]
  auto reset = [&] {
#pragma unroll
    for (int m = 0; m < kHashM; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int k = 0; k < kBlocks; ++k) e[m][h][k] = Extremes::none();
  };
  reset();
  stage(0);
  for (int i = 0; i < total; ++i) {
    if (i + 1 < total) {
      stage(i + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // Lane l addresses row l % 8 of its n8 tile, k 8 (l / 8) on: the
    // matrices b0, b1 of k-step 2 kk and of 2 kk + 1.
    const __nv_bfloat16* B = tiles_smem + (i % 2) * kHashTile * kStride + (lane % 8) * kStride +
                             (lane / 8) * 8;
    const int c0 = (i % tiles) * kHashTile;
#pragma unroll
    for (int n0 = 0; n0 < kHashTile / 8; n0 += kHashGroup) {
      float acc[kHashM][kHashGroup][4] = {};
#pragma unroll
      for (int kk = 0; kk < kSteps / 2; ++kk) {
#pragma unroll
        for (int j = 0; j < kHashGroup; ++j) {
          uint32_t b[4];
          ldsm_x4(b, B + (n0 + j) * 8 * kStride + kk * 32);
#pragma unroll
          for (int m = 0; m < kHashM; ++m) {
            mma_bf16(acc[m][j], a[m][2 * kk], b[0], b[1]);
            mma_bf16(acc[m][j], a[m][2 * kk + 1], b[2], b[3]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kHashGroup; ++j) {
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          const int c = c0 + (n0 + j) * 8 + 2 * t + w;
          if (c >= cols) continue;
#pragma unroll
          for (int m = 0; m < kHashM; ++m) {
            if (kFactorized && c >= h0) {  // constant register indices, no local memory
              e[m][0][kBlocks - 1].see(acc[m][j][w], c - h0);
              e[m][1][kBlocks - 1].see(acc[m][j][2 + w], c - h0);
            } else {
              e[m][0][0].see(acc[m][j][w], c);
              e[m][1][0].see(acc[m][j][2 + w], c);
            }
          }
        }
      }
    }
    if (i % tiles == tiles - 1) {  // round i / tiles complete: merge the quad, write
      const int64_t r = i / tiles;
#pragma unroll
      for (int m = 0; m < kHashM; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          int b = 0;
#pragma unroll
          for (int k = 0; k < kBlocks; ++k) {
            e[m][h][k].reduce(4);
            b += (k == 0 ? 1 : 2 * h0) * e[m][h][k].signed_argmax(k == 0 ? h0 : cols - h0);
          }
          if (t == 0 && row[m][h] < L) buckets[r * L + row[m][h]] = b;
        }
      reset();
    }
    __syncthreads();  // buffer i % 2 read by every warp before stage(i + 2) refills it
  }
}

template <int kDh, bool kFactorized, class X>
void launch_hash_mma(int32_t* buckets, const X* x, int64_t ld, const __nv_bfloat16* Rt,
                     int64_t L, int n_hashes, int cols, int h0, int heads, cudaStream_t stream) {
  auto* kernel = hash_mma_kernel<kDh, kFactorized, X>;
  const size_t smem = hash_smem_bytes(kDh);
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned((L + kHashRows - 1) / kHashRows), unsigned(heads));
  kernel<<<grid, kHashWarps * 32, smem, stream>>>(buckets, x, ld, Rt, L, n_hashes, cols, h0);
  CUDA_CHECK_LAUNCH("hash_mma_kernel");
}

// The fused path for head width dh, or nullptr where it does not apply.
template <class X>
using HashMmaLauncher = void (*)(int32_t*, const X*, int64_t, const __nv_bfloat16*, int64_t, int,
                                 int, int, int, cudaStream_t);
template <class X>
HashMmaLauncher<X> hash_mma_launcher(int dh, bool factorized) {
  switch (dh) {
    case 32: return factorized ? launch_hash_mma<32, true, X> : launch_hash_mma<32, false, X>;
    case 64: return factorized ? launch_hash_mma<64, true, X> : launch_hash_mma<64, false, X>;
    case 128: return factorized ? launch_hash_mma<128, true, X> : launch_hash_mma<128, false, X>;
    default: return nullptr;
  }
}

// bad: CudaOps' device error word; an out-of-range bucket raises
// kBucketOutOfRange there and is sorted as bucket 0. keys[idx] = (round,
// bucket) of element idx = r L + i, pos[idx] = i.
template <class Key>
__global__ void make_keys_kernel(Key* keys, int32_t* pos, int32_t* bad, const int32_t* buckets,
                                 int64_t L, int64_t n, int n_buckets, int bits_b) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / L, i = idx % L;
    int32_t b = buckets[idx];
    if (b < 0 || b >= n_buckets) {
      *bad = kBucketOutOfRange;
      b = 0;
    }
    keys[idx] = Key((uint32_t(r) << bits_b) | uint32_t(b));
    pos[idx] = int32_t(i);
  }
}

// Every round's positions by (bucket, position): a stable radix sort of the
// (round, bucket) keys (round major: each round stays in its own L slots)
// carrying the positions, which come in increasing order, so ties keep it.
// bits_r + bits_b bits instead of the position's too: half the passes of a
// (round, bucket, position) key sort at 64K tokens, and the sort writes the
// permutation itself.
template <class Key>
void sort_rounds(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes, int n_buckets,
                 int bits_b, int key_bits, Workspace& ws, int32_t* error_word,
                 cudaStream_t stream) {
  const int64_t n = int64_t(n_hashes) * L;
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, static_cast<const Key*>(nullptr), static_cast<Key*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n, 0, key_bits,
      stream));
  Carve carve;
  const size_t off_in = carve.reserve(sizeof(Key) * size_t(n));
  const size_t off_out = carve.reserve(sizeof(Key) * size_t(n));
  const size_t off_pos = carve.reserve(sizeof(int32_t) * size_t(n));
  const size_t off_temp = carve.reserve(temp_bytes);
  void* base = ws.get(carve.total());
  Key* keys_in = Carve::at<Key>(base, off_in);
  Key* keys_out = Carve::at<Key>(base, off_out);
  int32_t* pos = Carve::at<int32_t>(base, off_pos);
  void* temp = Carve::at<char>(base, off_temp);

  make_keys_kernel<Key><<<grid_for(n), kThreads, 0, stream>>>(keys_in, pos, error_word, buckets,
                                                              L, n, n_buckets, bits_b);
  CUDA_CHECK_LAUNCH("make_keys_kernel");
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, pos, perm, n, 0,
                                             key_bits, stream));
}

// lsh_decode_keys: one block per unit. Each thread takes kDecodeKeysPer
// consecutive positions of a tile, counts its matches, and an exclusive block
// scan of the counts gives its first slot, so keys stay in position order.
constexpr int kDecodeKeysThreads = 512;
constexpr int kDecodeKeysPer = 4;

__global__ void __launch_bounds__(kDecodeKeysThreads)
    decode_keys_kernel(int32_t* keys, int32_t* sets, int32_t* history, const int32_t* buckets,
                       int64_t bucket_stride, int64_t capacity, int64_t pos) {
  using Scan = cub::BlockScan<int, kDecodeKeysThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int tile_total;
  const int u = blockIdx.x;
  int32_t* h = history + int64_t(u) * capacity;
  int32_t* k = keys + int64_t(u) * capacity;
  const int32_t b = buckets[u * bucket_stride];
  int32_t n = 0;  // keys written by the tiles before this one
  constexpr int64_t kTile = int64_t(kDecodeKeysThreads) * kDecodeKeysPer;
  for (int64_t t0 = 0; t0 <= pos; t0 += kTile) {
    const int64_t j0 = t0 + int64_t(threadIdx.x) * kDecodeKeysPer;
    bool hit[kDecodeKeysPer];
    int count = 0;
#pragma unroll
    for (int e = 0; e < kDecodeKeysPer; ++e) {
      const int64_t j = j0 + e;
      hit[e] = j < pos ? h[j] == b : j == pos;
      count += hit[e];
    }
    int slot = 0;
    Scan(scan).ExclusiveSum(count, slot);
    if (threadIdx.x == kDecodeKeysThreads - 1) tile_total = slot + count;
#pragma unroll
    for (int e = 0; e < kDecodeKeysPer; ++e)
      if (hit[e]) k[n + slot++] = int32_t(j0 + e);
    __syncthreads();  // tile_total written; the scan storage free again
    n += tile_total;
    __syncthreads();  // every thread has read tile_total
  }
  if (threadIdx.x == 0) {
    h[pos] = b;
    sets[2 * u] = int32_t(int64_t(u) * capacity);
    sets[2 * u + 1] = n;
  }
}

// Bucket ids as 16-bit values (lsh_pack_buckets), one thread per id; an id
// outside [0, n_buckets) raises kBucketOutOfRange in bad and is packed as 0.
__global__ void pack_buckets_kernel(uint16_t* packed, int32_t* bad, const int32_t* buckets,
                                    int64_t n, int n_buckets) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    int32_t b = buckets[k];
    if (b < 0 || b >= n_buckets) {
      *bad = kBucketOutOfRange;
      b = 0;
    }
    packed[k] = uint16_t(b);
  }
}

__global__ void unpack_buckets_kernel(int32_t* buckets, const uint16_t* packed, int64_t n) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x)
    buckets[k] = int32_t(packed[k]);
}

}  // namespace
}  // namespace cuda

void CudaOps::lsh_rotations(float* R, uint64_t seed, uint64_t step, int layer, int head,
                            int n_hashes, int dh, int n_buckets, int factor0) {
  check_lsh_factor(n_buckets, factor0);
  const RngKey key =
      make_key(seed, RngPurpose::rotations, step, uint64_t(layer), uint64_t(head));
  const int64_t n = int64_t(n_hashes) * dh * rotation_cols(n_buckets, factor0);
  if (n <= 0) return;
  cuda::rotations_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(R, key, n);
  CUDA_CHECK_LAUNCH("rotations_kernel");
}

// qk in fp32, or bf16 rows (Operand; ld then counts bf16 values): the same
// buckets for the same values.
void CudaOps::lsh_hash(int32_t* buckets, Operand<float> qk, int64_t ld, const float* R, int64_t L,
                       int dh, int n_hashes, int n_buckets, int factor0, int heads) {
  check_lsh_factor(n_buckets, factor0);
  if (L <= 0 || n_hashes <= 0 || heads <= 0) return;
  if (dh <= 0 || ld < int64_t(heads) * dh)
    throw ShapeError("lsh_hash: need dh > 0 and ld >= heads * dh");
  const int cols = rotation_cols(n_buckets, factor0);
  const int h0 = factor0 == 0 ? cols : factor0 / 2;  // columns of the first block
  const int64_t nR = int64_t(n_hashes) * dh * cols;  // one head's rotations
  using bf16 = __nv_bfloat16;
  const bf16* qk16 = reinterpret_cast<const bf16*>(qk.p);
  if (qk.bf16 && (ld % 2 != 0 || dh % 2 != 0 || !cuda::aligned(qk.p, 4)))
    throw ShapeError("lsh_hash: bf16 rows need an even ld and dh and 4-byte alignment");
  auto fused = [&](auto launch, const auto* x) {
    // Every head in one launch: blocks of positions times heads fill the
    // device where one head's positions leave it partly idle.
    const int64_t n = heads * nR;
    auto* Rt = static_cast<bf16*>(ws_.get(sizeof(bf16) * size_t(n)));
    cuda::rotations_bf16_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(Rt, R, dh,
                                                                                  cols, n);
    CUDA_CHECK_LAUNCH("rotations_bf16_kernel");
    launch(buckets, x, ld, Rt, L, n_hashes, cols, h0, heads, stream_);
  };
  if (qk.bf16) {
    if (auto launch = cuda::hash_mma_launcher<bf16>(dh, h0 < cols)) return fused(launch, qk16);
  } else {
    if (auto launch = cuda::hash_mma_launcher<float>(dh, h0 < cols)) return fused(launch, qk.p);
  }
  if (heads > 1) {  // head by head
    for (int j = 0; j < heads; ++j) {
      const Operand<float> x = qk.bf16 ? Operand<float>{qk.p + int64_t(j) * dh / 2, true}
                                       : Operand<float>{qk.p + int64_t(j) * dh};
      lsh_hash(buckets + int64_t(j) * n_hashes * L, x, ld, R + j * nR, L, dh, n_hashes,
               n_buckets, factor0, 1);
    }
    return;
  }
  const int64_t m = int64_t(n_hashes) * cols;         // columns of Rcat and of the products
  const int64_t ldy = (m + 3) / 4 * 4;         // rows 16-byte aligned
  int64_t chunk = std::max<int64_t>(1, cuda::kHashScratchBytes / (ldy * int64_t(sizeof(float))));
  if (chunk >= 256) chunk = chunk / 256 * 256;
  chunk = std::min(chunk, L);

  const int64_t ldx = (int64_t(dh) + 3) / 4 * 4;  // rounded rows, 16-byte aligned

  cuda::Carve carve;
  const size_t off_r = carve.reserve(sizeof(float) * size_t(dh) * size_t(ldy));
  const size_t off_y = carve.reserve(sizeof(float) * size_t(chunk) * size_t(ldy));
  const size_t off_x = carve.reserve(sizeof(float) * size_t(chunk) * size_t(ldx));
  void* base = ws_.get(carve.total());
  float* Rcat = cuda::Carve::at<float>(base, off_r);
  float* Y = cuda::Carve::at<float>(base, off_y);
  float* X = cuda::Carve::at<float>(base, off_x);

  cuda::concat_rounds_kernel<<<cuda::grid_for(nR), cuda::kThreads, 0, stream_>>>(Rcat, ldy, R, dh,
                                                                                cols, nR);
  CUDA_CHECK_LAUNCH("concat_rounds_kernel");

  for (int64_t c0 = 0; c0 < L; c0 += chunk) {
    const int64_t rows = std::min(chunk, L - c0);
    const unsigned blocks = cuda::grid_for(rows * dh);
    if (qk.bf16)
      cuda::round_rows_kernel<<<blocks, cuda::kThreads, 0, stream_>>>(X, ldx, qk16 + c0 * ld, ld,
                                                                       dh, rows * dh);
    else
      cuda::round_rows_kernel<<<blocks, cuda::kThreads, 0, stream_>>>(X, ldx, qk.p + c0 * ld, ld,
                                                                       dh, rows * dh);
    CUDA_CHECK_LAUNCH("round_rows_kernel");
    // Column-major view: Y^T [m, rows] (ldy) = Rcat^T [m, dh] (ldy) x^T [dh, rows] (ldx),
    // in TF32 tensor-core math (exact products of the bf16 values).
    gemm(false, false, m, rows, int64_t(dh), Rcat, ldy, X, ldx, 0.0f, Y, ldy,
         GemmOperands::fp32_tf32);

    // float4 loads need each block's start (rounds cols apart) 16-byte aligned;
    // one thread per (position, round) for short blocks, else one warp.
    const bool vec4 = cols % 4 == 0 && h0 % 4 == 0;
    const bool per_thread =
        h0 <= cuda::kThreadArgmaxCols && cols - h0 <= cuda::kThreadArgmaxCols;
    const int per_block = per_thread ? cuda::kArgmaxThreads : cuda::kArgmaxThreads / 32;
    auto* kernel = per_thread ? (vec4 ? cuda::argmax_thread_kernel<true>
                                      : cuda::argmax_thread_kernel<false>)
                              : (vec4 ? cuda::argmax_kernel<true> : cuda::argmax_kernel<false>);
    kernel<<<unsigned((rows * n_hashes + per_block - 1) / per_block), cuda::kArgmaxThreads, 0,
             stream_>>>(buckets, Y, ldy, rows, c0, L, n_hashes, cols, h0);
    CUDA_CHECK_LAUNCH("argmax_kernel");
  }
}

void CudaOps::lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes,
                       int n_buckets) {
  check_lsh_buckets(n_buckets);
  if (L <= 0 || n_hashes <= 0) return;
  if (L > INT32_MAX) throw ShapeError("lsh_sort: positions do not fit 32 bits");
  const int bits_b = cuda::bits_for(n_buckets), bits_r = cuda::bits_for(n_hashes);
  const int key_bits = bits_r + bits_b;
  if (key_bits > 32) throw ShapeError("lsh_sort: (round, bucket) does not fit 32 bits");
  if (key_bits <= 16)
    cuda::sort_rounds<uint16_t>(perm, buckets, L, n_hashes, n_buckets, bits_b, key_bits, ws_,
                                device_error_dev_, stream_);
  else
    cuda::sort_rounds<uint32_t>(perm, buckets, L, n_hashes, n_buckets, bits_b, key_bits, ws_,
                                device_error_dev_, stream_);
}

// Packed ids are uint16 in memory order: id k in bits 16 (k % 2) .. of
// int32 k / 2 on a little-endian device, as the CPU packs them.
void CudaOps::lsh_pack_buckets(int32_t* packed, const int32_t* buckets, int64_t n,
                               int n_buckets) {
  check_lsh_pack(n_buckets, n);
  if (n == 0) return;
  if (n % 2 != 0) CUDA_CHECK(cudaMemsetAsync(packed + n / 2, 0, sizeof(int32_t), stream_));
  cuda::pack_buckets_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
      reinterpret_cast<uint16_t*>(packed), device_error_dev_, buckets, n, n_buckets);
  CUDA_CHECK_LAUNCH("pack_buckets_kernel");
}

void CudaOps::lsh_unpack_buckets(int32_t* buckets, const int32_t* packed, int64_t n) {
  if (n <= 0) return;
  cuda::unpack_buckets_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
      buckets, reinterpret_cast<const uint16_t*>(packed), n);
  CUDA_CHECK_LAUNCH("unpack_buckets_kernel");
}

void CudaOps::lsh_decode_keys(int32_t* keys, int32_t* sets, int32_t* history,
                              const int32_t* buckets, int64_t bucket_stride, int units,
                              int64_t capacity, int64_t pos) {
  check_lsh_decode(units, capacity, pos);
  if (units == 0) return;
  cuda::decode_keys_kernel<<<units, cuda::kDecodeKeysThreads, 0, stream_>>>(
      keys, sets, history, buckets, bucket_stride, capacity, pos);
  CUDA_CHECK_LAUNCH("decode_keys_kernel");
}

}  // namespace reformer
