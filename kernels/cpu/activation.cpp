// GELU (tanh approximation) and ReLU (CPU reference). Contracts as in kernels/ops.h.
//
// gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));  relu(x) = max(x, 0),
// with relu'(0) = 0. The backward accumulates into dinp.
#include "kernels/cpu/activation.h"

#include <cmath>

namespace reformer::cpu {

namespace {
constexpr int64_t kParallelMin = 1 << 14;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluCubic = 0.044715;
}  // namespace

template <class T>
void activation_forward(T* out, const T* inp, int64_t n, Activation act) {
  if (act == Activation::relu) {
#pragma omp parallel for if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) out[i] = inp[i] > T(0) ? inp[i] : T(0);
    return;
  }
  const T s = T(kSqrt2OverPi), c = T(kGeluCubic);
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T x = inp[i];
    out[i] = T(0.5) * x * (T(1) + std::tanh(s * (x + c * x * x * x)));
  }
}

template <class T>
void activation_backward(T* dinp, const T* dout, const T* inp, int64_t n, Activation act) {
  if (!dinp) return;
  if (act == Activation::relu) {
#pragma omp parallel for if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) dinp[i] = inp[i] > T(0) ? dout[i] : T(0);
    return;
  }
  const T s = T(kSqrt2OverPi), c = T(kGeluCubic);
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T x = inp[i];
    const T th = std::tanh(s * (x + c * x * x * x));
    const T dudx = s * (T(1) + T(3) * c * x * x);
    const T grad = T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * dudx;
    dinp[i] = grad * dout[i];
  }
}

#define REFORMER_INSTANTIATE(T)                                                     \
  template void activation_forward<T>(T*, const T*, int64_t, Activation);           \
  template void activation_backward<T>(T*, const T*, const T*, int64_t, Activation);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
