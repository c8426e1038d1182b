// The feed-forward block on the CPU: matmul, activation, matmul and the
// backwards in the order the model called them one by one, so its results
// are bitwise those of the separate ops. Contracts as in kernels/ops.h.
#include "kernels/cpu/ffn.h"

#include "kernels/cpu/activation.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/matmul.h"

namespace reformer::cpu {

template <class T>
void ffn_forward(T* out, T* h, T* a, const T* inp, const T* w1, const T* b1, const T* w2,
                 const T* b2, int64_t N, int C, int F, Activation act, float alpha,
                 bool accumulate, const T* res) {
  matmul_forward(h, inp, w1, b1, N, C, F);
  activation_forward(a, h, N * F, act);
  if (accumulate) {
    matmul_accumulate(out, a, w2, b2, N, F, C, alpha, res);
    return;
  }
  matmul_forward(out, a, w2, b2, N, F, C);
  if (alpha != 1.0f) scale(out, T(alpha), N * C);
}

// dw2 and db2 first, while a still holds the activation; then d(act) is
// written over a and turned into d(pre-activation) in place.
template <class T>
void ffn_backward(T* dinp, T* dw1, T* db1, T* dw2, T* db2, const T* dout, const T* inp, T* h,
                  T* a, const T* w1, const T* w2, int64_t N, int C, int F, Activation act) {
  matmul_backward(static_cast<T*>(nullptr), dw2, db2, dout, a, w2, N, F, C);
  matmul_backward(a, static_cast<T*>(nullptr), static_cast<T*>(nullptr), dout, a, w2, N, F, C,
                  /*add_dinp=*/false);
  activation_backward(a, a, h, N * F, act);
  matmul_backward(dinp, dw1, db1, a, inp, w1, N, C, F, /*add_dinp=*/false);
}

template <class T>
void ffn_rebuild(T* a, const T* h, int64_t N, int /*C*/, int F, Activation act) {
  activation_forward(a, h, N * F, act);
}

template <class T>
void layernorm_ffn_rows(T* ln, T* mean, T* rstd, const T* inp, const T* ln_w, const T* ln_b,
                        int64_t N, int C, int /*F*/, float eps) {
  layernorm_forward(ln, mean, rstd, inp, ln_w, ln_b, N, C, eps);
}

template <class T>
void layernorm_ffn_forward(T* out, T* h, T* a, T* ln, T* mean, T* rstd, const T* inp,
                           const T* ln_w, const T* ln_b, const T* w1, const T* b1, const T* w2,
                           const T* b2, int64_t N, int C, int F, Activation act, float eps,
                           float alpha, bool accumulate, const T* res) {
  layernorm_forward(ln, mean, rstd, inp, ln_w, ln_b, N, C, eps);
  ffn_forward(out, h, a, ln, w1, b1, w2, b2, N, C, F, act, alpha, accumulate, res);
}

template <class T>
void layernorm_ffn_backward(T* dinp, T* dln_w, T* dln_b, T* dw1, T* db1, T* dw2, T* db2,
                            const T* dout, T* ln, T* dln, T* h, T* a, const T* inp,
                            const T* ln_w, const T* mean, const T* rstd, const T* w1,
                            const T* w2, int64_t N, int C, int F, Activation act) {
  ffn_backward(dln, dw1, db1, dw2, db2, dout, ln, h, a, w1, w2, N, C, F, act);
  layernorm_backward(dinp, dln_w, dln_b, dln, inp, ln_w, mean, rstd, N, C);
}

#define REFORMER_INSTANTIATE(T)                                                             \
  template void ffn_forward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*, \
                               int64_t, int, int, Activation, float, bool, const T*);       \
  template void ffn_backward<T>(T*, T*, T*, T*, T*, const T*, const T*, T*, T*, const T*,   \
                                const T*, int64_t, int, int, Activation);                 \
  template void ffn_rebuild<T>(T*, const T*, int64_t, int, int, Activation);                 \
  template void layernorm_ffn_rows<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int, \
                                      int, float);                                           \
  template void layernorm_ffn_forward<T>(T*, T*, T*, T*, T*, T*, const T*, const T*, const T*, \
                                         const T*, const T*, const T*, const T*, int64_t, int, \
                                         int, Activation, float, float, bool, const T*);       \
  template void layernorm_ffn_backward<T>(T*, T*, T*, T*, T*, T*, T*, const T*, T*, T*, T*,   \
                                          T*, const T*, const T*, const T*, const T*,         \
                                          const T*, const T*, int64_t, int, int, Activation);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
