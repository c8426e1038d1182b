// GELU (tanh approximation) and ReLU (CUDA twin of kernels/cpu/activation.cpp).
// One thread per element; the backward accumulates into dinp. Bitwise
// reproducible (tanhf differs from the host's by a few ulp).
#include <cuda_runtime.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kGeluCubic = 0.044715f;

__global__ void activation_forward_kernel(float* out, const float* inp, int64_t n, bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float x = inp[i];
    if (relu) {
      out[i] = x > 0.0f ? x : 0.0f;
    } else {
      out[i] = 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x)));
    }
  }
}

__global__ void activation_backward_kernel(float* dinp, const float* dout, const float* inp,
                                           int64_t n, bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float x = inp[i];
    if (relu) {
      dinp[i] += x > 0.0f ? dout[i] : 0.0f;
    } else {
      const float th = tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x));
      const float dudx = kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * x * x);
      const float grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * dudx;
      dinp[i] += grad * dout[i];
    }
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::activation_forward(float* out, const float* inp, int64_t n, Activation act) {
  if (n <= 0) return;
  cuda::activation_forward_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
      out, inp, n, act == Activation::relu);
  CUDA_CHECK_LAUNCH("activation_forward_kernel");
}

void CudaOps::activation_backward(float* dinp, const float* dout, const float* inp, int64_t n,
                                  Activation act) {
  if (n <= 0 || !dinp) return;
  cuda::activation_backward_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
      dinp, dout, inp, n, act == Activation::relu);
  CUDA_CHECK_LAUNCH("activation_backward_kernel");
}

}  // namespace reformer
