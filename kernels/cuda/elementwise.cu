// Elementwise and copy ops (CUDA twin of kernels/cpu/elementwise.cpp).
// Every output element is computed by one thread from its own inputs, so
// results are bitwise reproducible; sum_squares is a deterministic two-pass
// reduction in double. dropout draws the same counter-RNG stream as the CPU
// (same key, same element index), so masks are identical.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/common/philox.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

// ---------------------------------------------------------------- kernels

__global__ void fill_kernel(float* x, float v, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = v;
}

// out = a + sign * b (add: sign 1, sub: sign -1).
__global__ void add_kernel(float* out, const float* a, const float* b, float sign, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = sign > 0.0f ? a[i] + b[i] : a[i] - b[i];
}

// The same, four elements per thread (16-byte aligned buffers).
__global__ void add_vec4_kernel(float4* out, const float4* a, const float4* b, float sign,
                                int64_t n4) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 x = a[i], y = b[i];
    out[i] = sign > 0.0f ? make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w)
                         : make_float4(x.x - y.x, x.y - y.y, x.z - y.z, x.w - y.w);
  }
}

// Rounded multiply then add (no FMA contraction), as on the host: bitwise
// equal to the CPU.
__global__ void axpy_kernel(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __fadd_rn(y[i], __fmul_rn(a, x[i]));
}

// dst[i] = bf16(src[i]) (stash), dst[i] = float(src[i]) (unstash).
// kQuads (the fp32 side 16-byte aligned, the bf16 side 8-byte aligned):
// values 4 q .. 4 q + 3 by one float4 and one 8-byte access, the n % 4 last
// one by one; the same element for element (value i at bf16 i).
template <bool kQuads>
__global__ void stash_kernel(__nv_bfloat16* dst, const float* src, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (kQuads) {
    for (; i < n / 4; i += stride) {
      const float4 x = reinterpret_cast<const float4*>(src)[i];
      uint2 u;
      *reinterpret_cast<__nv_bfloat162*>(&u.x) = __floats2bfloat162_rn(x.x, x.y);
      *reinterpret_cast<__nv_bfloat162*>(&u.y) = __floats2bfloat162_rn(x.z, x.w);
      reinterpret_cast<uint2*>(dst)[i] = u;
    }
    i = n / 4 * 4 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  }
  for (; i < n; i += stride) dst[i] = __float2bfloat16_rn(src[i]);
}

template <bool kQuads>
__global__ void unstash_kernel(float* dst, const __nv_bfloat16* src, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (kQuads) {
    for (; i < n / 4; i += stride) {
      const uint2 u = reinterpret_cast<const uint2*>(src)[i];
      const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
      const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
      reinterpret_cast<float4*>(dst)[i] = make_float4(a.x, a.y, b.x, b.y);
    }
    i = n / 4 * 4 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  }
  for (; i < n; i += stride) dst[i] = __bfloat162float(src[i]);
}

// The same over [rows, cols] tiles: dst[r * ld_dst + c] = src[r * ld_src +
// c] converted (stash_2d: fp32 to bf16, ld_dst = cols; unstash_2d: bf16 to
// fp32, ld_src = cols). One warp per row, lanes over its columns; kPairs
// (cols and both strides even, rows aligned to two elements): two columns
// a lane, one float2 and one bf16 pair.
constexpr int kStashRows = kThreads / 32;  // rows per block

__device__ __forceinline__ void convert_one(__nv_bfloat16* d, const float* x) {
  *d = __float2bfloat16_rn(*x);
}
__device__ __forceinline__ void convert_one(float* d, const __nv_bfloat16* x) {
  *d = __bfloat162float(*x);
}
__device__ __forceinline__ void convert_pair(__nv_bfloat16* d, const float* x) {
  const float2 v = *reinterpret_cast<const float2*>(x);
  *reinterpret_cast<__nv_bfloat162*>(d) = __floats2bfloat162_rn(v.x, v.y);
}
__device__ __forceinline__ void convert_pair(float* d, const __nv_bfloat16* x) {
  *reinterpret_cast<float2*>(d) = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x));
}

