// GELU (tanh approximation) and ReLU on the device, and their slopes: the
// one definition activation.cu and ffn.cu share.
#pragma once

#include <cuda_runtime.h>

namespace reformer::cuda {

constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kGeluCubic = 0.044715f;

__device__ __forceinline__ float act_value(float x, bool relu) {
  return relu ? (x > 0.0f ? x : 0.0f)
              : 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x)));
}

// d act / dx at x.
__device__ __forceinline__ float act_slope(float x, bool relu) {
  if (relu) return x > 0.0f ? 1.0f : 0.0f;
  const float th = tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x));
  const float dudx = kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * x * x);
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * dudx;
}

}  // namespace reformer::cuda
