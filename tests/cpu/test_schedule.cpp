// Learning-rate schedules, gradient clipping and the optimizer driver over
// the flat parameter buffer.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "framework/optimizer.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/optimizer.h"
#include "kernels/profiling_ops.h"

using namespace reformer;

namespace {
OptimizerConfig schedule(Schedule name, double lr, int64_t warmup) {
  OptimizerConfig c;
  c.schedule = name;
  c.lr = lr;
  c.warmup_steps = warmup;
  c.min_lr_ratio = 0.1;
  return c;
}
}  // namespace

TEST(Schedule, RsqrtWarmsUpLinearlyThenDecaysAsInverseSqrt) {
  const OptimizerConfig c = schedule(Schedule::rsqrt, 1e-3, 100);
  EXPECT_DOUBLE_EQ(learning_rate(c, 1, 1000), 1e-5);
  EXPECT_DOUBLE_EQ(learning_rate(c, 50, 1000), 5e-4);
  EXPECT_DOUBLE_EQ(learning_rate(c, 100, 1000), 1e-3);
  EXPECT_NEAR(learning_rate(c, 400, 1000), 5e-4, 1e-15);  // sqrt(100 / 400) = 1/2
  EXPECT_NEAR(learning_rate(c, 10000, 1000), 1e-4, 1e-15);
}

TEST(Schedule, CosineEndsAtTheFloor) {
  const OptimizerConfig c = schedule(Schedule::cosine, 2e-3, 10);
  EXPECT_DOUBLE_EQ(learning_rate(c, 5, 110), 1e-3);
  EXPECT_DOUBLE_EQ(learning_rate(c, 10, 110), 2e-3);
  EXPECT_NEAR(learning_rate(c, 60, 110), 2e-3 * (0.1 + 0.9 * 0.5), 1e-15);  // halfway
  EXPECT_NEAR(learning_rate(c, 110, 110), 2e-4, 1e-15);
  EXPECT_NEAR(learning_rate(c, 500, 110), 2e-4, 1e-15);  // stays at the floor
}

TEST(Schedule, ConstantAfterWarmup) {
  const OptimizerConfig c = schedule(Schedule::constant, 3e-4, 4);
  EXPECT_DOUBLE_EQ(learning_rate(c, 2, 100), 1.5e-4);
  EXPECT_DOUBLE_EQ(learning_rate(c, 4, 100), 3e-4);
  EXPECT_DOUBLE_EQ(learning_rate(c, 99, 100), 3e-4);
  EXPECT_DOUBLE_EQ(learning_rate(schedule(Schedule::constant, 3e-4, 0), 1, 100), 3e-4);
}

TEST(Clip, ScalesDownOnlyAboveTheThreshold) {
  CpuOps<double> ops;
  std::vector<double> g = {3, 4};  // norm 5
  EXPECT_DOUBLE_EQ(clip_grad_norm<double>(ops, g.data(), 2, 10.0), 5.0);
  EXPECT_EQ(g, (std::vector<double>{3, 4}));
  EXPECT_DOUBLE_EQ(clip_grad_norm<double>(ops, g.data(), 2, 1.0), 5.0);
  EXPECT_NEAR(std::sqrt(g[0] * g[0] + g[1] * g[1]), 1.0, 1e-6);
  EXPECT_NEAR(g[0] / g[1], 0.75, 1e-12);
  std::vector<double> h = {3, 4};
  clip_grad_norm<double>(ops, h.data(), 2, 0.0);  // 0 disables clipping
  EXPECT_EQ(h, (std::vector<double>{3, 4}));
}

namespace {
ParamTable two_params() {
  ParamTable t;
  t.add("w", {3, 4}, InitKind::normal, 0.1, /*decay*/ true);
  t.add("b", {4}, InitKind::zeros, 0, /*decay*/ false);
  return t;
}
}  // namespace

TEST(Optimizer, AdamWStateMirrorsParametersAndDecaysMatricesOnly) {
  CpuOps<double> ops;
  const ParamTable t = two_params();
  OptimizerConfig c;
  c.name = OptimizerKind::adamw;
  c.weight_decay = 0.5;
  Optimizer<double> opt(c, t, ops);
  ASSERT_EQ(opt.state().size(), 4u);  // m, v for each parameter
  EXPECT_EQ(opt.state()[0].state, "m");
  EXPECT_EQ(opt.state()[1].state, "v");
  EXPECT_EQ(opt.state()[2].shape, (std::vector<int64_t>{4}));
  // With a zero gradient only weight decay moves the parameters, and only
  // the matrix (decay = true) is decayed.
  std::vector<double> p(16, 1.0), g(16, 0.0);
  opt.step(p.data(), g.data(), 1, 0.1);
  // lr and weight decay travel as float in AdamWParams: 1e-8 covers that.
  for (int i = 0; i < 12; ++i) EXPECT_NEAR(p[size_t(i)], 1.0 - 0.1 * 0.5, 1e-8);
  for (int i = 12; i < 16; ++i) EXPECT_DOUBLE_EQ(p[size_t(i)], 1.0);
}

