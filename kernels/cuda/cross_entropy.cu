// Softmax cross-entropy and row argmax (CUDA twin of kernels/cpu/cross_entropy.cpp).
// One block per row: max, then the sum of exponentials accumulated in double,
// then the gradient. The whole row is read before any of it is written, so
// dlogits may alias logits. Bitwise reproducible.
#include <cuda_runtime.h>

#include <cfloat>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr int kCeThreads = 256;

__global__ void softmax_cross_entropy_kernel(float* loss, float* dlogits, const float* logits,
                                             const int32_t* targets, int V, float grad_scale) {
  __shared__ float shf[32];
  __shared__ double shd[32];
  const int64_t n = blockIdx.x;
  const float* x = logits + n * V;
  const int32_t t = targets[n];
  if (t < 0) {
    if (loss && threadIdx.x == 0) loss[n] = 0.0f;
    if (dlogits)
      for (int v = threadIdx.x; v < V; v += blockDim.x) dlogits[n * V + v] = 0.0f;
    return;
  }
  float mx = -FLT_MAX;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, x[v]);
  mx = block_max(mx, shf);
  double s = 0.0;
  for (int v = threadIdx.x; v < V; v += blockDim.x) s += exp(double(x[v]) - double(mx));
  s = block_sum(s, shd);
  const double lse = double(mx) + log(s);
  const double xt = double(x[t]);
  if (loss && threadIdx.x == 0) loss[n] = float(lse - xt);
  if (dlogits) {
    __syncthreads();  // every thread has read x[t] before any write (aliasing)
    float* d = dlogits + n * V;
    const double gs = double(grad_scale);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
      const double p = exp(double(x[v]) - lse);
      d[v] = float((p - (v == t ? 1.0 : 0.0)) * gs);
    }
  }
}

// out[n] = lowest index of the row maximum.
__global__ void argmax_rows_kernel(int32_t* out, const float* logits, int V) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int64_t n = blockIdx.x;
  const float* x = logits + n * V;
  float best = -FLT_MAX;
  int idx = 0x7fffffff;
  for (int v = threadIdx.x; v < V; v += blockDim.x)
    if (x[v] > best || idx == 0x7fffffff) {
      if (idx == 0x7fffffff || x[v] > best) {
        best = x[v];
        idx = v;
      }
    }
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (oi != 0x7fffffff && (idx == 0x7fffffff || ob > best || (ob == best && oi < idx))) {
      best = ob;
      idx = oi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = sv[0];
    int bi = si[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w) {
      if (si[w] == 0x7fffffff) continue;
      if (bi == 0x7fffffff || sv[w] > b || (sv[w] == b && si[w] < bi)) {
        b = sv[w];
        bi = si[w];
      }
    }
    out[n] = bi == 0x7fffffff ? 0 : bi;
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::softmax_cross_entropy(float* loss, float* dlogits, const float* logits,
                                    const int32_t* targets, int64_t N, int V, float grad_scale) {
  if (N <= 0 || V <= 0) return;
  cuda::softmax_cross_entropy_kernel<<<unsigned(N), cuda::kCeThreads, 0, stream_>>>(
      loss, dlogits, logits, targets, V, grad_scale);
  CUDA_CHECK_LAUNCH("softmax_cross_entropy_kernel");
}

void CudaOps::argmax_rows(int32_t* out, const float* logits, int64_t N, int V) {
  if (N <= 0 || V <= 0) return;
  cuda::argmax_rows_kernel<<<unsigned(N), cuda::kCeThreads, 0, stream_>>>(out, logits, V);
  CUDA_CHECK_LAUNCH("argmax_rows_kernel");
}

}  // namespace reformer