template <bool kPairs, class Dst, class Src>
__global__ void convert_2d_kernel(Dst* dst, int64_t ld_dst, const Src* src, int64_t ld_src,
                                  int64_t rows, int64_t cols) {
  constexpr int kW = kPairs ? 2 : 1;
  const int lane = threadIdx.x & 31;
  for (int64_t r = int64_t(blockIdx.x) * kStashRows + (threadIdx.x >> 5); r < rows;
       r += int64_t(gridDim.x) * kStashRows) {
    const Src* x = src + r * ld_src;
    Dst* d = dst + r * ld_dst;
    for (int64_t c = kW * lane; c < cols; c += 32 * kW) {
      if constexpr (kPairs)
        convert_pair(d + c, x + c);
      else
        convert_one(d + c, x + c);
    }
  }
}

template <class Dst, class Src>
void launch_convert_2d(Dst* dst, int64_t ld_dst, const Src* src, int64_t ld_src, int64_t rows,
                       int64_t cols, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  const unsigned blocks =
      unsigned(std::min<int64_t>((rows + kStashRows - 1) / kStashRows, int64_t(1) << 20));
  if (cols % 2 == 0 && ld_dst % 2 == 0 && ld_src % 2 == 0 && aligned(dst, 2 * sizeof(Dst)) &&
      aligned(src, 2 * sizeof(Src)))
    convert_2d_kernel<true><<<blocks, kThreads, 0, s>>>(dst, ld_dst, src, ld_src, rows, cols);
  else
    convert_2d_kernel<false><<<blocks, kThreads, 0, s>>>(dst, ld_dst, src, ld_src, rows, cols);
  CUDA_CHECK_LAUNCH("convert_2d_kernel");
}

__global__ void scale_kernel(float* x, float s, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] *= s;
}

// dst[r, c] (+)= src[r, c]; one thread per element of a [rows, cols] tile.
__global__ void copy_2d_kernel(float* dst, int64_t ld_dst, const float* src, int64_t ld_src,
                               int64_t rows, int64_t cols, bool accumulate) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    if (accumulate)
      dst[r * ld_dst + c] += src[r * ld_src + c];
    else
      dst[r * ld_dst + c] = src[r * ld_src + c];
  }
}

// Sums and zeros of the element types gather_rows moves (V: float, or
// float4 for four columns at once).
__device__ __forceinline__ float vec_add(float a, float b) { return a + b; }
__device__ __forceinline__ float4 vec_add(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
template <class V>
__device__ __forceinline__ V vec_zero() {
  if constexpr (sizeof(V) == sizeof(float)) return 0.0f;
  else return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

// dst[r, c] (+)= src[r, c] for rows of at least 32 V (float, or float4
// where columns, strides and pointers allow): blocks stride over the rows,
// threads over a row's columns, no division per element (copy_2d_kernel
// divides its flat index by cols: [64K, 1024] took 337 us there, 128 us
// here, 4.0 TB/s; bench/RESULTS.md).
template <class V>
__global__ void copy_rows_2d_kernel(V* dst, int64_t ld_dst, const V* src, int64_t ld_src,
                                    int64_t rows, int cols, bool accumulate) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    V* d = dst + r * ld_dst;
    const V* x = src + r * ld_src;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
      d[c] = accumulate ? vec_add(d[c], x[c]) : x[c];
  }
}

