// CPU dense ops: matmul, layernorm, activations, embedding.
//
// Backward passes are checked against central finite differences in double
// on the scalar loss sum(out * r) with random r, at small odd sizes.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/common/gemm_staging.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/ffn.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/layernorm_project.h"
#include "kernels/cpu/matmul.h"
#include "tests/common/gradcheck.h"

namespace reformer {
namespace {

using test::fill_random;
using test::max_rel_err;
using test::numeric_grad;
using Vec = std::vector<double>;

// Central differences with h = 1e-6 in double: truncation error ~h^2 * f'''
// ~1e-12, rounding error ~eps * |loss| / h ~1e-9 for losses of order 1. So
// analytic and numeric gradients must agree to 1e-6 relative, with an
// absolute floor of 1e-8 (atol 1e-2 at rtol 1e-6) for entries near zero.
constexpr double kFdRtol = 1e-6;
constexpr double kFdAtol = 1e-2;

using test::random_vec;

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Expects the analytic gradient of loss() with respect to x to match central
// differences.
void expect_fd_match(const std::function<double()>& loss, Vec& x, const Vec& analytic,
                     const char* what) {
  const Vec numeric = numeric_grad(loss, x.data(), int64_t(x.size()));
  EXPECT_LE(max_rel_err(analytic.data(), numeric.data(), int64_t(x.size()), kFdAtol), kFdRtol)
      << what;
}

// Expects b == 2 * a to double rounding (the accumulate contract after two calls).
void expect_twice(const Vec& once, const Vec& twice, const char* what) {
  ASSERT_EQ(once.size(), twice.size());
  for (size_t i = 0; i < once.size(); ++i) {
    EXPECT_NEAR(twice[i], 2 * once[i], 1e-12 * (1 + std::fabs(once[i]))) << what << " [" << i << "]";
  }
}

// ---------------------------------------------------------------- matmul

template <class T>
std::vector<T> naive_matmul(const std::vector<T>& inp, const std::vector<T>& w, const T* bias,
                            int N, int C, int OC) {
  std::vector<T> out(size_t(N) * OC);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OC; ++o) {
      double s = bias ? double(bias[o]) : 0.0;
      for (int c = 0; c < C; ++c) s += double(inp[size_t(n) * C + c]) * double(w[size_t(c) * OC + o]);
      out[size_t(n) * OC + o] = T(s);
    }
  return out;
}

template <class T>
std::vector<T> cast(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class T>
void check_matmul_forward(int N, int C, int OC, bool with_bias, double rtol) {
  const auto inp = cast<T>(random_vec(int64_t(N) * C, 1));
  const auto w = cast<T>(random_vec(int64_t(C) * OC, 2));
  const auto bias = cast<T>(random_vec(OC, 3));
  const T* b = with_bias ? bias.data() : nullptr;
  std::vector<T> out(size_t(N) * OC, T(123));
  cpu::matmul_forward(out.data(), inp.data(), w.data(), b, N, C, OC);
  const auto ref = naive_matmul(inp, w, b, N, C, OC);
  for (size_t i = 0; i < out.size(); ++i) {
    // Each element is a sum of C products of magnitude <= 1.
    EXPECT_NEAR(double(out[i]), double(ref[i]), rtol * (C + 1)) << "element " << i;
  }
}

TEST(MatmulForward, MatchesNaiveFloat) {
  // fp32 sums of C terms: rounding error <= C * 2^-24 per unit magnitude.
  check_matmul_forward<float>(5, 7, 3, true, 1e-6);
  check_matmul_forward<float>(5, 7, 3, false, 1e-6);
}

TEST(MatmulForward, MatchesNaiveDouble) {
  check_matmul_forward<double>(5, 7, 3, true, 1e-14);
  check_matmul_forward<double>(5, 7, 3, false, 1e-14);
}

TEST(MatmulForward, MatchesNaiveAcrossBlockEdges) {
  // Sizes that leave remainders in every blocking dimension (rows, columns, k).
  check_matmul_forward<float>(97, 131, 263, true, 1e-6);
  check_matmul_forward<double>(37, 301, 11, true, 1e-14);
}

// A residual branch added (alpha 1) or taken away (alpha -1): the same bits
// as matmul_forward into a buffer and then add / sub, with and without bias,
// at sizes that leave remainders in every blocking dimension and at N = 1.
TEST(MatmulAccumulate, EqualsForwardThenAddOrSub) {
  for (const auto& [N, C, OC] : {std::tuple<int, int, int>{97, 131, 263}, {1, 64, 3}}) {
    std::vector<float> inp(size_t(N) * C), w(size_t(C) * OC), bias(static_cast<size_t>(OC)),
        x(size_t(N) * OC);
    uint32_t seed = 1;
    for (auto* v : {&inp, &w, &bias, &x})
      for (float& e : *v) {
        seed = seed * 1664525u + 1013904223u;
        e = float(int32_t(seed >> 9) % 1999 - 999) / 1000.0f;
      }
    for (bool with_bias : {true, false})
      for (float alpha : {1.0f, -1.0f}) {
        const float* b = with_bias ? bias.data() : nullptr;
        std::vector<float> want = x, branch(size_t(N) * OC), got = x;
        cpu::matmul_forward(branch.data(), inp.data(), w.data(), b, N, C, OC);
        for (size_t i = 0; i < want.size(); ++i)
          want[i] = alpha > 0 ? want[i] + branch[i] : want[i] - branch[i];
        cpu::matmul_accumulate(got.data(), inp.data(), w.data(), b, N, C, OC, alpha);
        EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)))
            << "N=" << N << " bias=" << with_bias << " alpha=" << alpha;
        EXPECT_NE(got, x);  // the branch did something
        // Onto a residual elsewhere: the same bits, res left alone, out's
        // old values unread.
        std::vector<float> res = x, elsewhere(size_t(N) * OC, 7.0f);
        cpu::matmul_accumulate(elsewhere.data(), inp.data(), w.data(), b, N, C, OC, alpha,
                               res.data());
        EXPECT_EQ(0, std::memcmp(want.data(), elsewhere.data(), want.size() * sizeof(float)));
        EXPECT_EQ(res, x);
      }
  }
}