// AdamW's moments lie as the parameters do, and a step updates each run of
// consecutive tensors with the same weight decay in one call: with decay
// (matrices decayed, vectors not) one call per run, without it one call for
// all. Either way every element gets what a call per tensor gives, bit for
// bit (the update is elementwise), over three steps.
TEST(Optimizer, AdamWUpdatesRunsOfEqualDecayInOneCallEach) {
  ParamTable t;
  t.add("a", {3, 4}, InitKind::normal, 0.1, /*decay*/ true);
  t.add("b", {4}, InitKind::zeros, 0, /*decay*/ false);
  t.add("c", {2, 5}, InitKind::normal, 0.1, /*decay*/ true);
  t.add("d", {5, 3}, InitKind::normal, 0.1, /*decay*/ true);
  t.add("e", {3}, InitKind::zeros, 0, /*decay*/ false);
  const size_t P = size_t(t.total());
  for (const double wd : {0.3, 0.0}) {
    SCOPED_TRACE("weight decay " + std::to_string(wd));
    CpuOps<float> cpu;
    ProfilingOps ops(cpu, std::make_unique<WallClock>());
    OptimizerConfig c;
    c.name = OptimizerKind::adamw;
    c.weight_decay = wd;
    Optimizer<float> opt(c, t, ops);
    std::vector<float> p(P), want(P), m(P, 0.0f), v(P, 0.0f);
    for (size_t i = 0; i < P; ++i) p[i] = want[i] = float(i % 7) * 0.1f - 0.3f;
    for (int step = 1; step <= 3; ++step) {
      std::vector<float> g(P);
      for (size_t i = 0; i < P; ++i) g[i] = float((i * 5 + size_t(step)) % 11) * 0.05f - 0.25f;
      opt.step(p.data(), g.data(), step, 0.01);
      for (const ParamInfo& q : t.params()) {
        AdamWParams a;
        a.lr = 0.01f;
        a.beta1 = float(c.beta1);
        a.beta2 = float(c.beta2);
        a.eps = float(c.eps);
        a.weight_decay = q.decay ? float(wd) : 0.0f;
        a.step = step;
        cpu::adamw_update(want.data() + q.offset, g.data() + q.offset, m.data() + q.offset,
                          v.data() + q.offset, q.size, a);
      }
    }
    EXPECT_EQ(p, want);
    EXPECT_EQ(std::vector<float>(opt.state()[0].data, opt.state()[0].data + P), m);
    EXPECT_EQ(std::vector<float>(opt.state()[1].data, opt.state()[1].data + P), v);
    int64_t calls = 0;
    for (const OpStats& st : ops.stats())
      if (st.op == OpId::adamw_update) calls = st.calls;
    EXPECT_EQ(calls, 3 * (wd > 0 ? 4 : 1));  // runs a | b | c d | e, or one
  }
}

TEST(Optimizer, AdafactorFactorsMatricesOnly) {
  CpuOps<double> ops;
  const ParamTable t = two_params();
  OptimizerConfig c;
  c.name = OptimizerKind::adafactor;
  c.beta1 = 0.0;
  Optimizer<double> opt(c, t, ops);
  ASSERT_EQ(opt.state().size(), 3u);  // vr [3], vc [4] for w; vr [4] for b
  EXPECT_EQ(opt.state()[0].shape, (std::vector<int64_t>{3}));
  EXPECT_EQ(opt.state()[1].shape, (std::vector<int64_t>{4}));
  EXPECT_EQ(opt.state()[2].shape, (std::vector<int64_t>{4}));
  c.beta1 = 0.9;
  Optimizer<double> with_momentum(c, t, ops);
  EXPECT_EQ(with_momentum.state().size(), 5u);
  std::vector<double> p(16, 1.0), g(16, 0.25);
  opt.step(p.data(), g.data(), 1, 0.01);
  for (double x : p) EXPECT_LT(x, 1.0);  // a positive gradient lowers every weight
}
