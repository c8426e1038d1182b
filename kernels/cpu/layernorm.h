// LayerNorm over the last dimension (CPU reference). Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

namespace reformer::cpu {

template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int64_t N,
                       int C, float eps);
template <class T>
void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w,
                        const T* mean, const T* rstd, int64_t N, int C);

}  // namespace reformer::cpu
