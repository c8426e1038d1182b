// LayerNorm followed by the projections that read it (CPU reference): the
// layernorm and linear ops of kernels/cpu/ in sequence. Contracts as in
// kernels/ops.h.
#pragma once

#include <cstdint>

namespace reformer::cpu {

template <class T>
void layernorm_project_forward(T* out1, T* out2, T* ln, T* mean, T* rstd, const T* inp,
                               const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                               int C, int OC, float eps);
template <class T>
void layernorm_project_backward(T* dinp, T* dln_w, T* dln_b, T* dw1, T* dw2, const T* dout1,
                                const T* dout2, T* ln, T* dln, T* mean, T* rstd, const T* inp,
                                const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                                int C, int OC, float eps);

}  // namespace reformer::cpu