struct MatmulCase {
  int N = 5, C = 7, OC = 3;
  Vec inp = random_vec(int64_t(N) * C, 11);
  Vec w = random_vec(int64_t(C) * OC, 12);
  Vec bias = random_vec(OC, 13);
  Vec r = random_vec(int64_t(N) * OC, 14);  // dloss/dout

  double loss() {
    Vec out(size_t(N) * OC);
    cpu::matmul_forward(out.data(), inp.data(), w.data(), bias.data(), N, C, OC);
    return dot(out, r);
  }
  void backward(double* dinp, double* dw, double* dbias, bool add_dinp = true) {
    cpu::matmul_backward(dinp, dw, dbias, r.data(), inp.data(), w.data(), N, C, OC, add_dinp);
  }
};

// An on/off switch (REFORMER_GEMM_TUNING, REFORMER_GEMM_EPILOGUES): on by
// default, off by "off" or "0", and any other
// value refused with a message naming the variable.
TEST(GemmTuning, ReadsTheEnvironmentValue) {
  const char* name = "REFORMER_GEMM_TUNING";
  EXPECT_TRUE(switch_from_env(name, nullptr));
  EXPECT_TRUE(switch_from_env(name, ""));
  EXPECT_TRUE(switch_from_env(name, "on"));
  EXPECT_TRUE(switch_from_env(name, "1"));
  EXPECT_FALSE(switch_from_env(name, "off"));
  EXPECT_FALSE(switch_from_env(name, "0"));
  try {
    switch_from_env(name, "false");
    ADD_FAILURE() << "no error for 'false'";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'false'"), std::string::npos) << e.what();
  }
}

TEST(MatmulBackward, FiniteDifference) {
  MatmulCase m;
  Vec dinp(m.inp.size()), dw(m.w.size()), dbias(m.bias.size());
  m.backward(dinp.data(), dw.data(), dbias.data());
  auto loss = [&] { return m.loss(); };
  expect_fd_match(loss, m.inp, dinp, "dinp");
  expect_fd_match(loss, m.w, dw, "dw");
  expect_fd_match(loss, m.bias, dbias, "dbias");
}

TEST(MatmulBackward, Accumulates) {
  MatmulCase m;
  Vec dinp1(m.inp.size()), dw1(m.w.size()), db1(m.bias.size());
  m.backward(dinp1.data(), dw1.data(), db1.data());
  Vec dinp2(m.inp.size()), dw2(m.w.size()), db2(m.bias.size());
  m.backward(dinp2.data(), dw2.data(), db2.data());
  m.backward(dinp2.data(), dw2.data(), db2.data());
  expect_twice(dinp1, dinp2, "dinp");
  expect_twice(dw1, dw2, "dw");
  expect_twice(db1, db2, "dbias");
}

// add_dinp = false writes dinp (whatever it held) and still adds dw, dbias.
TEST(MatmulBackward, WritesDinpWhenNotAdding) {
  MatmulCase m;
  Vec dinp1(m.inp.size()), dw1(m.w.size()), db1(m.bias.size());
  m.backward(dinp1.data(), dw1.data(), db1.data());
  Vec dinp2(m.inp.size(), 123.0), dw2(m.w.size()), db2(m.bias.size());
  m.backward(dinp2.data(), dw2.data(), db2.data(), /*add_dinp=*/false);
  EXPECT_EQ(dinp2, dinp1);
  m.backward(dinp2.data(), dw2.data(), db2.data(), /*add_dinp=*/false);
  EXPECT_EQ(dinp2, dinp1);
  expect_twice(dw1, dw2, "dw");
  expect_twice(db1, db2, "dbias");
}

