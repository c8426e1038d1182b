// LayerNorm over the last dimension (CUDA twin of kernels/cpu/layernorm.cpp).
// One warp per row, two-pass statistics in fp32 (biased variance); the
// forward holds a row of up to 2048 values in registers (one read of the
// input). The weight and bias gradients are deterministic two-pass column
// sums in double. Bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row

__global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp,
                                         const float* w, const float* b, int64_t N, int C,
                                         float eps) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const float* x = inp + n * C;
  float s = 0.0f;
  for (int c = lane; c < C; c += 32) s += x[c];
  const float m = warp_sum(s) / float(C);
  float v = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float d = x[c] - m;
    v += d * d;
  }
  const float var = warp_sum(v) / float(C);
  const float r = 1.0f / sqrtf(var + eps);
  float* o = out + n * C;
  for (int c = lane; c < C; c += 32) o[c] = (x[c] - m) * r * w[c] + b[c];
  if (lane == 0) {
    mean[n] = m;
    rstd[n] = r;
  }
}

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

// As layernorm_forward_kernel with the row in registers: kPer values per
// lane (C <= 32 * kPer); the output in fp32 or bf16.
template <int kPer, class OutT>
__global__ void layernorm_forward_reg_kernel(OutT* out, float* mean, float* rstd,
                                             const float* inp, const float* w, const float* b,
                                             int64_t N, int C, float eps) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const float* x = inp + n * C;
  float v[kPer];
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    v[k] = c < C ? x[c] : 0.0f;
    s += v[k];
  }
  const float m = warp_sum(s) / float(C);
  float q = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    const float d = c < C ? v[k] - m : 0.0f;
    q += d * d;
  }
  const float var = warp_sum(q) / float(C);
  const float r = 1.0f / sqrtf(var + eps);
  OutT* o = out + n * C;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    if (c < C) store_out(o + c, (v[k] - m) * r * w[c] + b[c]);
  }
  if (lane == 0) {
    mean[n] = m;
    rstd[n] = r;
  }
}

// dinp += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w.
__global__ void layernorm_dinp_kernel(float* dinp, const float* dout, const float* inp,
                                      const float* w, const float* mean, const float* rstd,
                                      int64_t N, int C) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const float* x = inp + n * C;
  const float* g = dout + n * C;
  const float m = mean[n], r = rstd[n];
  float sg = 0.0f, sgx = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float gw = g[c] * w[c];
    sg += gw;
    sgx += gw * (x[c] - m) * r;
  }
  const float g_mean = warp_sum(sg) / float(C);
  const float gx_mean = warp_sum(sgx) / float(C);
  float* d = dinp + n * C;
  for (int c = lane; c < C; c += 32) {
    const float xhat = (x[c] - m) * r;
    d[c] += r * (g[c] * w[c] - g_mean - xhat * gx_mean);
  }
}

struct DwTerm {  // dout * xhat
  const float *dout, *inp, *mean, *rstd;
  int64_t C;
  __device__ double operator()(int64_t r, int64_t c) const {
    return double(dout[r * C + c]) * ((double(inp[r * C + c]) - double(mean[r])) * double(rstd[r]));
  }
};

}  // namespace

bool layernorm_forward_bf16(__nv_bfloat16* out, float* mean, float* rstd, const float* inp,
                            const float* w, const float* b, int64_t N, int C, float eps,
                            cudaStream_t stream) {
  if (C > 2048) return false;
  if (N <= 0 || C <= 0) return true;
  const unsigned blocks = unsigned((N + kRowsPerBlock - 1) / kRowsPerBlock);
  const unsigned threads = 32 * kRowsPerBlock;
  if (C <= 256)
    layernorm_forward_reg_kernel<8, __nv_bfloat16>
        <<<blocks, threads, 0, stream>>>(out, mean, rstd, inp, w, b, N, C, eps);
  else if (C <= 1024)
    layernorm_forward_reg_kernel<32, __nv_bfloat16>
        <<<blocks, threads, 0, stream>>>(out, mean, rstd, inp, w, b, N, C, eps);
  else
    layernorm_forward_reg_kernel<64, __nv_bfloat16>
        <<<blocks, threads, 0, stream>>>(out, mean, rstd, inp, w, b, N, C, eps);
  CUDA_CHECK_LAUNCH("layernorm_forward_reg_kernel (bf16)");
  return true;
}

}  // namespace cuda

void CudaOps::layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                const float* w, const float* b, int64_t N, int C, float eps) {
  if (N <= 0 || C <= 0) return;
  const unsigned blocks = unsigned((N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock);
  const unsigned threads = 32 * cuda::kRowsPerBlock;
  if (C <= 256) {
    cuda::layernorm_forward_reg_kernel<8, float>
        <<<blocks, threads, 0, stream_>>>(out, mean, rstd, inp, w, b, N, C, eps);
  } else if (C <= 1024) {
    cuda::layernorm_forward_reg_kernel<32, float>
        <<<blocks, threads, 0, stream_>>>(out, mean, rstd, inp, w, b, N, C, eps);
  } else if (C <= 2048) {
    cuda::layernorm_forward_reg_kernel<64, float>
        <<<blocks, threads, 0, stream_>>>(out, mean, rstd, inp, w, b, N, C, eps);
  } else {
    cuda::layernorm_forward_kernel<<<blocks, threads, 0, stream_>>>(out, mean, rstd, inp, w, b,
                                                                     N, C, eps);
  }
  CUDA_CHECK_LAUNCH("layernorm_forward_kernel");
}

void CudaOps::layernorm_backward(float* dinp, float* dw, float* db, const float* dout,
                                 const float* inp, const float* w, const float* mean,
                                 const float* rstd, int64_t N, int C) {
  if (N <= 0 || C <= 0) return;
  if (dinp) {
    const unsigned blocks = unsigned((N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock);
    cuda::layernorm_dinp_kernel<<<blocks, 32 * cuda::kRowsPerBlock, 0, stream_>>>(
        dinp, dout, inp, w, mean, rstd, N, C);
    CUDA_CHECK_LAUNCH("layernorm_dinp_kernel");
  }
  if (dw || db) {
    double* scratch =
        static_cast<double*>(ws_.get(sizeof(double) * size_t(cuda::colsum_slabs(N) * C)));
    if (dw)
      cuda::colsum<double>(scratch, cuda::DwTerm{dout, inp, mean, rstd, C}, cuda::AddTo{dw}, N, C,
                           stream_);
    if (db)
      cuda::colsum<double>(scratch, cuda::MatrixValue<float>{dout, C}, cuda::AddTo{db}, N, C,
                           stream_);
  }
}

}  // namespace reformer