// dst[r, c] (+)= src[idx[r], c], a row with idx[r] < 0 zeroed (kept when
// accumulating); one V per thread (columns and strides in V units; float4
// where cols and strides are multiples of 4 and rows 16-byte aligned).
template <class V>
__global__ void gather_rows_kernel(V* dst, int64_t ld_dst, const V* src, int64_t ld_src,
                                   const int32_t* idx, int64_t rows, int64_t cols,
                                   bool accumulate) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const int32_t k = idx[r];
    V* d = dst + r * ld_dst + c;
    if (k < 0) {
      if (!accumulate) *d = vec_zero<V>();
    } else {
      const V v = src[int64_t(k) * ld_src + c];
      *d = accumulate ? vec_add(*d, v) : v;
    }
  }
}

// out[i] (+)= alpha * dropout(x)[i] (accumulating onto res[i], which is
// out unless a residual elsewhere is given), one thread per Philox block of the
// stream: block b serves global elements 4b .. 4b + 3, i = 4b + w - offset
// (kernels/common/philox.h, dropout_uniform). Rounded multiply and add, as
// on the host. kVec4: offset % 4 == 0, n % 4 == 0 and 16-byte aligned
// buffers, so a block's four elements are one float4.
template <bool kVec4>
__global__ void dropout_kernel(float* out, const float* x, int64_t n, float p, RngKey key,
                               int64_t offset, float alpha, bool accumulate, const float* res) {
  const float keep = 1.0f - p;
  const int64_t b0 = offset >> 2, nb = ((offset + n + 3) >> 2) - b0;
  const float* base = res ? res : out;
  auto drop = [&](float v, uint32_t r) {
    return u32_to_unit(r) >= p ? __fmul_rn(alpha, v / keep) : 0.0f;
  };
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < nb;
       t += int64_t(gridDim.x) * blockDim.x) {
    const Philox4 r = rng_block(key, uint64_t(b0 + t));
    const int64_t i0 = 4 * (b0 + t) - offset;
    if constexpr (kVec4) {
      const float4 v = *reinterpret_cast<const float4*>(x + i0);
      float4 d = make_float4(drop(v.x, r.v[0]), drop(v.y, r.v[1]), drop(v.z, r.v[2]),
                             drop(v.w, r.v[3]));
      float4* o = reinterpret_cast<float4*>(out + i0);
      if (accumulate) {
        const float4 a = *reinterpret_cast<const float4*>(base + i0);
        d = make_float4(__fadd_rn(a.x, d.x), __fadd_rn(a.y, d.y), __fadd_rn(a.z, d.z),
                        __fadd_rn(a.w, d.w));
      }
      *o = d;
    } else {
      for (int w = 0; w < 4; ++w) {
        const int64_t i = i0 + w;
        if (i < 0 || i >= n) continue;
        const float d = drop(x[i], r.v[w]);
        out[i] = accumulate ? __fadd_rn(base[i], d) : d;
      }
    }
  }
}

struct SquareOf {
  const float* x;
  __device__ double operator()(int64_t i) const { return double(x[i]) * double(x[i]); }
};

// ---------------------------------------------------------------- launchers

void launch_fill(float* x, float v, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  fill_kernel<<<grid_for(n), kThreads, 0, s>>>(x, v, n);
  CUDA_CHECK_LAUNCH("fill_kernel");
}

void launch_add(float* out, const float* a, const float* b, float sign, int64_t n,
                cudaStream_t s) {
  if (n <= 0) return;
  if (n % 4 == 0 && aligned(out, 16) && aligned(a, 16) && aligned(b, 16)) {
    add_vec4_kernel<<<grid_for(n / 4), kThreads, 0, s>>>(
        reinterpret_cast<float4*>(out), reinterpret_cast<const float4*>(a),
        reinterpret_cast<const float4*>(b), sign, n / 4);
  } else {
    add_kernel<<<grid_for(n), kThreads, 0, s>>>(out, a, b, sign, n);
  }
  CUDA_CHECK_LAUNCH("add_kernel");
}