TEST(MatmulBackward, SkipsNullGradients) {
  MatmulCase m;
  Vec dinp(m.inp.size()), dw(m.w.size()), db(m.bias.size());
  m.backward(dinp.data(), dw.data(), db.data());
  Vec only_dw(m.w.size());
  m.backward(nullptr, only_dw.data(), nullptr);
  EXPECT_EQ(only_dw, dw);
  Vec only_dinp(m.inp.size()), only_db(m.bias.size());
  m.backward(only_dinp.data(), nullptr, only_db.data());
  EXPECT_EQ(only_dinp, dinp);
  EXPECT_EQ(only_db, db);
  m.backward(nullptr, nullptr, nullptr);  // nothing to do, nothing touched
}

// Forward and all three gradients, at sizes with several tasks per product.
template <class T>
std::vector<std::vector<T>> matmul_all(int threads) {
  const int N = 301, C = 133, OC = 270;
  const auto inp = cast<T>(random_vec(int64_t(N) * C, 21));
  const auto w = cast<T>(random_vec(int64_t(C) * OC, 22));
  const auto bias = cast<T>(random_vec(OC, 23));
  const auto dout = cast<T>(random_vec(int64_t(N) * OC, 24));
  std::vector<T> out(size_t(N) * OC), dinp(size_t(N) * C, T(0.5)), dw(size_t(C) * OC, T(0.25)),
      db(size_t(OC), T(1));
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  cpu::matmul_forward(out.data(), inp.data(), w.data(), bias.data(), N, C, OC);
  cpu::matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), N, C,
                       OC);
  omp_set_num_threads(saved);
  return {out, dinp, dw, db};
}

TEST(Matmul, DeterministicAcrossThreadCounts) {
  // Bitwise equality: every output element is reduced by one thread in a fixed order.
  EXPECT_EQ(matmul_all<float>(1), matmul_all<float>(2));
  EXPECT_EQ(matmul_all<float>(1), matmul_all<float>(3));
  EXPECT_EQ(matmul_all<double>(1), matmul_all<double>(2));
}

// ---------------------------------------------------------------- layernorm

struct LayernormCase {
  int N = 5, C = 7;
  float eps = 1e-5f;
  Vec inp = random_vec(int64_t(N) * C, 31, 2.0);
  Vec w = random_vec(C, 32);
  Vec b = random_vec(C, 33);
  Vec r = random_vec(int64_t(N) * C, 34);
  Vec out = Vec(size_t(N) * C), mean = Vec(size_t(N)), rstd = Vec(size_t(N));

  double loss() {
    cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(),
                           N, C, eps);
    return dot(out, r);
  }
  void backward(double* dinp, double* dw, double* db) {
    loss();  // refresh the saved statistics
    cpu::layernorm_backward(dinp, dw, db, r.data(), inp.data(), w.data(), mean.data(),
                            rstd.data(), N, C);
  }
};

TEST(Layernorm, ForwardMatchesFormula) {
  LayernormCase ln;
  ln.loss();
  for (int n = 0; n < ln.N; ++n) {
    double m = 0, var = 0;
    for (int c = 0; c < ln.C; ++c) m += ln.inp[size_t(n * ln.C + c)];
    m /= ln.C;
    for (int c = 0; c < ln.C; ++c) var += std::pow(ln.inp[size_t(n * ln.C + c)] - m, 2);
    var /= ln.C;  // biased
    const double rs = 1 / std::sqrt(var + double(ln.eps));
    EXPECT_NEAR(ln.mean[size_t(n)], m, 1e-14);
    EXPECT_NEAR(ln.rstd[size_t(n)], rs, 1e-12 * rs);
    for (int c = 0; c < ln.C; ++c) {
      const double want = (ln.inp[size_t(n * ln.C + c)] - m) * rs * ln.w[size_t(c)] + ln.b[size_t(c)];
      EXPECT_NEAR(ln.out[size_t(n * ln.C + c)], want, 1e-12);
    }
  }
}

TEST(Layernorm, FloatMatchesDouble) {
  LayernormCase ln;
  ln.loss();
  const auto inp = cast<float>(ln.inp), w = cast<float>(ln.w), b = cast<float>(ln.b);
  std::vector<float> out(ln.out.size()), mean(ln.mean.size()), rstd(ln.rstd.size());
  cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(),
                         ln.N, ln.C, ln.eps);
  // Inputs are rounded to fp32 (2^-24 relative); outputs are O(1).
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], ln.out[i], 1e-5);
}

TEST(Layernorm, BackwardFiniteDifference) {
  LayernormCase ln;
  Vec dinp(ln.inp.size()), dw(ln.w.size()), db(ln.b.size());
  ln.backward(dinp.data(), dw.data(), db.data());
  auto loss = [&] { return ln.loss(); };
  expect_fd_match(loss, ln.inp, dinp, "dinp");
  expect_fd_match(loss, ln.w, dw, "dw");
  expect_fd_match(loss, ln.b, db, "db");
}

