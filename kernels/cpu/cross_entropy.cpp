// Softmax cross-entropy over rows of logits, and row argmax (CPU reference).
// Contracts as in kernels/ops.h.
//
// Each row is max-subtracted before exponentiation and reduced in double.
// A row is read completely before its gradient is written, which is what
// makes dlogits == logits safe.
#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>

namespace reformer::cpu {

namespace {
constexpr int64_t kParallelMin = 1 << 14;
}  // namespace

template <class T>
void softmax_cross_entropy(T* loss, T* dlogits, const T* logits, const int32_t* targets, int64_t N,
                           int V, T grad_scale) {
#pragma omp parallel for if (N * V >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * V;
    const int32_t t = targets[n];
    if (t < 0) {
      if (loss) loss[n] = T(0);
      if (dlogits) {
        T* d = dlogits + n * V;
        for (int v = 0; v < V; ++v) d[v] = T(0);
      }
      continue;
    }
    double mx = double(x[0]);
    for (int v = 1; v < V; ++v) mx = std::max(mx, double(x[v]));
    double sum = 0.0;
    for (int v = 0; v < V; ++v) sum += std::exp(double(x[v]) - mx);
    const double lse = mx + std::log(sum);
    if (loss) loss[n] = T(lse - double(x[t]));
    if (dlogits) {
      T* d = dlogits + n * V;
      const double gs = double(grad_scale);
      for (int v = 0; v < V; ++v) {
        const double p = std::exp(double(x[v]) - lse);
        d[v] = T((p - (v == t ? 1.0 : 0.0)) * gs);
      }
    }
  }
}

template <class T>
void argmax_rows(int32_t* out, const T* logits, int64_t N, int V) {
#pragma omp parallel for if (N * V >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * V;
    int best = 0;
    for (int v = 1; v < V; ++v) {
      if (x[v] > x[best]) best = v;
    }
    out[n] = best;
  }
}

#define REFORMER_INSTANTIATE(T)                                                             \
  template void softmax_cross_entropy<T>(T*, T*, const T*, const int32_t*, int64_t, int, T); \
  template void argmax_rows<T>(int32_t*, const T*, int64_t, int);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
