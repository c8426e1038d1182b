// AdamW and Adafactor parameter updates (CPU reference). Contracts as in
// kernels/ops.h and the parameter structs in kernels/common/params.h.
//
// Reductions (Adafactor's row/column means and update RMS) are accumulated in
// double over a fixed partition (per row, then rows in order), so results do
// not depend on the thread count.
#include "kernels/cpu/optimizer.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace reformer::cpu {

namespace {
constexpr int64_t kParallelMin = 1 << 14;
constexpr int64_t kColBlock = 64;  // columns per task for column means
}  // namespace

// m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
// param -= lr * (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd * param).
template <class T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWParams& p) {
  const T b1 = T(p.beta1), b2 = T(p.beta2), lr = T(p.lr), eps = T(p.eps), wd = T(p.weight_decay);
  const T bc1 = T(1.0 - std::pow(double(p.beta1), double(p.step)));
  const T bc2 = T(1.0 - std::pow(double(p.beta2), double(p.step)));
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T g = grad[i];
    m[i] = b1 * m[i] + (T(1) - b1) * g;
    v[i] = b2 * v[i] + (T(1) - b2) * g * g;
    const T mhat = m[i] / bc1;
    const T vhat = v[i] / bc2;
    param[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * param[i]);
  }
}

// Adafactor without parameter scaling (as trax's Adafactor with
// multiply_by_parameter_scale=False):
//   beta2t = 1 - t^(-decay_rate), g2 = g^2 + eps1,
//   factored:   vr = beta2t vr + (1-beta2t) rowmean(g2), vc likewise with colmean,
//               vhat_ij = vr_i vc_j / mean(vr);
//   unfactored: v = beta2t v + (1-beta2t) g2, vhat = v;
//   u = g / sqrt(vhat), u /= max(1, rms(u) / clip_threshold),
//   if beta1 > 0: m = beta1 m + (1-beta1) u, u = m;
//   param -= lr * (u + wd * param).
// The second moments are stored in T; vhat and u are formed in double.
template <class T>
void adafactor_update(T* param, const T* grad, T* m, T* vr, T* vc, int64_t rows, int64_t cols,
                      const AdafactorParams& p) {
  const int64_t n = rows * cols;
  if (n <= 0) return;
  const double beta2t = 1.0 - std::pow(double(p.step), -double(p.decay_rate));
  const double eps1 = double(p.eps1);
  const bool factored = rows > 1 && cols > 1;
  const bool parallel = n >= kParallelMin;
  auto g2 = [&](int64_t i) { return double(grad[i]) * double(grad[i]) + eps1; };

  // Second-moment estimate, and the per-element preconditioner 1/sqrt(vhat).
  double vr_mean = 0.0;
  if (factored) {
#pragma omp parallel for if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0.0;
      for (int64_t c = 0; c < cols; ++c) s += g2(r * cols + c);
      vr[r] = T(beta2t * double(vr[r]) + (1.0 - beta2t) * (s / double(cols)));
    }
    const int64_t blocks = (cols + kColBlock - 1) / kColBlock;
#pragma omp parallel for if (parallel)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kColBlock, c1 = std::min(cols, c0 + kColBlock);
      double s[kColBlock] = {};
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = c0; c < c1; ++c) s[c - c0] += g2(r * cols + c);
      }
      for (int64_t c = c0; c < c1; ++c) {
        vc[c] = T(beta2t * double(vc[c]) + (1.0 - beta2t) * (s[c - c0] / double(rows)));
      }
    }
    for (int64_t r = 0; r < rows; ++r) vr_mean += double(vr[r]);
    vr_mean /= double(rows);
  } else {
#pragma omp parallel for if (parallel)
    for (int64_t i = 0; i < n; ++i) vr[i] = T(beta2t * double(vr[i]) + (1.0 - beta2t) * g2(i));
  }
  auto raw_update = [&](int64_t r, int64_t c) {
    const int64_t i = r * cols + c;
    const double vhat = factored ? double(vr[r]) * double(vc[c]) / vr_mean : double(vr[i]);
    return double(grad[i]) / std::sqrt(vhat);
  };

  // Update clipping: scale u so that its RMS is at most clip_threshold.
  std::vector<double> row_sq(size_t(rows), 0.0);
#pragma omp parallel for if (parallel)
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const double u = raw_update(r, c);
      s += u * u;
    }
    row_sq[size_t(r)] = s;
  }
  double sq = 0.0;
  for (double s : row_sq) sq += s;
  const double rms = std::sqrt(sq / double(n));
  const double inv_clip = 1.0 / std::max(1.0, rms / double(p.clip_threshold));

  const double beta1 = double(p.beta1), lr = double(p.lr), wd = double(p.weight_decay);
#pragma omp parallel for if (parallel)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      double u = raw_update(r, c) * inv_clip;
      if (beta1 > 0.0) {
        m[i] = T(beta1 * double(m[i]) + (1.0 - beta1) * u);
        u = double(m[i]);
      }
      param[i] = T(double(param[i]) - lr * (u + wd * double(param[i])));
    }
  }
}

#define REFORMER_INSTANTIATE(T)                                                              \
  template void adamw_update<T>(T*, const T*, T*, T*, int64_t, const AdamWParams&);          \
  template void adafactor_update<T>(T*, const T*, T*, T*, T*, int64_t, int64_t,              \
                                    const AdafactorParams&);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