TEST(Layernorm, BackwardAccumulates) {
  LayernormCase ln;
  Vec dinp1(ln.inp.size()), dw1(ln.w.size()), db1(ln.b.size());
  ln.backward(dinp1.data(), dw1.data(), db1.data());
  Vec dinp2(ln.inp.size()), dw2(ln.w.size()), db2(ln.b.size());
  ln.backward(dinp2.data(), dw2.data(), db2.data());
  ln.backward(dinp2.data(), dw2.data(), db2.data());
  expect_twice(dinp1, dinp2, "dinp");
  expect_twice(dw1, dw2, "dw");
  expect_twice(db1, db2, "db");
}

TEST(Layernorm, BackwardSkipsNullGradients) {
  LayernormCase ln;
  Vec dinp(ln.inp.size()), dw(ln.w.size()), db(ln.b.size());
  ln.backward(dinp.data(), dw.data(), db.data());
  Vec only_dinp(ln.inp.size()), only_db(ln.b.size()), only_dw(ln.w.size());
  ln.backward(only_dinp.data(), nullptr, nullptr);
  ln.backward(nullptr, nullptr, only_db.data());
  ln.backward(nullptr, only_dw.data(), nullptr);
  EXPECT_EQ(only_dinp, dinp);
  EXPECT_EQ(only_db, db);
  EXPECT_EQ(only_dw, dw);
}

// ---------------------------------------------------------------- activations

double gelu_ref(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
}

TEST(Activation, ForwardMatchesFormula) {
  const Vec x = random_vec(9, 41, 3.0);
  Vec gelu(x.size()), relu(x.size());
  cpu::activation_forward(gelu.data(), x.data(), int64_t(x.size()), Activation::gelu);
  cpu::activation_forward(relu.data(), x.data(), int64_t(x.size()), Activation::relu);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_NEAR(gelu[i], gelu_ref(x[i]), 1e-15 * (1 + std::fabs(x[i])));
    EXPECT_EQ(relu[i], x[i] > 0 ? x[i] : 0.0);
  }
  std::vector<float> xf = cast<float>(x), gf(x.size());
  cpu::activation_forward(gf.data(), xf.data(), int64_t(x.size()), Activation::gelu);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(gf[i], gelu_ref(double(xf[i])), 1e-6);
}

void check_activation_fd(Activation act) {
  // Inputs kept away from 0 so ReLU's kink is not inside the difference stencil.
  Vec x = random_vec(11, 42, 3.0);
  for (double& v : x)
    if (std::fabs(v) < 0.1) v += 0.2;
  const Vec r = random_vec(11, 43);
  auto loss = [&] {
    Vec y(x.size());
    cpu::activation_forward(y.data(), x.data(), int64_t(x.size()), act);
    return dot(y, r);
  };
  Vec dx(x.size());
  cpu::activation_backward(dx.data(), r.data(), x.data(), int64_t(x.size()), act);
  expect_fd_match(loss, x, dx, act == Activation::gelu ? "gelu" : "relu");
}

TEST(Activation, GeluBackwardFiniteDifference) { check_activation_fd(Activation::gelu); }

TEST(Activation, ReluBackwardFiniteDifference) { check_activation_fd(Activation::relu); }

// The backward writes dinp: what it held before does not matter.
TEST(Activation, BackwardWrites) {
  const Vec x = random_vec(7, 44, 2.0), r = random_vec(7, 45);
  for (Activation act : {Activation::gelu, Activation::relu}) {
    Vec once(x.size()), twice(x.size(), -5.0);
    cpu::activation_backward(once.data(), r.data(), x.data(), 7, act);
    cpu::activation_backward(twice.data(), r.data(), x.data(), 7, act);
    EXPECT_EQ(once, twice);
    cpu::activation_backward(twice.data(), r.data(), x.data(), 7, act);
    EXPECT_EQ(once, twice);
  }
  cpu::activation_backward<double>(nullptr, r.data(), x.data(), 7, Activation::gelu);  // skipped
}

// ---------------------------------------------------------------- feed-forward block

// g = act(x @ w1 + b1) @ w2 + b2 over N rows; loss sum(out * r) after
// out = alpha g or out += alpha g.
struct FfnCase {
  int64_t N = 5;
  int C = 4, F = 6;
  Activation act = Activation::gelu;
  Vec x = random_vec(N * C, 61), w1 = random_vec(int64_t(C) * F, 62), b1 = random_vec(F, 63);
  Vec w2 = random_vec(int64_t(F) * C, 64), b2 = random_vec(C, 65), r = random_vec(N * C, 66);
  Vec h = Vec(size_t(N * F)), a = Vec(size_t(N * F));

  Vec forward(float alpha, bool accumulate) {
    Vec out = random_vec(N * C, 67);
    cpu::ffn_forward(out.data(), h.data(), a.data(), x.data(), w1.data(), b1.data(), w2.data(),
                     b2.data(), N, C, F, act, alpha, accumulate);
    return out;
  }
  double loss() { return dot(forward(1.0f, false), r); }
};

