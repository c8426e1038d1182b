// Attention of one decoding step (CPU reference and test oracle).
//
// For head h and set r (u = h * rounds + r) with positions j in the set:
//   s_j = q_h . k_hat_j,  k_hat_j = k_j / sqrt(|k_j|^2 + kKeyNormEps)
// (computed as (q_h . k_j) / sqrt(...), equal up to rounding),
// set (not added) to kCausalMaskValue when causal and j > q_pos, else to
// kSelfMaskValue when j == q_pos, as the training-time attention scores;
//   lse_u = log sum_j exp(s_j),  out_u = sum_j exp(s_j - lse_u) v_j,
//   out_h = sum_r exp(lse_u - logsumexp_r lse_u) out_u.
// An empty set has lse = -inf and weight 0. Each head is computed by one
// thread in a fixed order, so results do not depend on the thread count.
#include "kernels/cpu/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/common/decode_attention_checks.h"

namespace reformer::cpu {

namespace {

// Below this many multiply-adds a call runs on one thread.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

}  // namespace

template <class T>
void decode_attention(T* out, const T* q, const T* k, const T* v, const int32_t* sets,
                      const int32_t* keys, const DecodeAttentionParams& p) {
  check_decode_attention(p);
  const int dh = p.dh, R = p.rounds;
  int64_t work = 0;
  for (int64_t u = 0; u < int64_t(p.heads) * R; ++u) work += int64_t(sets[2 * u + 1]) * dh;
  const T neg_inf = -std::numeric_limits<T>::infinity();
#pragma omp parallel if (work >= kMinParallelWork)
  {
    std::vector<T> s, out_r(size_t(R) * size_t(dh)), lse(static_cast<size_t>(R));
#pragma omp for schedule(static)
    for (int h = 0; h < p.heads; ++h) {
      const T* qh = q + int64_t(h) * dh;
      for (int r = 0; r < R; ++r) {
        const int64_t u = int64_t(h) * R + r;
        const int32_t* set = keys + sets[2 * u];
        const int64_t n = sets[2 * u + 1];
        T* o = out_r.data() + size_t(r) * size_t(dh);
        std::fill(o, o + dh, T(0));
        lse[size_t(r)] = neg_inf;
        if (n <= 0) continue;
        s.resize(size_t(n));
        T m = neg_inf;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = set[t];
          const T* kj = k + j * p.ld + int64_t(h) * dh;
          T kk = T(0), qkj = T(0);
          for (int d = 0; d < dh; ++d) {
            kk += kj[d] * kj[d];
            qkj += qh[d] * kj[d];
          }
          qkj /= std::sqrt(kk + T(kKeyNormEps));  // q . k_hat, one division per key
          if (p.causal && j > p.q_pos) qkj = T(kCausalMaskValue);
          else if (j == p.q_pos) qkj = T(kSelfMaskValue);
          s[size_t(t)] = qkj;
          m = std::max(m, qkj);
        }
        T sum = T(0);
        for (int64_t t = 0; t < n; ++t) {
          s[size_t(t)] = std::exp(s[size_t(t)] - m);
          sum += s[size_t(t)];
        }
        for (int64_t t = 0; t < n; ++t) {
          const T w = s[size_t(t)] / sum;
          const T* vj = v + int64_t(set[t]) * p.ld + int64_t(h) * dh;
          for (int d = 0; d < dh; ++d) o[d] += w * vj[d];
        }
        lse[size_t(r)] = m + std::log(sum);
      }
      // Combine the sets by their log-sum-exp (shifted by the largest).
      T* oh = out + int64_t(h) * dh;
      std::fill(oh, oh + dh, T(0));
      const T mx = *std::max_element(lse.begin(), lse.end());
      if (mx == neg_inf) continue;
      T z = T(0);
      for (int r = 0; r < R; ++r) z += std::exp(lse[size_t(r)] - mx);
      for (int r = 0; r < R; ++r) {
        const T w = std::exp(lse[size_t(r)] - mx) / z;
        const T* o = out_r.data() + size_t(r) * size_t(dh);
        for (int d = 0; d < dh; ++d) oh[d] += w * o[d];
      }
    }
  }
}

template void decode_attention<float>(float*, const float*, const float*, const float*,
                                      const int32_t*, const int32_t*,
                                      const DecodeAttentionParams&);
template void decode_attention<double>(double*, const double*, const double*, const double*,
                                       const int32_t*, const int32_t*,
                                       const DecodeAttentionParams&);

}  // namespace reformer::cpu
