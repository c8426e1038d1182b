// LayerNorm over the last dimension (CUDA twin of kernels/cpu/layernorm.cpp).
// One warp per row, two-pass statistics in fp32 (biased variance); the
// forward holds a row of up to 2048 values in registers (one read of the
// input). The weight and bias gradients are deterministic two-pass column
// sums in double; for rows of up to 1024 the backward makes one pass over
// its inputs for the input gradient and the column sums together
// (layernorm_backward_fused_kernel). Bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <utility>

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

// Four consecutive outputs at p (kVec: 16-byte aligned fp32, 8-byte aligned
// bf16), one vector store.
__device__ __forceinline__ void store_quad(float* p, const float* y) {
  *reinterpret_cast<float4*>(p) = make_float4(y[0], y[1], y[2], y[3]);
}
__device__ __forceinline__ void store_quad(__nv_bfloat16* p, const float* y) {
  uint2 u;
  *reinterpret_cast<__nv_bfloat162*>(&u.x) = __floats2bfloat162_rn(y[0], y[1]);
  *reinterpret_cast<__nv_bfloat162*>(&u.y) = __floats2bfloat162_rn(y[2], y[3]);
  *reinterpret_cast<uint2*>(p) = u;
}

// As layernorm_forward_kernel with the row in registers: kPer values per
// lane (C <= 32 * kPer); the output in fp32 or bf16. kVec (C % 4 == 0, every
// row and w, b 16-byte aligned: ln_vec): lane l takes the column quads 4 (l
// + 32 j) .. + 3 by vector loads and stores (a row at 1.5 to 2x the bytes a
// second of one column per lane: bench/RESULTS.md, 2026-12-02 (twentieth));
// else columns l + 32 k.
template <int kPer, class OutT, bool kVec>
__global__ void layernorm_forward_reg_kernel(OutT* out, float* mean, float* rstd,
                                             const float* inp, const float* w, const float* b,
                                             int64_t N, int C, float eps) {
  static_assert(kPer % 4 == 0, "values in fours");
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  // Column of this lane's value k.
  auto col = [&](int k) { return kVec ? 4 * (lane + 32 * (k / 4)) + k % 4 : lane + 32 * k; };
  const float* x = inp + n * C;
  float v[kPer];
  if constexpr (kVec) {
#pragma unroll
    for (int k = 0; k < kPer; k += 4) {
      const int c = col(k);
      const float4 x4 = c < C ? *reinterpret_cast<const float4*>(x + c) : float4{};
      v[k] = x4.x, v[k + 1] = x4.y, v[k + 2] = x4.z, v[k + 3] = x4.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPer; ++k) v[k] = col(k) < C ? x[col(k)] : 0.0f;
  }
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) s += v[k];
  const float m = warp_sum(s) / float(C);
  float q = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const float d = col(k) < C ? v[k] - m : 0.0f;
    q += d * d;
  }
  const float var = warp_sum(q) / float(C);
  const float r = 1.0f / sqrtf(var + eps);
  OutT* o = out + n * C;
  if constexpr (kVec) {
#pragma unroll
    for (int k = 0; k < kPer; k += 4) {
      const int c = col(k);
      if (c >= C) continue;
      const float4 w4 = *reinterpret_cast<const float4*>(w + c);
      const float4 b4 = *reinterpret_cast<const float4*>(b + c);
      const float y[4] = {(v[k] - m) * r * w4.x + b4.x, (v[k + 1] - m) * r * w4.y + b4.y,
                          (v[k + 2] - m) * r * w4.z + b4.z, (v[k + 3] - m) * r * w4.w + b4.w};
      store_quad(o + c, y);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPer; ++k)
      if (col(k) < C) store_out(o + col(k), (v[k] - m) * r * w[col(k)] + b[col(k)]);
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

// The whole backward of rows of up to 32 kPer values in one pass over dout
// and inp: layernorm_dinp_kernel's rows (the same arithmetic, the row held
// in registers), and the column sums of dout * xhat and dout (the weight and
// bias gradients' terms) of this block's rows, each warp's in fp32 in shared
// memory (its own row of sums: no atomics), then the warps' in order into
// partial[2][gridDim.x][C] (double), summed over blocks by
// colsum_final_kernel. Block b takes rows [b * rows_per, (b + 1) *
// rows_per). The grid is one full wave of the device (at most kLnBlocks,
// at most one block per 8 rows): the partials stay small at any N, no
// second wave runs a few blocks on a nearly idle device, and on one device
// the sums' order is fixed. Dynamic shared memory: 2 * kRowsPerBlock * C
// floats.
constexpr int kLnBlocks = 512;
constexpr int kLnFusedMaxC = 1024;
// kVec (C % 4 == 0, the rows 16-byte aligned: ln_vec): lane l takes the
// column quads 4 (l + 32 j) .. + 3 by float4 accesses; else columns l + 32 k.
template <int kPer, bool kVec>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    layernorm_backward_fused_kernel(float* dinp, double* partial, const float* dout,
                                    const float* inp, const float* w, const float* mean,
                                    const float* rstd, int64_t N, int C, int64_t rows_per) {
  extern __shared__ float ln_sums[];  // [2][kRowsPerBlock][C]: dout * xhat, dout
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* sdw = ln_sums + warp * C;
  float* sdb = ln_sums + (kRowsPerBlock + warp) * C;
  for (int c = lane; c < C; c += 32) sdw[c] = sdb[c] = 0.0f;
  __syncwarp();  // kVec: a lane's quads were zeroed by other lanes of the warp
  // Column of this lane's value k.
  auto col = [&](int k) { return kVec ? 4 * (lane + 32 * (k / 4)) + k % 4 : lane + 32 * k; };
  // The weights of this lane's values k .. k + 3 (kVec: one quad).
  auto w_quad = [&](int k, float* q) {
    if constexpr (kVec) {
      const float4 w4 = *reinterpret_cast<const float4*>(w + col(k));
      q[0] = w4.x, q[1] = w4.y, q[2] = w4.z, q[3] = w4.w;
    } else {
#pragma unroll
      for (int u = 0; u < 4; ++u) q[u] = col(k + u) < C ? w[col(k + u)] : 0.0f;
    }
  };
  static_assert(kPer % 4 == 0, "values in fours");
  const int64_t r0 = int64_t(blockIdx.x) * rows_per, r1 = min(N, r0 + rows_per);
  for (int64_t n = r0 + warp; n < r1; n += kRowsPerBlock) {
    const float* x = inp + n * C;
    const float* g = dout + n * C;
    const float m = mean[n], r = rstd[n];
    float gv[kPer], xh[kPer];
    if constexpr (kVec) {
#pragma unroll
      for (int k = 0; k < kPer; k += 4) {
        const int c = col(k);
        const float4 g4 = c < C ? *reinterpret_cast<const float4*>(g + c) : float4{};
        const float4 x4 = c < C ? *reinterpret_cast<const float4*>(x + c) : float4{};
        gv[k] = g4.x, gv[k + 1] = g4.y, gv[k + 2] = g4.z, gv[k + 3] = g4.w;
        xh[k] = x4.x, xh[k + 1] = x4.y, xh[k + 2] = x4.z, xh[k + 3] = x4.w;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int c = col(k);
        gv[k] = c < C ? g[c] : 0.0f;
        xh[k] = c < C ? x[c] : 0.0f;
      }
    }
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; k += 4) {
      if (col(k) >= C) continue;  // (kVec: the quad; else a later value is past C too)
      float wq[4];
      w_quad(k, wq);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (col(k + u) < C) {
          const float gw = gv[k + u] * wq[u];
          xh[k + u] = (xh[k + u] - m) * r;
          sg += gw;
          sgx += gw * xh[k + u];
        }
      }
    }
    const float g_mean = warp_sum(sg) / float(C);
    const float gx_mean = warp_sum(sgx) / float(C);
    float* d = dinp + n * C;
    if constexpr (kVec) {
#pragma unroll
      for (int k = 0; k < kPer; k += 4) {
        const int c = col(k);
        if (c >= C) continue;
        float4 d4 = *reinterpret_cast<float4*>(d + c);
        float4 w4 = *reinterpret_cast<float4*>(sdw + c);
        float4 b4 = *reinterpret_cast<float4*>(sdb + c);
        float* dd = &d4.x;
        float* ww = &w4.x;
        float* bb = &b4.x;
        float wq[4];
        w_quad(k, wq);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          dd[u] += r * (gv[k + u] * wq[u] - g_mean - xh[k + u] * gx_mean);
          ww[u] += gv[k + u] * xh[k + u];
          bb[u] += gv[k + u];
        }
        *reinterpret_cast<float4*>(d + c) = d4;
        *reinterpret_cast<float4*>(sdw + c) = w4;
        *reinterpret_cast<float4*>(sdb + c) = b4;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int c = col(k);
        if (c < C) {
          d[c] += r * (gv[k] * w[c] - g_mean - xh[k] * gx_mean);
          sdw[c] += gv[k] * xh[k];
          sdb[c] += gv[k];
        }
      }
    }
  }
  __syncthreads();
  const int64_t blocks = gridDim.x;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    double tw = 0.0, tb = 0.0;
    for (int k = 0; k < kRowsPerBlock; ++k) {
      tw += double(ln_sums[k * C + c]);
      tb += double(ln_sums[(kRowsPerBlock + k) * C + c]);
    }
    partial[int64_t(blockIdx.x) * C + c] = tw;
    partial[(blocks + blockIdx.x) * C + c] = tb;
  }
}

