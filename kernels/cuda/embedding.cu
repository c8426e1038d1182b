// Token plus axial position embedding (CUDA twin of kernels/cpu/embedding.cpp).
//
// Determinism: the position-table gradients are summed by one thread per
// element in row order (bitwise reproducible); the token-table gradient dwte
// is accumulated with atomicAdd over positions, so its rounding depends on
// the order the atomics land in and is NOT bitwise reproducible run to run.
#include <cuda_runtime.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

// out[i, c] = wte[tokens[i], c] + (c < d1 ? pos1[p / a2, c] : pos2[p % a2, c - d1]).
__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* wte,
                                         const float* pos1, const float* pos2, int64_t L, int D,
                                         int d1, int a2, int64_t pos_offset) {
  const int d2 = D - d1;
  const int64_t n = L * D;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = k / D;
    const int c = int(k % D);
    const int64_t p = pos_offset + i;
    const float e = c < d1 ? pos1[(p / a2) * d1 + c] : pos2[(p % a2) * d2 + (c - d1)];
    out[k] = wte[int64_t(tokens[i]) * D + c] + e;
  }
}

__global__ void embedding_dwte_kernel(float* dwte, const float* dout, const int32_t* tokens,
                                      int64_t L, int D) {
  const int64_t n = L * D;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = k / D;
    const int c = int(k % D);
    atomicAdd(dwte + int64_t(tokens[i]) * D + c, dout[k]);
  }
}

// dpos1[r, c] += sum of dout[i, c] over the rows i with (pos_offset + i) / a2 == r;
// one thread per touched (r, c), rows in increasing order.
__global__ void embedding_dpos1_kernel(float* dpos1, const float* dout, int64_t L, int D, int d1,
                                       int a2, int64_t pos_offset, int64_t r_first,
                                       int64_t n_rows) {
  const int64_t n = n_rows * d1;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = r_first + k / d1;
    const int c = int(k % d1);
    const int64_t i0 = max(int64_t(0), r * a2 - pos_offset);
    const int64_t i1 = min(L, (r + 1) * a2 - pos_offset);
    float s = 0.0f;
    for (int64_t i = i0; i < i1; ++i) s += dout[i * D + c];
    dpos1[r * d1 + c] += s;
  }
}

// dpos2[q, c] += sum of dout[i, d1 + c] over the rows i with (pos_offset + i) % a2 == q.
__global__ void embedding_dpos2_kernel(float* dpos2, const float* dout, int64_t L, int D, int d1,
                                       int a2, int64_t pos_offset) {
  const int d2 = D - d1;
  const int64_t n = int64_t(a2) * d2;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = k / d2;
    const int c = int(k % d2);
    // first row i >= 0 with (pos_offset + i) % a2 == q
    int64_t i = (q - pos_offset % a2 + a2) % a2;
    float s = 0.0f;
    for (; i < L; i += a2) s += dout[i * D + d1 + c];
    dpos2[q * d2 + c] += s;
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::embedding_forward(float* out, const int32_t* tokens, const float* wte,
                                const float* pos1, const float* pos2, int64_t L, int D, int d1,
                                int a2, int64_t pos_offset) {
  if (L <= 0 || D <= 0) return;
  cuda::embedding_forward_kernel<<<cuda::grid_for(L * D), cuda::kThreads, 0, stream_>>>(
      out, tokens, wte, pos1, pos2, L, D, d1, a2, pos_offset);
  CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

void CudaOps::embedding_backward(float* dwte, float* dpos1, float* dpos2, const float* dout,
                                 const int32_t* tokens, int64_t L, int D, int d1, int a2,
                                 int64_t pos_offset) {
  if (L <= 0 || D <= 0) return;
  if (dwte) {
    cuda::embedding_dwte_kernel<<<cuda::grid_for(L * D), cuda::kThreads, 0, stream_>>>(
        dwte, dout, tokens, L, D);
    CUDA_CHECK_LAUNCH("embedding_dwte_kernel");
  }
  if (dpos1 && d1 > 0) {
    const int64_t r_first = pos_offset / a2;
    const int64_t n_rows = (pos_offset + L - 1) / a2 - r_first + 1;
    cuda::embedding_dpos1_kernel<<<cuda::grid_for(n_rows * d1), cuda::kThreads, 0, stream_>>>(
        dpos1, dout, L, D, d1, a2, pos_offset, r_first, n_rows);
    CUDA_CHECK_LAUNCH("embedding_dpos1_kernel");
  }
  if (dpos2 && D - d1 > 0) {
    cuda::embedding_dpos2_kernel<<<cuda::grid_for(int64_t(a2) * (D - d1)), cuda::kThreads, 0,
                                   stream_>>>(dpos2, dout, L, D, d1, a2, pos_offset);
    CUDA_CHECK_LAUNCH("embedding_dpos2_kernel");
  }
}

}  // namespace reformer
