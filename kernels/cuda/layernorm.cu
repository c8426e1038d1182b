// LayerNorm over the last dimension (CUDA twin of kernels/cpu/layernorm.cpp).
// One warp per row, two-pass statistics in fp32 (biased variance); the
// forward holds a row of up to 2048 values in registers (one read of the
// input). The weight and bias gradients are deterministic column sums in
// double: for rows of at most 1024 (a multiple of 4) the backward is one
// pass over the rows that also writes each slab's sums, otherwise a dinp
// pass and two column-sum passes. Bitwise reproducible.
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

// The whole backward in one pass, for C % 4 == 0 and C <= 4 * 256: thread t
// owns columns 4t .. 4t+3 of every row of its block's slab of rows, two
// rows at a time. Per row the block sums g w and g w xhat over the columns
// (warp shuffles, then the warps' sums in warp order through shared memory,
// one barrier per two rows), adds dinp's share, and adds dout xhat and dout
// into its columns' double sums, written at the end as the slab's partial
// [2][slabs][C] for colsum_final_kernel. Few registers, so many blocks per
// SM keep rows in flight; deterministic.
constexpr int64_t kLnMaxSlabs = 1024;
inline int64_t ln_slab_rows(int64_t N) {
  const int64_t per = (N + kLnMaxSlabs - 1) / kLnMaxSlabs;
  return std::max<int64_t>(32, (per + 1) / 2 * 2);
}

__global__ void layernorm_backward_rows_kernel(float* dinp, double* partial, const float* dout,
                                               const float* inp, const float* w,
                                               const float* mean, const float* rstd, int64_t N,
                                               int C, int64_t slab) {
  __shared__ float red[2][4][32];  // [barrier parity][row 0 sg, sgx, row 1 sg, sgx][warp]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int c0 = 4 * threadIdx.x;
  const bool on = c0 < C;
  const int64_t r0 = int64_t(blockIdx.x) * slab, r1 = min(N, r0 + slab);
  float wv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (on)
#pragma unroll
    for (int j = 0; j < 4; ++j) wv[j] = w[c0 + j];
  double dws[4] = {0.0, 0.0, 0.0, 0.0}, dbs[4] = {0.0, 0.0, 0.0, 0.0};
  int par = 0;
  for (int64_t n = r0; n < r1; n += 2, par ^= 1) {
    const int rows = n + 1 < r1 ? 2 : 1;
    float x[2][4] = {}, g[2][4] = {}, xh[2][4] = {}, m[2] = {}, r[2] = {}, sums[4] = {};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (i >= rows) break;
      m[i] = mean[n + i];
      r[i] = rstd[n + i];
      if (on) {
        const float4 xv = *reinterpret_cast<const float4*>(inp + (n + i) * C + c0);
        const float4 gv = *reinterpret_cast<const float4*>(dout + (n + i) * C + c0);
        x[i][0] = xv.x; x[i][1] = xv.y; x[i][2] = xv.z; x[i][3] = xv.w;
        g[i][0] = gv.x; g[i][1] = gv.y; g[i][2] = gv.z; g[i][3] = gv.w;
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (i >= rows || !on) break;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        xh[i][j] = (x[i][j] - m[i]) * r[i];
        const float gw = g[i][j] * wv[j];
        sums[2 * i] += gw;
        sums[2 * i + 1] += gw * xh[i][j];
        dws[j] += double(g[i][j]) * ((double(x[i][j]) - double(m[i])) * double(r[i]));
        dbs[j] += double(g[i][j]);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float v = warp_sum(sums[k]);
      if (lane == 0) red[par][k][warp] = v;
    }
    __syncthreads();
    if (!dinp || !on) continue;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (i >= rows) break;
      float tg = 0.0f, tgx = 0.0f;
      for (int k = 0; k < nw; ++k) {
        tg += red[par][2 * i][k];
        tgx += red[par][2 * i + 1][k];
      }
      const float g_mean = tg / float(C), gx_mean = tgx / float(C);
      float4* d = reinterpret_cast<float4*>(dinp + (n + i) * C + c0);
      float4 v = *d;
      v.x += r[i] * (g[i][0] * wv[0] - g_mean - xh[i][0] * gx_mean);
      v.y += r[i] * (g[i][1] * wv[1] - g_mean - xh[i][1] * gx_mean);
      v.z += r[i] * (g[i][2] * wv[2] - g_mean - xh[i][2] * gx_mean);
      v.w += r[i] * (g[i][3] * wv[3] - g_mean - xh[i][3] * gx_mean);
      *d = v;
    }
  }
  if (!on) return;
  const int64_t slabs = gridDim.x;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    partial[int64_t(blockIdx.x) * C + c0 + j] = dws[j];
    partial[(slabs + blockIdx.x) * C + c0 + j] = dbs[j];
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
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if ((dw || db) && C % 4 == 0 && C <= 4 * cuda::kThreads && aligned(dout) && aligned(inp) &&
      (!dinp || aligned(dinp))) {
    const int64_t slab = cuda::ln_slab_rows(N), slabs = (N + slab - 1) / slab;
    double* partial = static_cast<double*>(ws_.get(sizeof(double) * 2 * size_t(slabs * C)));
    const int threads = (C / 4 + 31) / 32 * 32;
    cuda::layernorm_backward_rows_kernel<<<unsigned(slabs), threads, 0, stream_>>>(
        dinp, partial, dout, inp, w, mean, rstd, N, C, slab);
    CUDA_CHECK_LAUNCH("layernorm_backward_rows_kernel");
    const unsigned cb = unsigned((C + 255) / 256);
    if (dw) {
      cuda::colsum_final_kernel<double><<<cb, 256, 0, stream_>>>(partial, slabs, C,
                                                                 cuda::AddTo{dw});
      CUDA_CHECK_LAUNCH("colsum_final_kernel");
    }
    if (db) {
      cuda::colsum_final_kernel<double><<<cb, 256, 0, stream_>>>(partial + slabs * C, slabs, C,
                                                                 cuda::AddTo{db});
      CUDA_CHECK_LAUNCH("colsum_final_kernel");
    }
    return;
  }
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