void launch_copy_2d(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                    int64_t cols, bool accumulate, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  const bool vec4 = cols % 4 == 0 && ld_dst % 4 == 0 && ld_src % 4 == 0 && aligned(dst, 16) &&
                    aligned(src, 16);
  const int64_t vcols = vec4 ? cols / 4 : cols;
  if (vcols >= 32 && vcols <= INT32_MAX) {
    const dim3 grid(unsigned(std::min<int64_t>((vcols + kThreads - 1) / kThreads, 65535)),
                    unsigned(std::min<int64_t>(rows, 65535)));
    if (vec4)
      copy_rows_2d_kernel<<<grid, kThreads, 0, s>>>(
          reinterpret_cast<float4*>(dst), ld_dst / 4, reinterpret_cast<const float4*>(src),
          ld_src / 4, rows, int(vcols), accumulate);
    else
      copy_rows_2d_kernel<<<grid, kThreads, 0, s>>>(dst, ld_dst, src, ld_src, rows, int(vcols),
                                                    accumulate);
    CUDA_CHECK_LAUNCH("copy_rows_2d_kernel");
    return;
  }
  copy_2d_kernel<<<grid_for(rows * cols), kThreads, 0, s>>>(dst, ld_dst, src, ld_src, rows, cols,
                                                            accumulate);
  CUDA_CHECK_LAUNCH("copy_2d_kernel");
}

}  // namespace
}  // namespace cuda

// ---------------------------------------------------------------- op entries

void CudaOps::fill(float* x, float value, int64_t n) {
  // Zeros (all fills of gradients) by the copy engine's memset, at memory bandwidth.
  if (value == 0.0f && !std::signbit(value) && n > 0) {
    CUDA_CHECK(cudaMemsetAsync(x, 0, sizeof(float) * size_t(n), stream_));
    return;
  }
  cuda::launch_fill(x, value, n, stream_);
}

// The stash holds bf16 values, two in each of stash_elems(n) floats.
void CudaOps::stash(float* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  auto* d = reinterpret_cast<__nv_bfloat16*>(dst);
  if (cuda::aligned(src, 16) && cuda::aligned(dst, 8))
    cuda::stash_kernel<true>
        <<<cuda::grid_for((n + 3) / 4), cuda::kThreads, 0, stream_>>>(d, src, n);
  else
    cuda::stash_kernel<false><<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(d, src, n);
  CUDA_CHECK_LAUNCH("stash_kernel");
}

void CudaOps::unstash(float* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  const auto* s = reinterpret_cast<const __nv_bfloat16*>(src);
  if (cuda::aligned(dst, 16) && cuda::aligned(src, 8))
    cuda::unstash_kernel<true>
        <<<cuda::grid_for((n + 3) / 4), cuda::kThreads, 0, stream_>>>(dst, s, n);
  else
    cuda::unstash_kernel<false><<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(dst, s, n);
  CUDA_CHECK_LAUNCH("unstash_kernel");
}

// Rows in the stash's layout: the bf16 values of a contiguous [rows, cols].
void CudaOps::stash_2d(float* dst, const float* src, int64_t ld_src, int64_t rows, int64_t cols) {
  cuda::launch_convert_2d(reinterpret_cast<__nv_bfloat16*>(dst), cols, src, ld_src, rows, cols,
                          stream_);
}

void CudaOps::unstash_2d(float* dst, int64_t ld_dst, const float* src, int64_t rows,
                         int64_t cols) {
  cuda::launch_convert_2d(dst, ld_dst, reinterpret_cast<const __nv_bfloat16*>(src), cols, rows,
                          cols, stream_);
}

