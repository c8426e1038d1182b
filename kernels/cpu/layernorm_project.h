// LayerNorm followed by the projections that read it (CPU reference): the
// layernorm and linear ops of kernels/cpu/ in sequence. Contracts as in
// kernels/ops.h.
#pragma once

#include <cstdint>

#include "kernels/cpu/matmul.h"

namespace reformer::cpu {

template <class T>
void layernorm_project_forward(T* out1, T* out2, T* ln, T* mean, T* rstd, const T* inp,
                               const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                               int C, int OC, float eps);
// The op interface's form (kernels/ops.h): out_bf16 needs a backend that
// writes bf16 outputs (not this one).
template <class T>
void layernorm_project_forward(T* out1, T* out2, T* ln, T* mean, T* rstd, const T* inp,
                               const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                               int C, int OC, float eps, bool out_bf16) {
  if (out_bf16)
    throw ShapeError("layernorm_project_forward: bf16 outputs need a backend that writes them");
  layernorm_project_forward(out1, out2, ln, mean, rstd, inp, ln_w, ln_b, w1, w2, N, C, OC, eps);
}
template <class T>
void layernorm_project_backward(T* dinp, T* dln_w, T* dln_b, T* dw1, T* dw2, const T* dout1,
                                const T* dout2, T* ln, T* dln, T* mean, T* rstd, const T* inp,
                                const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                                int C, int OC, float eps);
// The op interface's form (kernels/ops.h): the gradients as Operands in T,
// rows OC wide (plain_operand).
template <class T>
void layernorm_project_backward(T* dinp, T* dln_w, T* dln_b, T* dw1, T* dw2, Operand<T> dout1,
                                Operand<T> dout2, T* ln, T* dln, T* mean, T* rstd, const T* inp,
                                const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                                int C, int OC, float eps) {
  const char* op = "layernorm_project_backward";
  layernorm_project_backward(dinp, dln_w, dln_b, dw1, dw2, plain_operand(dout1, OC, op),
                             plain_operand(dout2, OC, op), ln, dln, mean, rstd, inp, ln_w, ln_b,
                             w1, w2, N, C, OC, eps);
}

}  // namespace reformer::cpu
