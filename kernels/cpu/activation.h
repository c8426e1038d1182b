// GELU (tanh approximation) and ReLU (CPU reference). Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

#include "kernels/common/params.h"

namespace reformer::cpu {

template <class T>
void activation_forward(T* out, const T* inp, int64_t n, Activation act);
template <class T>
void activation_backward(T* dinp, const T* dout, const T* inp, int64_t n, Activation act);

}  // namespace reformer::cpu
