// The feed-forward block g = act(inp @ w1 + b1) @ w2 + b2 (CPU reference):
// the linear and activation ops of kernels/cpu/ in sequence. h holds the
// pre-activation and a the activation between ffn_forward and
// ffn_backward. Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

#include "kernels/common/params.h"

namespace reformer::cpu {

template <class T>
void ffn_forward(T* out, T* h, T* a, const T* inp, const T* w1, const T* b1, const T* w2,
                 const T* b2, int64_t N, int C, int F, Activation act, float alpha,
                 bool accumulate, const T* res = nullptr);
template <class T>
void ffn_backward(T* dinp, T* dw1, T* db1, T* dw2, T* db2, const T* dout, const T* inp, T* h,
                  T* a, const T* w1, const T* w2, int64_t N, int C, int F, Activation act);
// a = act(h): the activation from the pre-activation, as ffn_forward left
// them (C unused: the CUDA twin's layout depends on it).
template <class T>
void ffn_rebuild(T* a, const T* h, int64_t N, int C, int F, Activation act);
// ln, mean, rstd as layernorm_ffn_forward leaves them: layernorm_forward.
template <class T>
void layernorm_ffn_rows(T* ln, T* mean, T* rstd, const T* inp, const T* ln_w, const T* ln_b,
                        int64_t N, int C, int F, float eps);
// LayerNorm, then the block: layernorm_forward into ln and ffn_forward on
// it; the backward ffn_backward into dln, then layernorm_backward.
template <class T>
void layernorm_ffn_forward(T* out, T* h, T* a, T* ln, T* mean, T* rstd, const T* inp,
                           const T* ln_w, const T* ln_b, const T* w1, const T* b1, const T* w2,
                           const T* b2, int64_t N, int C, int F, Activation act, float eps,
                           float alpha, bool accumulate, const T* res = nullptr);
template <class T>
void layernorm_ffn_backward(T* dinp, T* dln_w, T* dln_b, T* dw1, T* db1, T* dw2, T* db2,
                            const T* dout, T* ln, T* dln, T* h, T* a, const T* inp,
                            const T* ln_w, const T* mean, const T* rstd, const T* w1,
                            const T* w2, int64_t N, int C, int F, Activation act);

}  // namespace reformer::cpu