TEST(FeedForward, BackwardFiniteDifference) {
  for (Activation act : {Activation::gelu, Activation::relu}) {
    FfnCase f;
    f.act = act;
    f.forward(1.0f, false);
    Vec dx(f.x.size(), 7.0), dw1(f.w1.size()), db1(f.b1.size()), dw2(f.w2.size()),
        db2(f.b2.size());
    cpu::ffn_backward(dx.data(), dw1.data(), db1.data(), dw2.data(), db2.data(), f.r.data(),
                      f.x.data(), f.h.data(), f.a.data(), f.w1.data(), f.w2.data(), f.N, f.C, f.F,
                      act);
    // ReLU: random inputs of this size put no pre-activation within the
    // stencil's 1e-6 of its kink.
    auto loss = [&] { return f.loss(); };
    expect_fd_match(loss, f.x, dx, "dx (written over 7)");
    expect_fd_match(loss, f.w1, dw1, "dw1");
    expect_fd_match(loss, f.b1, db1, "db1");
    expect_fd_match(loss, f.w2, dw2, "dw2");
    expect_fd_match(loss, f.b2, db2, "db2");
  }
}

// Bitwise the separate ops it stands for, forward (written, added, taken
// away) and backward, in float.
TEST(FeedForward, EqualsTheSeparateOps) {
  const int64_t N = 9;
  const int C = 8, F = 12;
  auto v = [](int64_t n, uint64_t seed) { return cast<float>(random_vec(n, seed)); };
  const auto x = v(N * C, 1), w1 = v(int64_t(C) * F, 2), b1 = v(F, 3), w2 = v(int64_t(F) * C, 4),
             b2 = v(C, 5), dout = v(N * C, 6), out0 = v(N * C, 7);
  for (Activation act : {Activation::gelu, Activation::relu})
  for (int mode = 0; mode < 3; ++mode) {
    const float alpha = mode == 1 ? -1.0f : mode == 2 ? 0.5f : 1.0f;
    const bool accumulate = mode < 2;
    std::vector<float> out = out0, h(size_t(N * F)), a(size_t(N * F));
    cpu::ffn_forward(out.data(), h.data(), a.data(), x.data(), w1.data(), b1.data(), w2.data(),
                     b2.data(), N, C, F, act, alpha, accumulate);
    std::vector<float> want = out0, h2(size_t(N * F)), a2(size_t(N * F)), g(size_t(N * C));
    cpu::matmul_forward(h2.data(), x.data(), w1.data(), b1.data(), N, C, F);
    cpu::activation_forward(a2.data(), h2.data(), N * F, act);
    if (accumulate) {
      cpu::matmul_accumulate(want.data(), a2.data(), w2.data(), b2.data(), N, F, C, alpha);
    } else {
      cpu::matmul_forward(g.data(), a2.data(), w2.data(), b2.data(), N, F, C);
      for (size_t i = 0; i < g.size(); ++i) want[i] = alpha * g[i];
    }
    EXPECT_EQ(out, want) << "mode " << mode;
    if (accumulate) {  // onto a residual elsewhere: the same values, out's old ones unread
      std::vector<float> elsewhere(out0.size(), 9.0f), h3(size_t(N * F)), a3(size_t(N * F));
      cpu::ffn_forward(elsewhere.data(), h3.data(), a3.data(), x.data(), w1.data(), b1.data(),
                       w2.data(), b2.data(), N, C, F, act, alpha, accumulate, out0.data());
      EXPECT_EQ(elsewhere, want) << "mode " << mode << " onto res";
    }

    std::vector<float> dx(size_t(N * C), 3.0f), dw1(size_t(C) * F, 1.0f), db1(size_t(F), 1.0f),
        dw2(size_t(F) * C, 1.0f), db2(size_t(C), 1.0f);
    auto ex = dx, ew1 = dw1, eb1 = db1, ew2 = dw2, eb2 = db2;
    cpu::ffn_backward(dx.data(), dw1.data(), db1.data(), dw2.data(), db2.data(), dout.data(),
                      x.data(), h.data(), a.data(), w1.data(), w2.data(), N, C, F, act);
    std::vector<float> da(size_t(N * F)), dh(size_t(N * F));
    cpu::matmul_backward(da.data(), ew2.data(), eb2.data(), dout.data(), a2.data(), w2.data(), N,
                         F, C, /*add_dinp=*/false);
    cpu::activation_backward(dh.data(), da.data(), h2.data(), N * F, act);
    cpu::matmul_backward(ex.data(), ew1.data(), eb1.data(), dh.data(), x.data(), w1.data(), N, C,
                         F, /*add_dinp=*/false);
    EXPECT_EQ(dx, ex);
    EXPECT_EQ(dw1, ew1);
    EXPECT_EQ(db1, eb1);
    EXPECT_EQ(dw2, ew2);
    EXPECT_EQ(db2, eb2);
  }
}