// Blocks of layernorm_backward_fused_kernel<kPer, kVec> at C columns: the
// most the device runs at once, at most kLnBlocks and one per 8 rows.
template <int kPer, bool kVec>
int64_t layernorm_backward_blocks(int64_t N, int C) {
  static const bool smem_set = [] {
    CUDA_CHECK(cudaFuncSetAttribute(layernorm_backward_fused_kernel<kPer, kVec>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(sizeof(float) * 2 * kRowsPerBlock * 32 * kPer)));
    return true;
  }();
  (void)smem_set;
  int device = 0, sms = 0, per_sm = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, layernorm_backward_fused_kernel<kPer, kVec>, 32 * kRowsPerBlock,
      sizeof(float) * size_t(2 * kRowsPerBlock * C)));
  const int64_t wave = std::max<int64_t>(1, int64_t(sms) * per_sm);
  return std::min({wave, int64_t(kLnBlocks), (N + kRowsPerBlock - 1) / kRowsPerBlock});
}

// The one-pass backward (blocks from layernorm_backward_blocks, partial
// [2][blocks][C] doubles); returns the blocks it ran.
template <int kPer, bool kVec>
int64_t launch_layernorm_backward_fused(float* dinp, double* partial, const float* dout,
                                        const float* inp, const float* w, const float* mean,
                                        const float* rstd, int64_t N, int C, int64_t blocks,
                                        cudaStream_t s) {
  const size_t smem = sizeof(float) * size_t(2 * kRowsPerBlock * C);
  const int64_t rows_per = (N + blocks - 1) / blocks;
  layernorm_backward_fused_kernel<kPer, kVec><<<unsigned(blocks), 32 * kRowsPerBlock, smem, s>>>(
      dinp, partial, dout, inp, w, mean, rstd, N, C, rows_per);
  CUDA_CHECK_LAUNCH("layernorm_backward_fused_kernel");
  return blocks;
}

