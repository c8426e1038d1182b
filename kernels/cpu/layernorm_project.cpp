// LayerNorm and its projections on the CPU: the separate ops in the order
// the model called them, so results are bitwise theirs. Contracts as in
// kernels/ops.h.
#include "kernels/cpu/layernorm_project.h"

#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/matmul.h"

namespace reformer::cpu {

template <class T>
void layernorm_project_forward(T* out1, T* out2, T* ln, T* mean, T* rstd, const T* inp,
                               const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                               int C, int OC, float eps) {
  layernorm_forward(ln, mean, rstd, inp, ln_w, ln_b, N, C, eps);
  matmul_forward(out1, ln, w1, static_cast<const T*>(nullptr), N, C, OC);
  if (w2) matmul_forward(out2, ln, w2, static_cast<const T*>(nullptr), N, C, OC);
}

template <class T>
void layernorm_project_backward(T* dinp, T* dln_w, T* dln_b, T* dw1, T* dw2, const T* dout1,
                                const T* dout2, T* ln, T* dln, T* mean, T* rstd, const T* inp,
                                const T* ln_w, const T* ln_b, const T* w1, const T* w2, int64_t N,
                                int C, int OC, float eps) {
  layernorm_forward(ln, mean, rstd, inp, ln_w, ln_b, N, C, eps);
  matmul_backward(dln, dw1, static_cast<T*>(nullptr), dout1, ln, w1, N, C, OC,
                  /*add_dinp=*/false);
  if (w2)
    matmul_backward(dln, dw2, static_cast<T*>(nullptr), dout2, ln, w2, N, C, OC,
                    /*add_dinp=*/true);
  layernorm_backward(dinp, dln_w, dln_b, dln, inp, ln_w, mean, rstd, N, C);
}

#define REFORMER_INSTANTIATE(T)                                                               \
  template void layernorm_project_forward<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*, \
                                             const T*, const T*, int64_t, int, int, float);   \
  template void layernorm_project_backward<T>(T*, T*, T*, T*, T*, const T*, const T*, T*, T*,  \
                                              T*, T*, const T*, const T*, const T*, const T*,  \
                                              const T*, int64_t, int, int, float);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