// LayerNorm and the block in one op: bitwise layernorm_forward and
// ffn_forward (then ffn_backward and layernorm_backward), in float.
TEST(LayernormFeedForward, EqualsTheSeparateOps) {
  const int64_t N = 9;
  const int C = 8, F = 12;
  auto v = [](int64_t n, uint64_t seed) { return cast<float>(random_vec(n, seed)); };
  const auto x = v(N * C, 11), lw = v(C, 12), lb = v(C, 13), w1 = v(int64_t(C) * F, 14),
             b1 = v(F, 15), w2 = v(int64_t(F) * C, 16), b2 = v(C, 17), dout = v(N * C, 18),
             out0 = v(N * C, 19);
  for (int mode = 0; mode < 2; ++mode) {  // out -= g onto out0 elsewhere; out = g
    const bool accumulate = mode == 0;
    const float alpha = accumulate ? -1.0f : 1.0f;
    const float* res = accumulate ? out0.data() : nullptr;
    std::vector<float> out(out0.size(), 9.0f), ln(size_t(N * C)), mean(static_cast<size_t>(N)),
        rstd(static_cast<size_t>(N)), h(size_t(N * F)), a(size_t(N * F)), dln(size_t(N * C));
    auto want = out, eln = ln, emean = mean, erstd = rstd, eh = h, ea = a, edln = dln;
    cpu::layernorm_ffn_forward(out.data(), h.data(), a.data(), ln.data(), mean.data(),
                               rstd.data(), x.data(), lw.data(), lb.data(), w1.data(), b1.data(),
                               w2.data(), b2.data(), N, C, F, Activation::gelu, 1e-5f, alpha,
                               accumulate, res);
    cpu::layernorm_forward(eln.data(), emean.data(), erstd.data(), x.data(), lw.data(), lb.data(),
                           N, C, 1e-5f);
    cpu::ffn_forward(want.data(), eh.data(), ea.data(), eln.data(), w1.data(), b1.data(),
                     w2.data(), b2.data(), N, C, F, Activation::gelu, alpha, accumulate, res);
    EXPECT_EQ(out, want) << "mode " << mode;
    EXPECT_EQ(mean, emean);
    EXPECT_EQ(rstd, erstd);
    std::vector<float> dx(size_t(N * C), 3.0f), dlw(size_t(C), 1.0f), dlb(size_t(C), 1.0f),
        dw1(size_t(C) * F, 1.0f), db1(size_t(F), 1.0f), dw2(size_t(F) * C, 1.0f),
        db2(size_t(C), 1.0f);
    auto ex = dx, elw = dlw, elb = dlb, ew1 = dw1, eb1 = db1, ew2 = dw2, eb2 = db2;
    cpu::layernorm_ffn_backward(dx.data(), dlw.data(), dlb.data(), dw1.data(), db1.data(),
                                dw2.data(), db2.data(), dout.data(), ln.data(), dln.data(),
                                h.data(), a.data(), x.data(), lw.data(), mean.data(), rstd.data(),
                                w1.data(), w2.data(), N, C, F, Activation::gelu);
    cpu::ffn_backward(edln.data(), ew1.data(), eb1.data(), ew2.data(), eb2.data(), dout.data(),
                      eln.data(), eh.data(), ea.data(), w1.data(), w2.data(), N, C, F,
                      Activation::gelu);
    cpu::layernorm_backward(ex.data(), elw.data(), elb.data(), edln.data(), x.data(), lw.data(),
                            emean.data(), erstd.data(), N, C);
    EXPECT_EQ(dx, ex) << "mode " << mode;
    EXPECT_EQ(dlw, elw);
    EXPECT_EQ(dlb, elb);
    EXPECT_EQ(dw1, ew1);
    EXPECT_EQ(db1, eb1);
    EXPECT_EQ(dw2, ew2);
    EXPECT_EQ(db2, eb2);
  }
}

// ---------------------------------------------------------------- LayerNorm + projections

