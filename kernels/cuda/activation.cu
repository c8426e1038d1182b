// GELU (tanh approximation) and ReLU (CUDA twin of kernels/cpu/activation.cpp).
// One thread per element, or per four where the buffers allow float4 access;
// the backward accumulates into dinp. Bitwise
// reproducible (tanhf differs from the host's by a few ulp).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

__global__ void activation_forward_kernel(float* out, const float* inp, int64_t n, bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = act_value(inp[i], relu);
}

// Four elements per thread (n4 float4s, 16-byte aligned buffers).
__global__ void activation_forward_vec4_kernel(float4* out, const float4* inp, int64_t n4,
                                               bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 x = inp[i];
    out[i] = make_float4(act_value(x.x, relu), act_value(x.y, relu), act_value(x.z, relu),
                         act_value(x.w, relu));
  }
}

// dinp = dout * act'(x); ReLU's passes dout where x > 0.
__global__ void activation_backward_kernel(float* dinp, const float* dout, const float* inp,
                                           int64_t n, bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float x = inp[i];
    dinp[i] = relu ? (x > 0.0f ? dout[i] : 0.0f) : act_slope(x, false) * dout[i];
  }
}

__global__ void activation_backward_vec4_kernel(float4* dinp, const float4* dout,
                                                const float4* inp, int64_t n4, bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 x = inp[i], g = dout[i];
    auto term = [relu](float xv, float gv) {
      return relu ? (xv > 0.0f ? gv : 0.0f) : act_slope(xv, false) * gv;
    };
    dinp[i] = make_float4(term(x.x, g.x), term(x.y, g.y), term(x.z, g.z), term(x.w, g.w));
  }
}

bool vec4_ok(int64_t n, const void* a, const void* b, const void* c = nullptr) {
  return n % 4 == 0 && aligned(a, 16) && aligned(b, 16) && (c == nullptr || aligned(c, 16));
}

}  // namespace
}  // namespace cuda

void CudaOps::activation_forward(float* out, const float* inp, int64_t n, Activation act) {
  if (n <= 0) return;
  const bool relu = act == Activation::relu;
  if (cuda::vec4_ok(n, out, inp)) {
    cuda::activation_forward_vec4_kernel<<<cuda::grid_for(n / 4), cuda::kThreads, 0, stream_>>>(
        reinterpret_cast<float4*>(out), reinterpret_cast<const float4*>(inp), n / 4, relu);
  } else {
    cuda::activation_forward_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
        out, inp, n, relu);
  }
  CUDA_CHECK_LAUNCH("activation_forward_kernel");
}

void CudaOps::activation_backward(float* dinp, const float* dout, const float* inp, int64_t n,
                                  Activation act) {
  if (n <= 0 || !dinp) return;
  const bool relu = act == Activation::relu;
  if (cuda::vec4_ok(n, dinp, dout, inp)) {
    cuda::activation_backward_vec4_kernel<<<cuda::grid_for(n / 4), cuda::kThreads, 0, stream_>>>(
        reinterpret_cast<float4*>(dinp), reinterpret_cast<const float4*>(dout),
        reinterpret_cast<const float4*>(inp), n / 4, relu);
  } else {
    cuda::activation_backward_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
        dinp, dout, inp, n, relu);
  }
  CUDA_CHECK_LAUNCH("activation_backward_kernel");
}

}  // namespace reformer
