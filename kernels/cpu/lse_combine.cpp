// Combining a head's parts by their log-sum-exps (CPU reference and test
// oracle). Per row, shifted by the largest lse m (not by the logsumexp, so
// weights stay exact when every lse is large, e.g. a query that sees only
// itself): w_k = sum_r exp(lse_kr - m) / sum_{k,r} exp(lse_kr - m). Each row
// is computed by one thread in a fixed order.
#include "kernels/cpu/lse_combine.h"

#include <algorithm>
#include <cmath>

#include "kernels/common/lse_combine_checks.h"

namespace reformer::cpu {

template <class T>
void lse_combine_forward(T* out, T* w, const T* parts, const T* lse, const LseCombineParams& p) {
  check_lse_combine(p, "lse_combine_forward");
  const int K = p.parts, R = p.rounds, dh = p.dh;
#pragma omp parallel for schedule(static) if (p.N * K * dh >= (int64_t(1) << 16))
  for (int64_t n = 0; n < p.N; ++n) {
    const T* l = lse + n * p.ld_lse;
    T m = l[0];
    for (int u = 1; u < K * R; ++u) m = std::max(m, l[u]);
    T z = T(0);
    T* wn = w + n * K;
    for (int k = 0; k < K; ++k) {
      T wk = T(0);
      for (int r = 0; r < R; ++r) wk += std::exp(l[k * R + r] - m);
      wn[k] = wk;
      z += wk;
    }
    T* o = out + n * p.ld_out;
    for (int d = 0; d < dh; ++d) o[d] = T(0);
    for (int k = 0; k < K; ++k) {
      wn[k] /= z;
      const T* src = parts + n * p.ld_parts + int64_t(k) * dh;
      for (int d = 0; d < dh; ++d) o[d] += wn[k] * src[d];
    }
  }
}

template <class T>
void lse_combine_backward(T* dparts, const T* dout, const T* w, const LseCombineParams& p) {
  check_lse_combine(p, "lse_combine_backward");
  const int K = p.parts, dh = p.dh;
#pragma omp parallel for schedule(static) if (p.N * K * dh >= (int64_t(1) << 16))
  for (int64_t n = 0; n < p.N; ++n) {
    const T* g = dout + n * p.ld_out;
    for (int k = 0; k < K; ++k) {
      const T wk = w[n * K + k];
      T* dst = dparts + n * p.ld_parts + int64_t(k) * dh;
      if (p.accumulate)
        for (int d = 0; d < dh; ++d) dst[d] += wk * g[d];
      else
        for (int d = 0; d < dh; ++d) dst[d] = wk * g[d];
    }
  }
}

template void lse_combine_forward<float>(float*, float*, const float*, const float*,
                                         const LseCombineParams&);
template void lse_combine_forward<double>(double*, double*, const double*, const double*,
                                          const LseCombineParams&);
template void lse_combine_backward<float>(float*, const float*, const float*,
                                          const LseCombineParams&);
template void lse_combine_backward<double>(double*, const double*, const double*,
                                           const LseCombineParams&);

}  // namespace reformer::cpu