// Bitwise the separate ops it stands for, with one projection and with two.
TEST(LayernormProject, EqualsTheSeparateOps) {
  const int64_t N = 7;
  const int C = 10, OC = 6;
  const float eps = 1e-5f;
  auto v = [](int64_t n, uint64_t seed) { return cast<float>(random_vec(n, seed)); };
  const auto x = v(N * C, 1), lw = v(C, 2), lb = v(C, 3), w1 = v(int64_t(C) * OC, 4),
             w2 = v(int64_t(C) * OC, 5), d1 = v(N * OC, 6), d2 = v(N * OC, 7);
  for (bool two : {true, false}) {
    const float* pw2 = two ? w2.data() : nullptr;
    std::vector<float> o1(size_t(N * OC)), o2(size_t(N * OC)), ln(size_t(N * C)), mean(static_cast<size_t>(N)),
        rstd(static_cast<size_t>(N));
    cpu::layernorm_project_forward(o1.data(), o2.data(), ln.data(), mean.data(), rstd.data(),
                                   x.data(), lw.data(), lb.data(), w1.data(), pw2, N, C, OC, eps);
    std::vector<float> e1(o1.size()), e2(o2.size()), eln(ln.size()), em(mean.size()),
        er(rstd.size());
    cpu::layernorm_forward(eln.data(), em.data(), er.data(), x.data(), lw.data(), lb.data(), N, C,
                           eps);
    cpu::matmul_forward(e1.data(), eln.data(), w1.data(), static_cast<const float*>(nullptr), N,
                        C, OC);
    if (two)
      cpu::matmul_forward(e2.data(), eln.data(), w2.data(), static_cast<const float*>(nullptr), N,
                          C, OC);
    EXPECT_EQ(o1, e1);
    if (two) EXPECT_EQ(o2, e2);
    EXPECT_EQ(mean, em);
    EXPECT_EQ(rstd, er);

    std::vector<float> dx(size_t(N * C), 0.5f), dlw(size_t(C), 1.0f), dlb(size_t(C), 1.0f),
        dw1(size_t(C) * OC, 1.0f), dw2(size_t(C) * OC, 1.0f), dln(size_t(N * C));
    auto ex = dx, elw = dlw, elb = dlb, ew1 = dw1, ew2 = dw2;
    cpu::layernorm_project_backward(dx.data(), dlw.data(), dlb.data(), dw1.data(),
                                    two ? dw2.data() : nullptr, d1.data(),
                                    two ? d2.data() : nullptr, ln.data(), dln.data(), mean.data(),
                                    rstd.data(), x.data(), lw.data(), lb.data(), w1.data(), pw2, N,
                                    C, OC, eps);
    std::vector<float> edln(size_t(N * C));
    cpu::matmul_backward(edln.data(), ew1.data(), static_cast<float*>(nullptr), d1.data(),
                         eln.data(), w1.data(), N, C, OC, /*add_dinp=*/false);
    if (two)
      cpu::matmul_backward(edln.data(), ew2.data(), static_cast<float*>(nullptr), d2.data(),
                           eln.data(), w2.data(), N, C, OC, /*add_dinp=*/true);
    cpu::layernorm_backward(ex.data(), elw.data(), elb.data(), edln.data(), x.data(), lw.data(),
                            em.data(), er.data(), N, C);
    EXPECT_EQ(dx, ex);
    EXPECT_EQ(dlw, elw);
    EXPECT_EQ(dlb, elb);
    EXPECT_EQ(dw1, ew1);
    EXPECT_EQ(dw2, ew2);
    EXPECT_EQ(dln, edln);
  }
}

// ---------------------------------------------------------------- embedding

struct EmbeddingCase {
  int V = 5, D = 7, d1 = 3, a1 = 4, a2 = 3;  // a1 * a2 = 12 positions
  int64_t L = 5, pos_offset = 4;             // positions 4..8, not a multiple of a2
  std::vector<int32_t> tokens = {2, 0, 2, 4, 1};  // token 2 repeats
  Vec wte = random_vec(int64_t(V) * D, 51);
  Vec pos1 = random_vec(int64_t(a1) * d1, 52);
  Vec pos2 = random_vec(int64_t(a2) * (D - d1), 53);
  Vec r = random_vec(L * D, 54);

  Vec forward() {
    Vec out(size_t(L * D));
    cpu::embedding_forward(out.data(), tokens.data(), wte.data(), pos1.data(), pos2.data(), L, D,
                           d1, a2, pos_offset);
    return out;
  }
  double loss() { return dot(forward(), r); }
  void backward(double* dwte, double* dpos1, double* dpos2) {
    cpu::embedding_backward(dwte, dpos1, dpos2, r.data(), tokens.data(), L, D, d1, a2,
                            pos_offset);
  }
};

TEST(Embedding, ForwardUsesGlobalPositions) {
  EmbeddingCase e;
  const Vec out = e.forward();
  for (int64_t i = 0; i < e.L; ++i) {
    const int64_t p = e.pos_offset + i;
    for (int c = 0; c < e.D; ++c) {
      const double tok = e.wte[size_t(e.tokens[size_t(i)] * e.D + c)];
      const double pos = c < e.d1 ? e.pos1[size_t((p / e.a2) * e.d1 + c)]
                                  : e.pos2[size_t((p % e.a2) * (e.D - e.d1) + c - e.d1)];
      EXPECT_EQ(out[size_t(i * e.D + c)], tok + pos) << "i=" << i << " c=" << c;
    }
  }
  // A shard starting at pos_offset equals the same rows of the whole sequence.
  EmbeddingCase whole;
  whole.L = e.pos_offset + e.L;
  whole.pos_offset = 0;
  whole.tokens.assign(size_t(whole.L), 3);
  for (int64_t i = 0; i < e.L; ++i) whole.tokens[size_t(e.pos_offset + i)] = e.tokens[size_t(i)];
  const Vec full = whole.forward();
  for (int64_t i = 0; i < e.L * e.D; ++i) EXPECT_EQ(out[size_t(i)], full[size_t(e.pos_offset * e.D + i)]);
}

TEST(Embedding, BackwardFiniteDifference) {
  EmbeddingCase e;
  Vec dwte(e.wte.size()), dpos1(e.pos1.size()), dpos2(e.pos2.size());
  e.backward(dwte.data(), dpos1.data(), dpos2.data());
  auto loss = [&] { return e.loss(); };
  expect_fd_match(loss, e.wte, dwte, "dwte");
  expect_fd_match(loss, e.pos1, dpos1, "dpos1");
  expect_fd_match(loss, e.pos2, dpos2, "dpos2");
}

