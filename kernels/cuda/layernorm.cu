// LayerNorm over the last dimension (CUDA twin of kernels/cpu/layernorm.cpp).
// Forward: one warp per row, the row held in registers (one read of the
// input), two-pass statistics in fp32 (biased variance). Backward: one block
// per group of rows, each thread owning columns of the row in registers; it
// writes dinp and keeps the weight and bias gradients' partial sums of its
// rows in double (kernels/common/workspace_growth.h, layernorm_partial_*),
// which a second kernel adds up block by block in a fixed order. Rows wider
// than the register kernels take (4096 columns) use one warp per row and
// column sums (device_utils.cuh). Bitwise reproducible.
#include <cuda_runtime.h>

#include "kernels/common/workspace_growth.h"
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

// As layernorm_forward_kernel with the row in registers: kPer values per
// lane (C <= 32 * kPer).
template <int kPer>
__global__ void layernorm_forward_reg_kernel(float* out, float* mean, float* rstd,
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
  float* o = out + n * C;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    if (c < C) o[c] = (v[k] - m) * r * w[c] + b[c];
  }
  if (lane == 0) {
    mean[n] = m;
    rstd[n] = r;
  }
}

constexpr int kBackThreads = 256;

// Sum of one value over the block (kBackThreads threads), returned to all.
__device__ inline float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // red is reused row after row
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.0f;
#pragma unroll
  for (int i = 0; i < kBackThreads / 32; ++i) t += red[i];
  return t;
}

// Rows [blockIdx.x * rows_per_block, +rows_per_block): dinp += rstd * (g -
// mean(g) - xhat * mean(g * xhat)), g = dout * w (when dinp), and the block's
// partial sums of dout * xhat and dout per column, in double, to
// partial[blockIdx.x, 0 / 1, C]. Thread t owns columns t + kBackThreads * k.
template <int kCols>
__global__ void layernorm_backward_reg_kernel(float* dinp, double* partial, const float* dout,
                                              const float* inp, const float* w,
                                              const float* mean, const float* rstd, int64_t N,
                                              int C, int64_t rows_per_block) {
  __shared__ float red[2][kBackThreads / 32];
  const int t = threadIdx.x;
  float wc[kCols];
  double adw[kCols], adb[kCols];
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
    const int c = t + kBackThreads * k;
    wc[k] = c < C ? w[c] : 0.0f;
    adw[k] = 0.0;
    adb[k] = 0.0;
  }
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t r1 = min(N, r0 + rows_per_block);
  for (int64_t n = r0; n < r1; ++n) {
    const float* x = inp + n * C;
    const float* g = dout + n * C;
    const float m = mean[n], r = rstd[n];
    float gv[kCols], xh[kCols];
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int c = t + kBackThreads * k;
      if (c < C) {
        const float xv = x[c];
        gv[k] = g[c];
        xh[k] = (xv - m) * r;
        const float gw = gv[k] * wc[k];
        sg += gw;
        sgx += gw * xh[k];
        adw[k] += double(gv[k]) * ((double(xv) - double(m)) * double(r));
        adb[k] += double(gv[k]);
      } else {
        gv[k] = 0.0f;
        xh[k] = 0.0f;
      }
    }
    if (dinp) {
      const float g_mean = block_sum(sg, red[0]) / float(C);
      const float gx_mean = block_sum(sgx, red[1]) / float(C);
      float* d = dinp + n * C;
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        const int c = t + kBackThreads * k;
        if (c < C) d[c] += r * (gv[k] * wc[k] - g_mean - xh[k] * gx_mean);
      }
    }
  }
  double* p = partial + int64_t(blockIdx.x) * 2 * C;
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
    const int c = t + kBackThreads * k;
    if (c < C) {
      p[c] = adw[k];
      p[C + c] = adb[k];
    }
  }
}

// dw[c] += sum_b partial[b, 0, c], db[c] += sum_b partial[b, 1, c], b in order.
__global__ void layernorm_partials_final_kernel(float* dw, float* db, const double* partial,
                                                int64_t blocks, int C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sw = 0.0, sb = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    sw += partial[b * 2 * C + c];
    sb += partial[b * 2 * C + C + c];
  }
  if (dw) dw[c] += float(sw);
  if (db) db[c] += float(sb);
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
struct DbTerm {
  const float* dout;
  int64_t C;
  __device__ double operator()(int64_t r, int64_t c) const { return double(dout[r * C + c]); }
};
struct AddTo {  // dst[c] += sum
  float* dst;
  __device__ void operator()(int64_t c, double s) const { dst[c] += float(s); }
};

}  // namespace
}  // namespace cuda

void CudaOps::layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                const float* w, const float* b, int64_t N, int C, float eps) {
  if (N <= 0 || C <= 0) return;
  const unsigned blocks = unsigned((N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock);
  const unsigned threads = 32 * cuda::kRowsPerBlock;
  if (C <= 256) {
    cuda::layernorm_forward_reg_kernel<8>
        <<<blocks, threads, 0, stream_>>>(out, mean, rstd, inp, w, b, N, C, eps);
  } else if (C <= 1024) {
    cuda::layernorm_forward_reg_kernel<32>
        <<<blocks, threads, 0, stream_>>>(out, mean, rstd, inp, w, b, N, C, eps);
  } else if (C <= 2048) {
    cuda::layernorm_forward_reg_kernel<64>
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
  if (C <= kLayerNormRegisterCols && (dw || db)) {
    const int64_t rows = layernorm_partial_rows(N), blocks = (N + rows - 1) / rows;
    double* partial = static_cast<double*>(ws_.get(size_t(layernorm_partial_bytes(N, C))));
    const unsigned threads = cuda::kBackThreads;
    if (C <= 4 * cuda::kBackThreads) {
      cuda::layernorm_backward_reg_kernel<4><<<unsigned(blocks), threads, 0, stream_>>>(
          dinp, partial, dout, inp, w, mean, rstd, N, C, rows);
    } else if (C <= 8 * cuda::kBackThreads) {
      cuda::layernorm_backward_reg_kernel<8><<<unsigned(blocks), threads, 0, stream_>>>(
          dinp, partial, dout, inp, w, mean, rstd, N, C, rows);
    } else {
      cuda::layernorm_backward_reg_kernel<16><<<unsigned(blocks), threads, 0, stream_>>>(
          dinp, partial, dout, inp, w, mean, rstd, N, C, rows);
    }
    CUDA_CHECK_LAUNCH("layernorm_backward_reg_kernel");
    cuda::layernorm_partials_final_kernel<<<unsigned((C + 255) / 256), 256, 0, stream_>>>(
        dw, db, partial, blocks, C);
    CUDA_CHECK_LAUNCH("layernorm_partials_final_kernel");
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
    if (db) cuda::colsum<double>(scratch, cuda::DbTerm{dout, C}, cuda::AddTo{db}, N, C, stream_);
  }
}

}  // namespace reformer
