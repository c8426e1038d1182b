// CPU optimizer updates: AdamW and Adafactor against explicit formulas.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/optimizer.h"
#include "tests/common/gradcheck.h"

namespace reformer {
namespace {

using Vec = std::vector<double>;

using test::random_vec;

// The reference recurrences below are written in double from the parameter
// structs' float fields, as the op does; results agree to double rounding.
constexpr double kTol = 1e-13;

TEST(AdamW, MatchesScalarRecurrenceOverThreeSteps) {
  const int n = 5;
  AdamWParams p;
  p.lr = 0.01f;
  p.beta1 = 0.9f;
  p.beta2 = 0.99f;
  p.eps = 1e-6f;
  p.weight_decay = 0.1f;
  Vec param = random_vec(n, 1), m(n, 0.0), v(n, 0.0);
  Vec ref_param = param, ref_m = m, ref_v = v;
  for (int step = 1; step <= 3; ++step) {
    const Vec g = random_vec(n, uint64_t(10 + step));
    p.step = step;
    cpu::adamw_update(param.data(), g.data(), m.data(), v.data(), n, p);
    const double b1 = p.beta1, b2 = p.beta2;
    for (int i = 0; i < n; ++i) {
      ref_m[i] = b1 * ref_m[i] + (1 - b1) * g[i];
      ref_v[i] = b2 * ref_v[i] + (1 - b2) * g[i] * g[i];
      const double mhat = ref_m[i] / (1 - std::pow(b1, step));
      const double vhat = ref_v[i] / (1 - std::pow(b2, step));
      ref_param[i] -= double(p.lr) * (mhat / (std::sqrt(vhat) + double(p.eps)) +
                                      double(p.weight_decay) * ref_param[i]);
    }
  }
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(m[i], ref_m[i], kTol);
    EXPECT_NEAR(v[i], ref_v[i], kTol);
    EXPECT_NEAR(param[i], ref_param[i], kTol);
  }
}

TEST(AdamW, FirstStepMovesEachWeightByAboutLr) {
  // With zero state, step 1 gives mhat = g and vhat = g^2: the step is lr * sign(g).
  AdamWParams p;
  p.lr = 0.05f;
  std::vector<float> param(3, 1.0f), m(3, 0.0f), v(3, 0.0f);
  const std::vector<float> g = {0.3f, -2.0f, 1e-3f};
  cpu::adamw_update(param.data(), g.data(), m.data(), v.data(), 3, p);
  EXPECT_NEAR(param[0], 0.95f, 1e-6);
  EXPECT_NEAR(param[1], 1.05f, 1e-6);
  EXPECT_NEAR(param[2], 0.95f, 1e-4);  // eps = 1e-8 is visible next to |g| = 1e-3
}

// Explicit Adafactor step on a [rows, cols] tensor (factored when both > 1).
struct AdafactorRef {
  int64_t rows, cols;
  Vec param, m, vr, vc;

  void step(const Vec& g, const AdafactorParams& p) {
    const int64_t n = rows * cols;
    const double beta2t = 1 - std::pow(double(p.step), -double(p.decay_rate));
    Vec g2(static_cast<size_t>(n)), vhat(static_cast<size_t>(n)), u(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) g2[i] = g[i] * g[i] + double(p.eps1);
    if (rows > 1 && cols > 1) {
      for (int64_t r = 0; r < rows; ++r) {
        double s = 0;
        for (int64_t c = 0; c < cols; ++c) s += g2[r * cols + c];
        vr[r] = beta2t * vr[r] + (1 - beta2t) * s / double(cols);
      }
      for (int64_t c = 0; c < cols; ++c) {
        double s = 0;
        for (int64_t r = 0; r < rows; ++r) s += g2[r * cols + c];
        vc[c] = beta2t * vc[c] + (1 - beta2t) * s / double(rows);
      }
      double mean_vr = 0;
      for (double x : vr) mean_vr += x;
      mean_vr /= double(rows);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) vhat[r * cols + c] = vr[r] * vc[c] / mean_vr;
    } else {
      for (int64_t i = 0; i < n; ++i) vhat[i] = vr[i] = beta2t * vr[i] + (1 - beta2t) * g2[i];
    }
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      u[i] = g[i] / std::sqrt(vhat[i]);
      sq += u[i] * u[i];
    }
    const double clip = std::max(1.0, std::sqrt(sq / double(n)) / double(p.clip_threshold));
    for (int64_t i = 0; i < n; ++i) {
      u[i] /= clip;
      if (p.beta1 > 0) {
        m[i] = double(p.beta1) * m[i] + (1 - double(p.beta1)) * u[i];
        u[i] = m[i];
      }
      param[i] -= double(p.lr) * (u[i] + double(p.weight_decay) * param[i]);
    }
  }
};

