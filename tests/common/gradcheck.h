// Central finite differences for the backward checks (double precision).
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace reformer::test {

// Fills x with deterministic values in [-scale, scale] from a simple LCG.
inline void fill_random(double* x, int64_t n, uint64_t seed, double scale = 1.0) {
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x[i] = scale * (double((s >> 11) & ((1ull << 53) - 1)) / double(1ull << 53) * 2.0 - 1.0);
  }
}

// n deterministic values in [-scale, scale].
inline std::vector<double> random_vec(int64_t n, uint64_t seed, double scale = 1.0) {
  std::vector<double> v(static_cast<size_t>(n));
  fill_random(v.data(), n, seed, scale);
  return v;
}

// Numerical gradient of a scalar function f() with respect to x[0..n):
// (f(x + h e_i) - f(x - h e_i)) / 2h. x is restored.
inline std::vector<double> numeric_grad(const std::function<double()>& f, double* x, int64_t n,
                                        double h = 1e-6) {
  std::vector<double> g(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f();
    x[i] = x0 - h;
    const double fm = f();
    x[i] = x0;
    g[size_t(i)] = (fp - fm) / (2 * h);
  }
  return g;
}

// Largest |a - b| / (atol + |b|) over the arrays: <= 1 means within
// tolerance |a - b| <= atol_rel * (atol + |b|). Used as
// EXPECT_LE(max_rel_err(analytic, numeric, 1e-8), 1e-6).
inline double max_rel_err(const double* a, const double* b, int64_t n, double atol) {
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(a[i] - b[i]) / (atol + std::fabs(b[i])));
  return worst;
}

}  // namespace reformer::test