TEST(Embedding, BackwardAccumulatesAndSkipsNull) {
  EmbeddingCase e;
  Vec dwte(e.wte.size()), dpos1(e.pos1.size()), dpos2(e.pos2.size());
  e.backward(dwte.data(), dpos1.data(), dpos2.data());
  Vec dwte2(e.wte.size()), dpos1_2(e.pos1.size()), dpos2_2(e.pos2.size());
  e.backward(dwte2.data(), dpos1_2.data(), dpos2_2.data());
  e.backward(dwte2.data(), dpos1_2.data(), dpos2_2.data());
  expect_twice(dwte, dwte2, "dwte");
  expect_twice(dpos1, dpos1_2, "dpos1");
  expect_twice(dpos2, dpos2_2, "dpos2");
  Vec only_pos2(e.pos2.size());
  e.backward(nullptr, nullptr, only_pos2.data());
  EXPECT_EQ(only_pos2, dpos2);
  Vec only_wte(e.wte.size());
  e.backward(only_wte.data(), nullptr, nullptr);
  EXPECT_EQ(only_wte, dwte);
}

}  // namespace
}  // namespace reformer

// The CPU keeps no bf16 operands (Ops::attention_output_bf16 is false
// there): a product given a bf16 input refuses it, a plain one runs.
TEST(MatmulForward, RefusesBf16Inputs) {
  using reformer::Operand;
  std::vector<float> out(6), inp(6, 1.0f), w(4, 1.0f);
  const float* no_bias = nullptr;
  float* no_dbias = nullptr;
  EXPECT_THROW(reformer::cpu::matmul_forward(out.data(), Operand<float>{inp.data(), true},
                                             w.data(), no_bias, 3, 2, 2),
               reformer::ShapeError);
  EXPECT_THROW(reformer::cpu::matmul_backward(out.data(), w.data(), no_dbias, out.data(),
                                              Operand<float>{inp.data(), true}, w.data(), 3, 2,
                                              2, false),
               reformer::ShapeError);
  reformer::cpu::matmul_forward(out.data(), Operand<float>{inp.data()}, w.data(), no_bias, 3, 2,
                                2);
  EXPECT_EQ(out[0], 2.0f);
}

// Nor bf16 gradients for the projections' backward, nor rows of another
// stride than the op's width; plain rows (stride 0 or OC) run.
TEST(LayernormProjectBackward, RefusesBf16AndStridedGradients) {
  using reformer::Operand;
  const int N = 3, C = 4, OC = 2;
  std::vector<float> dinp(N * C), dlw(C), dlb(C), dw1(C * OC), dw2(C * OC), ln(N * C),
      dln(N * C), mean(N), rstd(N), inp(N * C), lw(C, 1.0f), lb(C), w(C * OC, 0.5f),
      dout(2 * N * OC, 1.0f);
  std::iota(inp.begin(), inp.end(), 0.0f);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.1f * float(i % 5) - 0.2f;
  auto run = [&](Operand<float> d1, Operand<float> d2) {
    reformer::cpu::layernorm_project_backward(dinp.data(), dlw.data(), dlb.data(), dw1.data(),
                                              dw2.data(), d1, d2, ln.data(), dln.data(),
                                              mean.data(), rstd.data(), inp.data(), lw.data(),
                                              lb.data(), w.data(), w.data(), N, C, OC, 1e-5f);
  };
  const float* d = dout.data();
  EXPECT_THROW(run(Operand<float>{d, true}, Operand<float>{d}), reformer::ShapeError);
  EXPECT_THROW(run(Operand<float>{d}, Operand<float>{d + OC, true, 2 * OC}),
               reformer::ShapeError);
  EXPECT_THROW(run(Operand<float>{d, false, 2 * OC}, Operand<float>{d}), reformer::ShapeError);
  // Rows of stride OC are the plain rows: the plain call's results.
  std::iota(dout.begin(), dout.end(), 1.0f);
  std::fill(dinp.begin(), dinp.end(), 0.0f);
  run(Operand<float>{d, false, OC}, Operand<float>{d + N * OC});
  const std::vector<float> strided = dinp;
  std::fill(dinp.begin(), dinp.end(), 0.0f);
  reformer::cpu::layernorm_project_backward(dinp.data(), dlw.data(), dlb.data(), dw1.data(),
                                            dw2.data(), d, d + N * OC, ln.data(), dln.data(),
                                            mean.data(), rstd.data(), inp.data(), lw.data(),
                                            lb.data(), w.data(), w.data(), N, C, OC, 1e-5f);
  EXPECT_EQ(dinp, strided);
  EXPECT_NE(dinp[0], 0.0f);
  // Nor bf16 outputs of the forward.
  std::vector<float> o1(N * OC), o2(N * OC);
  EXPECT_THROW(reformer::cpu::layernorm_project_forward(
                   o1.data(), o2.data(), ln.data(), mean.data(), rstd.data(), inp.data(),
                   lw.data(), lb.data(), w.data(), w.data(), N, C, OC, 1e-5f, true),
               reformer::ShapeError);
}
