// Incremental decoding (framework/generator.h): with full and local layers
// the cached decode reproduces the model's forward logits position by
// position; with LSH layers its attention equals a brute-force evaluation of
// the documented decode semantics (docs/generation.md); the decode attention
// op against a direct reference; token sampling.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/generator.h"
#include "framework/model.h"
#include "kernels/common/philox.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/errors.h"

namespace reformer {
namespace {

Config small_config(const std::string& attention) {
  const std::string yaml =
      "model: {vocab_size: 16, d_model: 16, n_heads: 2, d_ff: 32, n_layers: 2, max_len: 32}\n"
      "attention: " + attention + "\n"
      "training: {device: cpu, seed: 5}\n";
  return parse_config(yaml, "test");
}

std::vector<int32_t> random_tokens(int64_t n, int V, uint64_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  const RngKey key = make_key(seed, RngPurpose::test, 1);
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t(rng_u32(key, uint64_t(i)) % uint32_t(V));
  return t;
}

// Scales every parameter so attention is far from uniform and the check is sharp.
void sharpen(CpuOps<double>& ops, ReformerModel<double>& model, double factor) {
  ops.scale(model.params(), factor, model.num_params());
}

// A double-precision model of `cfg` (seed 11), sharpened by 8.
struct SharpModel {
  explicit SharpModel(const Config& cfg) : model(cfg, ops) {
    model.init_params(11);
    sharpen(ops, model, 8.0);
  }
  CpuOps<double> ops;
  ReformerModel<double> model;
};

// Full and local layers: decode logits at every position equal the forward
// pass's. Double precision; the two compute the same sums in different
// orders, so they agree to rounding (1e-9 relative to the logits' scale).
class DecodeEqualsForward : public ::testing::TestWithParam<std::string> {};

TEST_P(DecodeEqualsForward, AtEveryPosition) {
  const Config cfg = small_config(GetParam());
  SharpModel m(cfg);
  CpuOps<double>& ops = m.ops;
  ReformerModel<double>& model = m.model;
  const int64_t L = cfg.model.max_len;
  const int V = cfg.model.vocab_size;
  const std::vector<int32_t> tokens = random_tokens(L, V, 3);
  std::vector<double> want;
  model.forward_logits(tokens.data(), 0, &want);
  Generator<double> gen(cfg, ops, model.params(), L, 0);
  double scale = 0, worst = 0;
  for (double x : want) scale = std::max(scale, std::abs(x));
  for (int64_t t = 0; t < L; ++t) {
    const std::vector<double>& got = gen.feed(tokens[size_t(t)]);
    for (int v = 0; v < V; ++v)
      worst = std::max(worst, std::abs(got[size_t(v)] - want[size_t(t * V + v)]));
  }
  EXPECT_LE(worst, 1e-9 * scale) << "largest logit " << scale;
  EXPECT_GT(scale, 1.0);
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, DecodeEqualsForward,
    ::testing::Values("{kinds: [full, local], bucket_size: 8}",
                      "{kinds: [local], bucket_size: 4, chunks_before: 2}",
                      "{kinds: [local], bucket_size: 8, chunks_before: 0}",
                      "{kinds: [lsh], bucket_size: 32}"));  // one chunk: LSH runs full

TEST(DecodeEqualsForward, FloatWithinFloatRounding) {
  const Config cfg = small_config("{kinds: [full, local], bucket_size: 8}");
  CpuOps<float> ops;
  ReformerModel<float> model(cfg, ops);
  model.init_params(11);
  const std::vector<int32_t> tokens = random_tokens(cfg.model.max_len, cfg.model.vocab_size, 4);
  std::vector<float> want;
  model.forward_logits(tokens.data(), 0, &want);
  Generator<float> gen(cfg, ops, model.params(), cfg.model.max_len, 0);
  const int V = cfg.model.vocab_size;
  for (int64_t t = 0; t < cfg.model.max_len; ++t) {
    const std::vector<float>& got = gen.feed(tokens[size_t(t)]);
    for (int v = 0; v < V; ++v)  // fp32 sums of O(1) terms in another order
      ASSERT_NEAR(got[size_t(v)], want[size_t(t * V + v)], 1e-4) << "t " << t << " v " << v;
  }
}

// A prompt fed at once (in steps of 5 positions, so steps end mid-chunk and
// mid-prompt) gives the same logits as feeding it token by token, before
// and after more tokens follow, for every kind (LSH over several chunks).
class PrefillEqualsFeed : public ::testing::TestWithParam<std::string> {};

TEST_P(PrefillEqualsFeed, ThenDecodesAlike) {
  const Config cfg = small_config(GetParam());
  SharpModel m(cfg);
  CpuOps<double>& ops = m.ops;
  ReformerModel<double>& model = m.model;
  const int64_t L = cfg.model.max_len, P = 23;
  const int V = cfg.model.vocab_size;
  const std::vector<int32_t> tokens = random_tokens(L, V, 5);
  Generator<double> one(cfg, ops, model.params(), L, 3);
  Generator<double> batched(cfg, ops, model.params(), L, 3, /*prefill_rows*/ 5);
  std::vector<double> want;
  for (int64_t t = 0; t < P; ++t) want = one.feed(tokens[size_t(t)]);
  std::vector<double> got = batched.prefill(tokens.data(), P);
  EXPECT_EQ(batched.position(), P);
  auto worst = [&](const std::vector<double>& a, const std::vector<double>& b) {
    double w = 0;
    for (int v = 0; v < V; ++v) w = std::max(w, std::abs(a[size_t(v)] - b[size_t(v)]));
    return w;
  };
  EXPECT_LE(worst(got, want), 1e-12) << "after the prompt";
  for (int64_t t = P; t < L; ++t)
    EXPECT_LE(worst(batched.feed(tokens[size_t(t)]), one.feed(tokens[size_t(t)])), 1e-12)
        << "position " << t;
  EXPECT_THROW(batched.prefill(tokens.data(), 1), ShapeError);  // full
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, PrefillEqualsFeed,
    ::testing::Values("{kinds: [full, local], bucket_size: 8}",
                      "{kinds: [local], bucket_size: 4, chunks_before: 2}",
                      "{kinds: [lsh, local], bucket_size: 4, n_hashes: 3}"));

// Brute force of the LSH decode semantics for one head at position t: per
// round, the positions j <= t whose bucket equals t's, scored and masked as
// in the model, one softmax per round, rounds combined by log-sum-exp.
std::vector<double> lsh_reference(const std::vector<std::vector<double>>& qk,
                                  const std::vector<std::vector<double>>& v, int h, int dh,
                                  const std::vector<double>& R, int n_hashes, int n_buckets) {
  const int64_t t = int64_t(qk.size()) - 1;
  const int cols = n_buckets / 2;
  auto bucket = [&](int64_t j, int r) {
    std::vector<double> y(size_t(2 * cols));
    for (int c = 0; c < cols; ++c) {
      double s = 0;
      for (int d = 0; d < dh; ++d)
        s += qk[size_t(j)][size_t(h * dh + d)] * R[size_t((r * dh + d) * cols + c)];
      y[size_t(c)] = s;
      y[size_t(cols + c)] = -s;
    }
    return int(std::max_element(y.begin(), y.end()) - y.begin());
  };
  std::vector<double> lse(static_cast<size_t>(n_hashes)), out(static_cast<size_t>(dh), 0.0);
  std::vector<std::vector<double>> out_r(size_t(n_hashes), std::vector<double>(size_t(dh), 0.0));
  for (int r = 0; r < n_hashes; ++r) {
    std::vector<std::pair<int64_t, double>> scored;
    for (int64_t j = 0; j <= t; ++j) {
      if (bucket(j, r) != bucket(t, r)) continue;
      double kk = 0, s = 0;
      for (int d = 0; d < dh; ++d) kk += std::pow(qk[size_t(j)][size_t(h * dh + d)], 2);
      for (int d = 0; d < dh; ++d)
        s += qk[size_t(t)][size_t(h * dh + d)] * qk[size_t(j)][size_t(h * dh + d)] /
             std::sqrt(kk + kKeyNormEps);
      scored.push_back({j, j == t ? kSelfMaskValue : s});
    }
    double m = -std::numeric_limits<double>::infinity(), z = 0;
    for (const auto& [j, s] : scored) m = std::max(m, s);
    for (const auto& [j, s] : scored) z += std::exp(s - m);
    lse[size_t(r)] = m + std::log(z);
    for (const auto& [j, s] : scored)
      for (int d = 0; d < dh; ++d)
        out_r[size_t(r)][size_t(d)] += std::exp(s - lse[size_t(r)]) * v[size_t(j)][size_t(h * dh + d)];
  }
  const double m = *std::max_element(lse.begin(), lse.end());
  double z = 0;
  for (double l : lse) z += std::exp(l - m);
  for (int r = 0; r < n_hashes; ++r)
    for (int d = 0; d < dh; ++d) out[size_t(d)] += std::exp(lse[size_t(r)] - m) / z * out_r[size_t(r)][size_t(d)];
  return out;
}

TEST(DecodeLsh, AttentionEqualsBruteForceOfTheDocumentedSemantics) {
  const Config cfg = small_config("{kinds: [lsh, full], bucket_size: 4, n_hashes: 3}");
  ASSERT_EQ(cfg.buckets(), 16);
  ASSERT_EQ(cfg.bucket_factor0(), 0);
  CpuOps<double> ops;
  ReformerModel<double> model(cfg, ops);
  model.init_params(12);
  sharpen(ops, model, 8.0);
  const uint64_t rotation_step = 7;
  Generator<double> gen(cfg, ops, model.params(), cfg.model.max_len, rotation_step);
  ASSERT_EQ(gen.layer_kind(0), AttentionKind::lsh);
  typename Generator<double>::Trace trace;
  gen.trace = &trace;
  const int H = cfg.model.n_heads, dh = cfg.head_dim(), nh = 3, nb = 16;
  std::vector<std::vector<double>> R(size_t(H), std::vector<double>(size_t(nh * dh * nb / 2)));
  for (int h = 0; h < H; ++h)
    ops.lsh_rotations(R[size_t(h)].data(), cfg.training.seed, rotation_step, 0, h, nh, dh, nb, 0);
  std::vector<std::vector<double>> qk, v;
  const std::vector<int32_t> tokens = random_tokens(cfg.model.max_len, cfg.model.vocab_size, 6);
  int64_t shared = 0;  // steps where some round's bucket held more than the query
  for (int64_t t = 0; t < cfg.model.max_len; ++t) {
    gen.feed(tokens[size_t(t)]);
    qk.push_back(trace.qk[0]);
    v.push_back(trace.v[0]);
    for (int h = 0; h < H; ++h) {
      const std::vector<double> want = lsh_reference(qk, v, h, dh, R[size_t(h)], nh, nb);
      for (int d = 0; d < dh; ++d)
        ASSERT_NEAR(trace.ao[0][size_t(h * dh + d)], want[size_t(d)], 1e-10) << t << " " << h;
      shared += std::abs(want[0] - v.back()[size_t(h * dh)]) > 1e-9;
    }
  }
  EXPECT_GT(shared, 10);  // the buckets did gather earlier positions
}

// The op on its own: sets with an empty one, a repeated key, the query's own
// position and a later (causally masked) position, against a direct sum.
TEST(DecodeAttentionOp, MatchesDirectSum) {
  CpuOps<double> ops;
  const int heads = 2, rounds = 2, dh = 3;
  const int64_t ld = 7, n = 6;  // cache of 6 positions, row stride 7 >= heads * dh
  std::vector<double> k(size_t(n * ld)), v(size_t(n * ld)), q(size_t(heads * dh));
  const RngKey key = make_key(1, RngPurpose::test, 9);
  for (size_t i = 0; i < k.size(); ++i) k[i] = 2 * rng_uniform(key, i) - 1;
  for (size_t i = 0; i < v.size(); ++i) v[i] = 2 * rng_uniform(key, 1000 + i) - 1;
  for (size_t i = 0; i < q.size(); ++i) q[i] = 4 * rng_uniform(key, 2000 + i) - 2;
  // Sets (head, round): {0, 2, 4}, {}, {1, 4, 4, 5}, {3}; the query is at 4.
  const std::vector<int32_t> keys = {0, 2, 4, 1, 4, 4, 5, 3};
  const std::vector<int32_t> sets = {0, 3, 3, 0, 3, 4, 7, 1};
  DecodeAttentionParams p;
  p.heads = heads;
  p.rounds = rounds;
  p.dh = dh;
  p.ld = ld;
  p.q_pos = 4;
  std::vector<double> out(size_t(heads * dh), 99.0);
  ops.decode_attention(out.data(), q.data(), k.data(), v.data(), sets.data(), keys.data(), p);
  for (int h = 0; h < heads; ++h) {
    double lse[2];
    std::vector<double> o[2];
    for (int r = 0; r < rounds; ++r) {
      const int u = h * rounds + r;
      o[r].assign(size_t(dh), 0.0);
      std::vector<double> s;
      for (int t = 0; t < sets[size_t(2 * u + 1)]; ++t) {
        const int j = keys[size_t(sets[size_t(2 * u)] + t)];
        const double* kj = k.data() + j * ld + h * dh;
        const double norm = std::sqrt(kj[0] * kj[0] + kj[1] * kj[1] + kj[2] * kj[2] + kKeyNormEps);
        double x = 0;
        for (int d = 0; d < dh; ++d) x += q[size_t(h * dh + d)] * kj[d] / norm;
        s.push_back(j > 4 ? kCausalMaskValue : j == 4 ? kSelfMaskValue : x);
      }
      double z = 0;
      for (double x : s) z += std::exp(x);
      lse[r] = s.empty() ? -std::numeric_limits<double>::infinity() : std::log(z);
      for (int t = 0; t < int(s.size()); ++t)
        for (int d = 0; d < dh; ++d)
          o[r][size_t(d)] += std::exp(s[size_t(t)] - lse[r]) *
                             v[size_t(keys[size_t(sets[size_t(2 * u)] + t)] * ld + h * dh + d)];
    }
    const double m = std::max(lse[0], lse[1]);
    const double z = std::exp(lse[0] - m) + std::exp(lse[1] - m);
    for (int d = 0; d < dh; ++d) {
      const double want = (std::exp(lse[0] - m) * o[0][size_t(d)] +
                           std::exp(lse[1] - m) * o[1][size_t(d)]) / z;
      EXPECT_NEAR(out[size_t(h * dh + d)], want, 1e-12) << h << " " << d;
    }
  }
}

// A decoding step multiplies one row; that path gives the bits of the
// blocked kernel (row 0 of a two-row product), with and without bias.
TEST(DecodeMatmul, OneRowIsBitwiseTheBlockedProduct) {
  CpuOps<float> ops;
  const int C = 300, OC = 515;  // several column blocks, partial last block
  std::vector<float> inp(2 * C), w(size_t(C) * OC), bias(OC), one(OC), two(2 * OC);
  const RngKey key = make_key(2, RngPurpose::test, 4);
  for (size_t i = 0; i < inp.size(); ++i) inp[i] = rng_normal(key, i);
  for (size_t i = 0; i < w.size(); ++i) w[i] = rng_normal(key, 10000 + i);
  for (size_t i = 0; i < bias.size(); ++i) bias[i] = rng_normal(key, 5000 + i);
  for (const float* b : {static_cast<const float*>(bias.data()), static_cast<const float*>(nullptr)}) {
    ops.matmul_forward(one.data(), inp.data(), w.data(), b, 1, C, OC);
    ops.matmul_forward(two.data(), inp.data(), w.data(), b, 2, C, OC);
    EXPECT_TRUE(std::equal(one.begin(), one.end(), two.begin()));
  }
}

TEST(SampleToken, GreedyAndSeededDraws) {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f, 1.5f};
  SamplingOptions greedy;
  greedy.temperature = 0;
  EXPECT_EQ(sample_token(logits.data(), 5, greedy, 0), 1);  // lowest index of the maximum
  SamplingOptions o;
  o.seed = 3;
  std::vector<int> counts(5, 0);
  for (int64_t pos = 0; pos < 4000; ++pos) {
    const int32_t a = sample_token(logits.data(), 5, o, pos);
    EXPECT_EQ(a, sample_token(logits.data(), 5, o, pos));  // a pure function of its inputs
    counts[size_t(a)] += 1;
  }
  // softmax(logits): about 0.06, 0.36, 0.02, 0.36, 0.22; 4000 draws: 5 sigma < 0.04.
  double z = 0;
  for (float x : logits) z += std::exp(double(x));
  for (int i = 0; i < 5; ++i)
    EXPECT_NEAR(counts[size_t(i)] / 4000.0, std::exp(double(logits[size_t(i)])) / z, 0.04) << i;
  o.top_k = 2;  // only tokens 1 and 3 remain
  for (int64_t pos = 0; pos < 200; ++pos) {
    const int32_t a = sample_token(logits.data(), 5, o, pos);
    EXPECT_TRUE(a == 1 || a == 3) << a;
  }
  o.top_k = 0;
  o.top_p = 0.01;  // the single most likely token
  for (int64_t pos = 0; pos < 50; ++pos) EXPECT_EQ(sample_token(logits.data(), 5, o, pos), 1);
}

TEST(Generator, RefusesWhatCannotDecode) {
  Config cfg = small_config("{kinds: [full], bucket_size: 8}");
  CpuOps<float> ops;
  ReformerModel<float> model(cfg, ops);
  EXPECT_THROW(Generator<float>(cfg, ops, model.params(), cfg.model.max_len + 1, 0), ConfigError);
  Generator<float> gen(cfg, ops, model.params(), 2, 0);
  EXPECT_THROW(gen.feed(cfg.model.vocab_size), DataError);
  gen.feed(1);
  gen.feed(2);
  EXPECT_THROW(gen.feed(3), ShapeError);
  cfg.attention.causal = false;
  EXPECT_THROW(Generator<float>(cfg, ops, model.params(), 4, 0), ConfigError);
}

}  // namespace
}  // namespace reformer
