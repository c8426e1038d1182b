// Dense linear layer out = inp @ w + bias (CPU reference: cache-blocked,
// multi-threaded with OpenMP; each output element is reduced by one thread in
// a fixed order, so results do not depend on the thread count).
// Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

namespace reformer::cpu {

template <class T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C, int OC);
// out += alpha * (inp @ w + bias): matmul_forward into a buffer, then each
// element out + alpha * buffer (add / sub bits for alpha = +-1).
template <class T>
void matmul_accumulate(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C, int OC,
                       float alpha, const T* res = nullptr);
template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N,
                     int C, int OC, bool add_dinp = true);

}  // namespace reformer::cpu
