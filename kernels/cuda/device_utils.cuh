// Small device helpers shared by the CUDA kernels: warp and block
// reductions, launch geometry, and a deterministic two-pass sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common/gemm_staging.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/workspace.h"

namespace reformer::cuda {

constexpr int kThreads = 256;  // threads per block of the elementwise kernels

// Whether p is a multiple of `bytes` (a power of two): the test every vector
// path makes of its pointers before taking them as float2 / float4 / uint2.
inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Blocks for a grid-stride loop over n elements (at least 1, at most 65535 * 16).
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(b, int64_t(65535) * 16)));
}

// 16 bytes global -> shared, asynchronous; zero filled (nothing read) when !ok.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(ok ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8 x 8 matrices of 16-bit elements from shared memory: lane l gives
// the address of row l % 8 of matrix l / 8 (16 bytes) and receives r[m] =
// its 32-bit word of matrix m: row l / 4, word l % 4 (bf16 columns 2 (l % 4)
// and + 1, or one 32-bit element).
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// x rounded to the nearest bf16 value (ties to even), as a float.
__device__ __forceinline__ float bf16_value(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

// Two floats as one bf16x2 register (round to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c += a b (one m16n8k16 bf16 tile, fp32 accumulation; PTX ISA fragments:
// g = lane / 4, t = lane % 4, a = A[g][2t..], A[g+8][2t..], A[g][2t+8..],
// A[g+8][2t+8..]; b = B[2t..][g], B[2t+8..][g]; c = C[g][2t], C[g][2t+1],
// C[g+8][2t], C[g+8][2t+1]).
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. The order is fixed by the thread layout, so the
// result is deterministic. `sh` holds 32 values.
template <class T>
__device__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  T t = lane < nw ? sh[lane] : T(0);
  t = warp_sum(t);
  return t;
}

template <class T>
__device__ T block_max(T v, T* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  T t = lane < nw ? sh[lane] : sh[0];
  t = warp_max(t);
  return t;
}

// ---------------------------------------------------------------- two-pass sum
// sum_{i < n} f(i) in double, deterministically: pass 1 gives each of a fixed
// number of blocks (a function of n only) a fixed strided subset; pass 2 adds
// the block sums in a fixed tree order into *out (device).
constexpr int kReduceThreads = 256;
constexpr int kReduceMaxBlocks = 1024;

inline int reduce_blocks(int64_t n) {
  const int64_t b = (n + kReduceThreads * 8 - 1) / (kReduceThreads * 8);
  return int(std::max<int64_t>(1, std::min<int64_t>(b, kReduceMaxBlocks)));
}

