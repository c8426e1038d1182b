// Combining a head's parts by their log-sum-exps (CUDA twin of
// kernels/cpu/lse_combine.cpp; contract in kernels/ops.h).
//
//  - forward_kernel: one warp per row. Every lane computes the row's shift
//    and weights itself (parts * rounds values, a few), lane 0 writes w, and
//    the lanes split the head's dh columns for the weighted sum.
//  - backward_kernel: one warp per row, the lanes over each part's dh
//    columns: += (or =, !p.accumulate) the part's weight times dout.
// Exponentials are fp32 (expf), so results differ from the CPU by rounding
// only; each element is summed in a fixed order (deterministic).
#include <cuda_runtime.h>

#include "kernels/common/lse_combine_checks.h"
#include "kernels/common/params.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row each

__global__ void lse_combine_forward_kernel(float* out, float* w, const float* parts,
                                           const float* lse, LseCombineParams p) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= p.N) return;
  const int K = p.parts, R = p.rounds;
  const float* l = lse + n * p.ld_lse;
  float m = l[0];
  for (int u = 1; u < K * R; ++u) m = fmaxf(m, l[u]);
  float z = 0.0f;
  for (int u = 0; u < K * R; ++u) z += expf(l[u] - m);
  const float inv_z = 1.0f / z;
  auto weight = [&](int k) {
    float wk = 0.0f;
    for (int r = 0; r < R; ++r) wk += expf(l[k * R + r] - m);
    return wk * inv_z;
  };
  if (lane == 0)
    for (int k = 0; k < K; ++k) w[n * K + k] = weight(k);
  for (int d = lane; d < p.dh; d += 32) {
    float o = 0.0f;
    for (int k = 0; k < K; ++k) o += weight(k) * parts[n * p.ld_parts + int64_t(k) * p.dh + d];
    out[n * p.ld_out + d] = o;
  }
}

__global__ void lse_combine_backward_kernel(float* dparts, const float* dout, const float* w,
                                            LseCombineParams p) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= p.N) return;
  const float* g = dout + n * p.ld_out;
  for (int k = 0; k < p.parts; ++k) {
    const float wk = w[n * p.parts + k];
    float* dst = dparts + n * p.ld_parts + int64_t(k) * p.dh;
    for (int d = lane; d < p.dh; d += 32) dst[d] = p.accumulate ? dst[d] + wk * g[d] : wk * g[d];
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::lse_combine_forward(float* out, float* w, const float* parts, const float* lse,
                                  const LseCombineParams& p) {
  check_lse_combine(p, "lse_combine_forward");
  if (p.N == 0) return;
  const unsigned blocks = unsigned((p.N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock);
  cuda::lse_combine_forward_kernel<<<blocks, 32 * cuda::kRowsPerBlock, 0, stream_>>>(out, w, parts,
                                                                                     lse, p);
  CUDA_CHECK_LAUNCH("lse_combine_forward_kernel");
}

void CudaOps::lse_combine_backward(float* dparts, const float* dout, const float* w,
                                   const LseCombineParams& p) {
  check_lse_combine(p, "lse_combine_backward");
  if (p.N == 0) return;
  const unsigned blocks = unsigned((p.N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock);
  cuda::lse_combine_backward_kernel<<<blocks, 32 * cuda::kRowsPerBlock, 0, stream_>>>(dparts, dout,
                                                                                      w, p);
  CUDA_CHECK_LAUNCH("lse_combine_backward_kernel");
}

}  // namespace reformer