void CudaOps::copy(float* dst, const float* src, int64_t n) {
  if (n <= 0 || dst == src) return;
  const size_t bytes = sizeof(float) * size_t(n);
  const bool overlap = dst < src + n && src < dst + n;
  if (overlap) {  // memmove semantics: stage through the workspace
    void* tmp = ws_.get(bytes);
    CUDA_CHECK(cudaMemcpyAsync(tmp, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(dst, tmp, bytes, cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
}

void CudaOps::gather_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src,
                          const int32_t* idx, int64_t rows, int64_t cols, bool accumulate) {
  if (rows <= 0 || cols <= 0) return;
  if (cols % 4 == 0 && ld_dst % 4 == 0 && ld_src % 4 == 0 && cuda::aligned(dst, 16) &&
      cuda::aligned(src, 16)) {
    cuda::gather_rows_kernel<float4><<<cuda::grid_for(rows * cols / 4), cuda::kThreads, 0,
                                       stream_>>>(
        reinterpret_cast<float4*>(dst), ld_dst / 4, reinterpret_cast<const float4*>(src),
        ld_src / 4, idx, rows, cols / 4, accumulate);
  } else {
    cuda::gather_rows_kernel<float><<<cuda::grid_for(rows * cols), cuda::kThreads, 0, stream_>>>(
        dst, ld_dst, src, ld_src, idx, rows, cols, accumulate);
  }
  CUDA_CHECK_LAUNCH("gather_rows_kernel");
}

void CudaOps::add(float* out, const float* a, const float* b, int64_t n) {
  cuda::launch_add(out, a, b, 1.0f, n, stream_);
}

void CudaOps::sub(float* out, const float* a, const float* b, int64_t n) {
  cuda::launch_add(out, a, b, -1.0f, n, stream_);
}

void CudaOps::axpy(float* y, float a, const float* x, int64_t n) {
  if (n <= 0) return;
  cuda::axpy_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(y, a, x, n);
  CUDA_CHECK_LAUNCH("axpy_kernel");
}

void CudaOps::scale(float* x, float s, int64_t n) {
  if (n <= 0) return;
  cuda::scale_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(x, s, n);
  CUDA_CHECK_LAUNCH("scale_kernel");
}

// A host synchronisation point (kernels/ops.h): returns after all earlier work.
double CudaOps::sum_squares(const float* x, int64_t n) {
  if (n <= 0) {
    sync_and_check();
    return 0.0;
  }
  double* scratch = static_cast<double*>(ws_.get(sizeof(double) * (cuda::kReduceMaxBlocks + 1)));
  cuda::reduce_sum(scratch + cuda::kReduceMaxBlocks, scratch, cuda::SquareOf{x}, n, stream_);
  CUDA_CHECK(cudaMemcpyAsync(host_scalar_, scratch + cuda::kReduceMaxBlocks, sizeof(double),
                             cudaMemcpyDeviceToHost, stream_));
  sync_and_check();
  return *host_scalar_;
}

void CudaOps::copy_2d(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                      int64_t cols) {
  cuda::launch_copy_2d(dst, ld_dst, src, ld_src, rows, cols, false, stream_);
}

void CudaOps::add_2d(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                     int64_t cols) {
  cuda::launch_copy_2d(dst, ld_dst, src, ld_src, rows, cols, true, stream_);
}

void CudaOps::dropout(float* out, const float* x, int64_t n, float p, uint64_t seed,
                      uint64_t step, int layer, int site, int64_t offset, float alpha,
                      bool accumulate, const float* res) {
  if (n <= 0) return;
  const RngKey key = make_key(seed, RngPurpose::dropout, step, uint64_t(layer), uint64_t(site));
  const int64_t blocks = ((offset + n + 3) >> 2) - (offset >> 2);
  if (!accumulate) res = nullptr;
  auto* kernel = offset % 4 == 0 && n % 4 == 0 && cuda::aligned(out, 16) &&
                         cuda::aligned(x, 16) && (!res || cuda::aligned(res, 16))
                     ? cuda::dropout_kernel<true>
                     : cuda::dropout_kernel<false>;
  kernel<<<cuda::grid_for(blocks), cuda::kThreads, 0, stream_>>>(out, x, n, p, key, offset, alpha,
                                                                 accumulate, res);
  CUDA_CHECK_LAUNCH("dropout_kernel");
}

}  // namespace reformer