// Rows of C floats from every pointer 16-byte aligned.
inline bool ln_vec(int C, std::initializer_list<const void*> ptrs) {
  if (C % 4 != 0) return false;
  for (const void* p : ptrs)
    if (!aligned(p, 16)) return false;
  return true;
}

// layernorm_forward_reg_kernel for C <= 2048: values per lane by C, quads
// where the rows allow (ln_vec).
template <class OutT>
void launch_layernorm_forward_reg(OutT* out, float* mean, float* rstd, const float* inp,
                                  const float* w, const float* b, int64_t N, int C, float eps,
                                  cudaStream_t s) {
  const unsigned blocks = unsigned((N + kRowsPerBlock - 1) / kRowsPerBlock);
  const bool vec = ln_vec(C, {out, inp, w, b});
  auto run = [&](auto kernel) {
    kernel<<<blocks, 32 * kRowsPerBlock, 0, s>>>(out, mean, rstd, inp, w, b, N, C, eps);
    CUDA_CHECK_LAUNCH("layernorm_forward_reg_kernel");
  };
  if (C <= 256)
    vec ? run(layernorm_forward_reg_kernel<8, OutT, true>)
        : run(layernorm_forward_reg_kernel<8, OutT, false>);
  else if (C <= 1024)
    vec ? run(layernorm_forward_reg_kernel<32, OutT, true>)
        : run(layernorm_forward_reg_kernel<32, OutT, false>);
  else
    vec ? run(layernorm_forward_reg_kernel<64, OutT, true>)
        : run(layernorm_forward_reg_kernel<64, OutT, false>);
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
  if (C > kLayernormBf16MaxC) return false;
  if (N <= 0 || C <= 0) return true;
  launch_layernorm_forward_reg(out, mean, rstd, inp, w, b, N, C, eps, stream);
  return true;
}

}  // namespace cuda