template <class F>
__global__ void reduce_partial_kernel(double* partial, F f, int64_t n) {
  __shared__ double sh[32];
  double s = 0.0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) s += f(i);
  s = block_sum(s, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] = sum of partial[0..nb); then `post` (a functor taking the sum and
// a pointer to out) may transform it.
template <class Post>
__global__ void reduce_final_kernel(double* out, const double* partial, int nb, Post post) {
  __shared__ double sh[32];
  double s = 0.0;
  for (int i = threadIdx.x; i < nb; i += blockDim.x) s += partial[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) post(s, out);
}

struct StoreSum {
  __device__ void operator()(double s, double* out) const { out[0] = s; }
};

// Launches both passes; `scratch` holds reduce_blocks(n) doubles.
template <class F, class Post = StoreSum>
void reduce_sum(double* out, double* scratch, F f, int64_t n, cudaStream_t stream,
                Post post = Post()) {
  const int nb = reduce_blocks(n);
  reduce_partial_kernel<<<nb, kReduceThreads, 0, stream>>>(scratch, f, n);
  CUDA_CHECK_LAUNCH("reduce_partial_kernel");
  reduce_final_kernel<<<1, kReduceThreads, 0, stream>>>(out, scratch, nb, post);
  CUDA_CHECK_LAUNCH("reduce_final_kernel");
}

// ---------------------------------------------------------------- column sums
// dst[c] += sum_r f(r, c) for c < cols, r < rows, accumulated in Acc and
// deterministic: pass 1 sums row slabs of kColSlab rows per (slab, column)
// into partial [slabs, cols]; pass 2 adds the slabs in order.
constexpr int kColSlab = 256;

template <class Acc, class F>
__global__ void colsum_partial_kernel(Acc* partial, F f, int64_t rows, int64_t cols) {
  // block (32, 8): 32 columns, 8 row lanes; slab blockIdx.y.
  __shared__ Acc sh[8][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * kColSlab;
  const int64_t r1 = min(rows, r0 + kColSlab);
  Acc s = Acc(0);
  if (c < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) s += Acc(f(r, c));
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    Acc t = Acc(0);
    for (int k = 0; k < 8; ++k) t += sh[k][threadIdx.x];
    partial[int64_t(blockIdx.y) * cols + c] = t;
  }
}

// post(c, sum_s partial[s, c]). Block (32, kColFinalLanes): 32 columns;
// lane y adds the slabs s = y mod kColFinalLanes in order, then lane 0 adds
// the lanes' sums in order (deterministic; short chains of dependent loads).
constexpr int kColFinalLanes = 16;
template <class Acc, class Post>
__global__ void colsum_final_kernel(const Acc* partial, int64_t slabs, int64_t cols, Post post) {
  __shared__ Acc sh[kColFinalLanes][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  Acc t = Acc(0);
  if (c < cols)
    for (int64_t s = threadIdx.y; s < slabs; s += kColFinalLanes) t += partial[s * cols + c];
  sh[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  Acc u = Acc(0);
  for (int k = 0; k < kColFinalLanes; ++k) u += sh[k][threadIdx.x];
  post(c, u);
}
template <class Acc, class Post>
void launch_colsum_final(const Acc* partial, int64_t slabs, int64_t cols, Post post,
                         cudaStream_t stream) {
  colsum_final_kernel<Acc><<<unsigned((cols + 31) / 32), dim3(32, kColFinalLanes), 0, stream>>>(
      partial, slabs, cols, post);
  CUDA_CHECK_LAUNCH("colsum_final_kernel");
}

inline int64_t colsum_slabs(int64_t rows) { return std::max<int64_t>(1, (rows + kColSlab - 1) / kColSlab); }

// dst = bf16(src) (round to nearest even) for a dense [rows, cols] block
// (matmul.cu); issued on `stream`.
void round_bf16(__nv_bfloat16* dst, const float* src, int64_t rows, int64_t cols,
                cudaStream_t stream);
// The same for a [rows, cols] block with row strides ld_dst and ld_src.
void round_bf16_2d(__nv_bfloat16* dst, int64_t ld_dst, const float* src, int64_t ld_src,
                   int64_t rows, int64_t cols, cudaStream_t stream);

// out = bf16(LayerNorm(inp)) with mean and rstd, as layernorm_forward
// (layernorm.cu); false (nothing done) for rows wider than
// kLayernormBf16MaxC (kernels/common/gemm_staging.h).
bool layernorm_forward_bf16(__nv_bfloat16* out, float* mean, float* rstd, const float* inp,
                            const float* w, const float* b, int64_t N, int C, float eps,
                            cudaStream_t stream);

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The element (r, c) of a dense row-major matrix with `cols` columns, fp32
// or bf16, as a double (the terms of a bias gradient).
template <class E>
struct MatrixValue {
  const E* p;
  int64_t cols;
  __device__ double operator()(int64_t r, int64_t c) const {
    return double(to_float(p[r * cols + c]));
  }
};
// dst[c] += sum (a colsum's post step).
struct AddTo {
  float* dst;
  __device__ void operator()(int64_t c, double s) const { dst[c] += float(s); }
};

// scratch holds colsum_slabs(rows) * cols Acc values.
template <class Acc, class F, class Post>
void colsum(Acc* scratch, F f, Post post, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (cols <= 0) return;
  const int64_t slabs = colsum_slabs(rows);
  dim3 grid(unsigned((cols + 31) / 32), unsigned(slabs));
  colsum_partial_kernel<Acc><<<grid, dim3(32, 8), 0, stream>>>(scratch, f, rows, cols);
  CUDA_CHECK_LAUNCH("colsum_partial_kernel");
  launch_colsum_final(scratch, slabs, cols, post, stream);
}

}  // namespace reformer::cuda
