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

}  // namespace reformer::cpu