void CudaOps::layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                const float* w, const float* b, int64_t N, int C, float eps) {
  if (N <= 0 || C <= 0) return;
  if (C <= 2048) {
    cuda::launch_layernorm_forward_reg(out, mean, rstd, inp, w, b, N, C, eps, stream_);
    return;
  }
  const unsigned blocks = unsigned((N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock);
  cuda::layernorm_forward_kernel<<<blocks, 32 * cuda::kRowsPerBlock, 0, stream_>>>(
      out, mean, rstd, inp, w, b, N, C, eps);
  CUDA_CHECK_LAUNCH("layernorm_forward_kernel");
}

void CudaOps::layernorm_backward(float* dinp, float* dw, float* db, const float* dout,
                                 const float* inp, const float* w, const float* mean,
                                 const float* rstd, int64_t N, int C) {
  if (N <= 0 || C <= 0) return;
  if (dinp && dw && db && C <= cuda::kLnFusedMaxC) {  // one pass (layernorm_backward_fused_kernel)
    const bool vec = cuda::ln_vec(C, {dinp, dout, inp, w});
    auto run = [&](auto blocks_of, auto launch) {
      const int64_t blocks = blocks_of(N, C);
      double* partial = static_cast<double*>(ws_.get(sizeof(double) * size_t(2 * blocks * C)));
      launch(dinp, partial, dout, inp, w, mean, rstd, N, C, blocks, stream_);
      return std::pair<double*, int64_t>(partial, blocks);
    };
    const auto [partial, blocks] =
        C <= 256 ? (vec ? run(cuda::layernorm_backward_blocks<8, true>,
                              cuda::launch_layernorm_backward_fused<8, true>)
                        : run(cuda::layernorm_backward_blocks<8, false>,
                              cuda::launch_layernorm_backward_fused<8, false>))
                 : (vec ? run(cuda::layernorm_backward_blocks<32, true>,
                              cuda::launch_layernorm_backward_fused<32, true>)
                        : run(cuda::layernorm_backward_blocks<32, false>,
                              cuda::launch_layernorm_backward_fused<32, false>));
    cuda::launch_colsum_final(static_cast<const double*>(partial), blocks, int64_t(C),
                              cuda::AddTo{dw}, stream_);
    cuda::launch_colsum_final(static_cast<const double*>(partial + blocks * C), blocks,
                              int64_t(C), cuda::AddTo{db}, stream_);
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