void check_adafactor(int64_t rows, int64_t cols, float beta1, float weight_decay, int steps) {
  const bool factored = rows > 1 && cols > 1;
  const int64_t n = rows * cols;
  AdafactorParams p;
  p.lr = 0.01f;
  p.beta1 = beta1;
  p.weight_decay = weight_decay;
  AdafactorRef ref{rows, cols, random_vec(n, 1), Vec(size_t(n), 0.0),
                   Vec(size_t(factored ? rows : n), 0.0), Vec(size_t(cols), 0.0)};
  Vec param = ref.param, m = ref.m, vr = ref.vr, vc = ref.vc;
  for (int step = 1; step <= steps; ++step) {
    p.step = step;
    // Uneven magnitudes so that the factored estimate differs from g^2.
    Vec g = random_vec(n, uint64_t(20 + step));
    for (int64_t i = 0; i < n; ++i) g[i] *= double(1 + i % 3);
    cpu::adafactor_update(param.data(), g.data(), m.data(), vr.data(), vc.data(), rows, cols, p);
    ref.step(g, p);
  }
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(param[i], ref.param[i], kTol) << i;
    if (beta1 > 0) {
      EXPECT_NEAR(m[i], ref.m[i], kTol) << i;
    }
  }
  for (size_t i = 0; i < vr.size(); ++i) EXPECT_NEAR(vr[i], ref.vr[i], kTol * (1 + ref.vr[i]));
  if (factored) {
    for (size_t i = 0; i < vc.size(); ++i) EXPECT_NEAR(vc[i], ref.vc[i], kTol * (1 + ref.vc[i]));
  }
}

TEST(Adafactor, FactoredMatchesExplicitFormula) { check_adafactor(3, 4, 0.0f, 0.0f, 2); }

TEST(Adafactor, FactoredWithMomentumAndDecay) { check_adafactor(3, 4, 0.9f, 0.1f, 3); }

TEST(Adafactor, UnfactoredVectorMatchesExplicitFormula) {
  check_adafactor(1, 5, 0.0f, 0.0f, 2);
  check_adafactor(5, 1, 0.9f, 0.0f, 2);
}

TEST(Adafactor, UnfactoredFirstStepIsSignOfGradient) {
  // Step 1: beta2t = 0, so v = g^2 + eps1 and u = g / |g|; rms(u) = 1, no clipping.
  AdafactorParams p;
  p.lr = 0.1f;
  Vec param(4, 0.0), m(4, 0.0), vr(4, 0.0), vc(1, 0.0);
  const Vec g = {0.5, -3.0, 2e-3, -1e-4};
  cpu::adafactor_update(param.data(), g.data(), m.data(), vr.data(), vc.data(), 1, 4, p);
  const double lr = double(p.lr);
  EXPECT_NEAR(param[0], -lr, 1e-12);
  EXPECT_NEAR(param[1], lr, 1e-12);
  EXPECT_NEAR(param[2], -lr, 1e-12);
  EXPECT_NEAR(param[3], lr, 1e-12);
}

TEST(Adafactor, UpdateClippingEngagesForTinyThreshold) {
  // With clipping, the applied update u has RMS exactly clip_threshold.
  for (int64_t rows : {1, 3}) {
    const int64_t cols = 4, n = rows * cols;
    AdafactorParams p;
    p.lr = 1.0f;
    p.clip_threshold = 1e-3f;
    p.step = 1;
    Vec param(size_t(n), 0.0), m(size_t(n), 0.0), vr(size_t(n), 0.0), vc(size_t(cols), 0.0);
    const Vec g = random_vec(n, 7);
    cpu::adafactor_update(param.data(), g.data(), m.data(), vr.data(), vc.data(), rows, cols, p);
    double sq = 0;
    for (double x : param) sq += x * x;  // param moved by -lr * u from zero
    EXPECT_NEAR(std::sqrt(sq / double(n)), double(p.clip_threshold), 1e-12) << rows;
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(param[i] < 0, g[i] > 0) << i;
  }
}

TEST(Adafactor, FloatMatchesDouble) {
  const int64_t rows = 3, cols = 5, n = rows * cols;
  AdafactorParams p;
  p.beta1 = 0.9f;
  const Vec g = random_vec(n, 8), param0 = random_vec(n, 9);
  Vec pd = param0, md(n, 0.0), vrd(rows, 0.0), vcd(cols, 0.0);
  std::vector<float> pf(param0.begin(), param0.end()), mf(n, 0.f), vrf(rows, 0.f), vcf(cols, 0.f);
  const std::vector<float> gf(g.begin(), g.end());
  for (int step = 1; step <= 2; ++step) {
    p.step = step;
    cpu::adafactor_update(pd.data(), g.data(), md.data(), vrd.data(), vcd.data(), rows, cols, p);
    cpu::adafactor_update(pf.data(), gf.data(), mf.data(), vrf.data(), vcf.data(), rows, cols, p);
  }
  // fp32 rounding of inputs and state (~1e-7 relative) on O(1) values, update lr = 1e-3.
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(pf[i], pd[i], 1e-6) << i;
}

}  // namespace
}  // namespace reformer
