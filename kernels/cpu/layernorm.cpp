// LayerNorm over the last dimension (CPU reference). Contracts as in kernels/ops.h.
//
// Row statistics are accumulated in double (biased variance, two passes).
// The weight and bias gradients are split over columns, so every gradient
// element is summed by one thread in row order whatever the thread count.
#include "kernels/cpu/layernorm.h"

#include <algorithm>
#include <cmath>

namespace reformer::cpu {

namespace {
constexpr int64_t kParallelMin = 1 << 14;  // elements below which one thread does the work
constexpr int kColBlock = 64;              // columns per task for dw, db
}  // namespace

template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int64_t N,
                       int C, float eps) {
#pragma omp parallel for if (N * C >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = inp + n * C;
    double m = 0.0;
    for (int c = 0; c < C; ++c) m += double(x[c]);
    m /= C;
    double var = 0.0;
    for (int c = 0; c < C; ++c) {
      const double d = double(x[c]) - m;
      var += d * d;
    }
    var /= C;
    const double r = 1.0 / std::sqrt(var + double(eps));
    T* o = out + n * C;
    for (int c = 0; c < C; ++c) o[c] = T((double(x[c]) - m) * r * double(w[c]) + double(b[c]));
    mean[n] = T(m);
    rstd[n] = T(r);
  }
}

// With xhat = (x - mean) * rstd and g = dout * w:
//   dinp += rstd * (g - mean(g) - xhat * mean(g * xhat)),
//   dw += sum_n dout * xhat,  db += sum_n dout.
template <class T>
void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w,
                        const T* mean, const T* rstd, int64_t N, int C) {
  if (dinp) {
#pragma omp parallel for if (N * C >= kParallelMin)
    for (int64_t n = 0; n < N; ++n) {
      const T* x = inp + n * C;
      const T* g = dout + n * C;
      const double m = double(mean[n]), r = double(rstd[n]);
      double g_mean = 0.0, gx_mean = 0.0;
      for (int c = 0; c < C; ++c) {
        const double gw = double(g[c]) * double(w[c]);
        g_mean += gw;
        gx_mean += gw * (double(x[c]) - m) * r;
      }
      g_mean /= C;
      gx_mean /= C;
      T* d = dinp + n * C;
      for (int c = 0; c < C; ++c) {
        const double xhat = (double(x[c]) - m) * r;
        const double gw = double(g[c]) * double(w[c]);
        d[c] += T(r * (gw - g_mean - xhat * gx_mean));
      }
    }
  }
  if (dw || db) {
    const int blocks = (C + kColBlock - 1) / kColBlock;
#pragma omp parallel for if (N * C >= kParallelMin)
    for (int blk = 0; blk < blocks; ++blk) {
      const int c0 = blk * kColBlock;
      const int c1 = std::min(C, c0 + kColBlock);
      double sw[kColBlock] = {}, sb[kColBlock] = {};
      for (int64_t n = 0; n < N; ++n) {
        const T* x = inp + n * C;
        const T* g = dout + n * C;
        const double m = double(mean[n]), r = double(rstd[n]);
        for (int c = c0; c < c1; ++c) {
          sw[c - c0] += double(g[c]) * ((double(x[c]) - m) * r);
          sb[c - c0] += double(g[c]);
        }
      }
      for (int c = c0; c < c1; ++c) {
        if (dw) dw[c] += T(sw[c - c0]);
        if (db) db[c] += T(sb[c - c0]);
      }
    }
  }
}

#define REFORMER_INSTANTIATE(T)                                                                   \
  template void layernorm_forward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int,      \
                                     float);                                                      \
  template void layernorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,         \
                                      const T*, int64_t, int);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
