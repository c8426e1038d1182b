// Chunked (LSH, local) and full attention on CPU: forward against brute-force
// references and against each other, backward against central differences.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "kernels/errors.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/lse_combine.h"
#include "tests/common/gradcheck.h"

namespace reformer::cpu {
namespace {

using test::fill_random;
using test::max_rel_err;
using test::numeric_grad;

// Written into output padding columns (d >= dh) to check they stay untouched.
constexpr double kSentinel = 12345.0;

// Finite differences (h = 1e-6, double): truncation ~h^2 f''' ~ 1e-12 and
// cancellation ~1e-16 |f| / h ~ 1e-9 for |f| ~ 10. Judged as
// |a - n| <= kGradTol (kGradAtol + |n|); the worst case seen is 1e-5, so
// kGradTol leaves a 10x margin while a wrong term (errors ~1e-2 and up) fails.
constexpr double kGradAtol = 1e-6;
constexpr double kGradTol = 1e-4;

struct Inputs {
  int64_t L;
  int dh;
  int64_t ld;
  std::vector<double> qk, v, g;  // [L, ld]; g is dout, also the loss weights
};

Inputs make_inputs(int64_t L, int dh, int64_t ld, uint64_t seed, double qk_scale = 1.5) {
  Inputs in{L, dh, ld, {}, {}, {}};
  for (auto* x : {&in.qk, &in.v, &in.g}) x->assign(size_t(L * ld), 0.0);
  fill_random(in.qk.data(), L * ld, seed, qk_scale);
  fill_random(in.v.data(), L * ld, seed + 100);
  fill_random(in.g.data(), L * ld, seed + 200);
  return in;
}

AttentionParams params(int64_t L, int dh, int64_t ld, int n_rounds, int chunk, int before,
                       int after, bool wrap, bool causal) {
  AttentionParams p;
  p.L = L;
  p.dh = dh;
  p.ld = ld;
  p.n_rounds = n_rounds;
  p.chunk = chunk;
  p.chunks_before = before;
  p.chunks_after = after;
  p.wrap = wrap;
  p.causal = causal;
  return p;
}

std::vector<int32_t> random_perms(int n_rounds, int64_t L, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<int32_t> perm(size_t(n_rounds * L));
  for (int r = 0; r < n_rounds; ++r) {
    std::iota(perm.begin() + r * L, perm.begin() + (r + 1) * L, 0);
    std::shuffle(perm.begin() + r * L, perm.begin() + (r + 1) * L, gen);
  }
  return perm;
}

std::vector<int32_t> identity_perms(int n_rounds, int64_t L) {
  std::vector<int32_t> perm(size_t(n_rounds * L));
  for (int r = 0; r < n_rounds; ++r) std::iota(perm.begin() + r * L, perm.begin() + (r + 1) * L, 0);
  return perm;
}

template <class T>
struct ChunkedOut {
  std::vector<T> out, out_r, lse;
};

template <class T>
ChunkedOut<T> run_chunked(const std::vector<T>& qk, const std::vector<T>& v,
                          const std::vector<int32_t>& perm, const AttentionParams& p) {
  ChunkedOut<T> o;
  o.out.assign(size_t(p.L * p.ld), T(kSentinel));
  o.out_r.assign(size_t(p.n_rounds * p.L * p.dh), T(0));
  o.lse.assign(size_t(p.n_rounds * p.L), T(0));
  chunked_attention_forward(o.out.data(), o.out_r.data(), o.lse.data(), qk.data(), v.data(),
                            perm.data(), p);
  return o;
}

struct FullOut {
  std::vector<double> out, lse;
};

FullOut run_full(const std::vector<double>& qk, const std::vector<double>& v,
                 const AttentionParams& p) {
  FullOut o;
  o.out.assign(size_t(p.L * p.ld), kSentinel);
  o.lse.assign(size_t(p.L), 0.0);
  full_attention_forward(o.out.data(), o.lse.data(), qk.data(), v.data(), p);
  return o;
}

struct Grads {
  std::vector<double> dqk, dv;
};

Grads chunked_grads(const Inputs& in, const std::vector<int32_t>& perm, const AttentionParams& p,
                    double init = 0.0) {
  const auto o = run_chunked(in.qk, in.v, perm, p);
  Grads gr{std::vector<double>(in.qk.size(), init), std::vector<double>(in.v.size(), init)};
  chunked_attention_backward(gr.dqk.data(), gr.dv.data(), in.g.data(), in.qk.data(), in.v.data(),
                             perm.data(), o.out.data(), p.ld, o.lse.data(), p);
  return gr;
}

Grads full_grads(const Inputs& in, const AttentionParams& p, double init = 0.0) {
  const auto o = run_full(in.qk, in.v, p);
  Grads gr{std::vector<double>(in.qk.size(), init), std::vector<double>(in.v.size(), init)};
  full_attention_backward(gr.dqk.data(), gr.dv.data(), in.g.data(), o.out.data(), in.qk.data(),
                          in.v.data(), o.lse.data(), p);
  return gr;
}

// sum over the [L, dh] part of out * g.
double weighted_sum(const std::vector<double>& out, const std::vector<double>& g,
                    const AttentionParams& p) {
  double s = 0;
  for (int64_t i = 0; i < p.L; ++i)
    for (int d = 0; d < p.dh; ++d) s += out[size_t(i * p.ld + d)] * g[size_t(i * p.ld + d)];
  return s;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b,
                    const AttentionParams& p) {
  double m = 0;
  for (int64_t i = 0; i < p.L; ++i)
    for (int d = 0; d < p.dh; ++d)
      m = std::max(m, std::fabs(a[size_t(i * p.ld + d)] - b[size_t(i * p.ld + d)]));
  return m;
}

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

// Masked score by definition: causal mask first, then the self mask.
double ref_score(const Inputs& in, int64_t i, int64_t j, bool causal) {
  if (causal && j > i) return -1e9;
  if (j == i) return -1e5;
  double nn = 0, s = 0;
  for (int d = 0; d < in.dh; ++d) nn += in.qk[size_t(j * in.ld + d)] * in.qk[size_t(j * in.ld + d)];
  for (int d = 0; d < in.dh; ++d)
    s += in.qk[size_t(i * in.ld + d)] * in.qk[size_t(j * in.ld + d)] / std::sqrt(nn + 1e-12);
  return s;
}

// Softmax of query i over the key positions `keys`: writes o[0..dh), returns lse.
double ref_softmax(const Inputs& in, int64_t i, const std::vector<int64_t>& keys, bool causal,
                   double* o) {
  double m = -1e300;
  for (int64_t j : keys) m = std::max(m, ref_score(in, i, j, causal));
  double z = 0;
  for (int64_t j : keys) z += std::exp(ref_score(in, i, j, causal) - m);
  for (int d = 0; d < in.dh; ++d) o[d] = 0;
  for (int64_t j : keys) {
    const double pij = std::exp(ref_score(in, i, j, causal) - m) / z;
    for (int d = 0; d < in.dh; ++d) o[d] += pij * in.v[size_t(j * in.ld + d)];
  }
  return m + std::log(z);
}

// Brute-force chunked attention: the window is the set of key slots whose
// chunk index is c + o (o in [-before, after]) modulo n_chunks or clipped;
// rounds combined by softmax over their lse. Returns out [L, ld] (dh used).
std::vector<double> ref_chunked(const Inputs& in, const std::vector<int32_t>& perm,
                                const AttentionParams& p) {
  const int64_t L = p.L, nc = L / p.chunk;
  std::vector<double> out_r(size_t(p.n_rounds * L * p.dh)), lse(size_t(p.n_rounds * L));
  for (int r = 0; r < p.n_rounds; ++r)
    for (int64_t s = 0; s < L; ++s) {
      const int64_t i = perm[size_t(r * L + s)], c = s / p.chunk;
      std::set<int64_t> chunks;
      for (int64_t o = -p.chunks_before; o <= p.chunks_after; ++o) {
        if (p.wrap) chunks.insert(((c + o) % nc + nc) % nc);
        else if (c + o >= 0 && c + o < nc) chunks.insert(c + o);
      }
      std::vector<int64_t> keys;
      for (int64_t t = 0; t < L; ++t)
        if (chunks.count(t / p.chunk)) keys.push_back(perm[size_t(r * L + t)]);
      lse[size_t(r * L + i)] = ref_softmax(in, i, keys, p.causal, &out_r[size_t((r * L + i) * p.dh)]);
    }
  std::vector<double> out(size_t(L * p.ld), 0.0);
  for (int64_t i = 0; i < L; ++i) {
    double m = -1e300, z = 0;
    for (int r = 0; r < p.n_rounds; ++r) m = std::max(m, lse[size_t(r * L + i)]);
    for (int r = 0; r < p.n_rounds; ++r) z += std::exp(lse[size_t(r * L + i)] - m);
    for (int r = 0; r < p.n_rounds; ++r)
      for (int d = 0; d < p.dh; ++d)
        out[size_t(i * p.ld + d)] +=
            std::exp(lse[size_t(r * L + i)] - m) / z * out_r[size_t((r * L + i) * p.dh + d)];
  }
  return out;
}

void expect_padding_untouched(const std::vector<double>& x, const AttentionParams& p,
                              double value) {
  for (int64_t i = 0; i < p.L; ++i)
    for (int64_t d = p.dh; d < p.ld; ++d) ASSERT_EQ(x[size_t(i * p.ld + d)], value) << i << "," << d;
}

// Central-difference check of the chunked backward (dqk, dv) for loss = sum out * g.
void check_chunked_grads(const AttentionParams& p, const std::vector<int32_t>& perm,
                         uint64_t seed) {
  Inputs in = make_inputs(p.L, p.dh, p.ld, seed);
  const Grads an = chunked_grads(in, perm, p);
  auto f = [&] { return weighted_sum(run_chunked(in.qk, in.v, perm, p).out, in.g, p); };
  const auto nq = numeric_grad(f, in.qk.data(), int64_t(in.qk.size()));
  const auto nv = numeric_grad(f, in.v.data(), int64_t(in.v.size()));
  ASSERT_GT(max_abs(nq), 1e-2);  // the check is not vacuous
  ASSERT_GT(max_abs(nv), 1e-2);
  EXPECT_LE(max_rel_err(an.dqk.data(), nq.data(), int64_t(nq.size()), kGradAtol), kGradTol);
  EXPECT_LE(max_rel_err(an.dv.data(), nv.data(), int64_t(nv.size()), kGradAtol), kGradTol);
  expect_padding_untouched(an.dqk, p, 0.0);
  expect_padding_untouched(an.dv, p, 0.0);
}

void check_full_grads(const AttentionParams& p, uint64_t seed) {
  Inputs in = make_inputs(p.L, p.dh, p.ld, seed);
  const Grads an = full_grads(in, p);
  auto f = [&] { return weighted_sum(run_full(in.qk, in.v, p).out, in.g, p); };
  const auto nq = numeric_grad(f, in.qk.data(), int64_t(in.qk.size()));
  const auto nv = numeric_grad(f, in.v.data(), int64_t(in.v.size()));
  ASSERT_GT(max_abs(nq), 1e-2);
  ASSERT_GT(max_abs(nv), 1e-2);
  EXPECT_LE(max_rel_err(an.dqk.data(), nq.data(), int64_t(nq.size()), kGradAtol), kGradTol);
  EXPECT_LE(max_rel_err(an.dv.data(), nv.data(), int64_t(nv.size()), kGradAtol), kGradTol);
  expect_padding_untouched(an.dqk, p, 0.0);
  expect_padding_untouched(an.dv, p, 0.0);
}

// ---------------------------------------------------------------- forward

TEST(ChunkedAttention, EqualsFullWhenWindowCoversSequence) {
  // L = 2 * chunk with one chunk of look-back (wrapping): every query sees all keys.
  for (bool causal : {true, false})
    for (int rounds : {1, 2, 3}) {
      const auto p = params(24, 5, 7, rounds, 12, 1, 0, true, causal);
      const Inputs in = make_inputs(p.L, p.dh, p.ld, 11 + uint64_t(rounds));
      const auto perm = random_perms(rounds, p.L, 7u * uint32_t(rounds));
      const auto c = run_chunked(in.qk, in.v, perm, p);
      const auto f = run_full(in.qk, in.v, p);
      EXPECT_LE(max_abs_diff(c.out, f.out, p), 1e-12) << "causal " << causal << " rounds " << rounds;
      // Each round's saved lse is the full lse, by position.
      for (int r = 0; r < rounds; ++r)
        for (int64_t i = 0; i < p.L; ++i)
          EXPECT_NEAR(c.lse[size_t(r * p.L + i)], f.lse[size_t(i)], 1e-12);
      expect_padding_untouched(c.out, p, kSentinel);
    }
}

TEST(ChunkedAttention, MatchesBruteForceWindows) {
  struct Case { int64_t L; int chunk, before, after; bool wrap, causal; int rounds; };
  const Case cases[] = {
      {40, 8, 1, 0, true, true, 2},   {40, 8, 1, 0, false, true, 1},
      {40, 8, 2, 1, true, false, 3},  {40, 10, 1, 1, false, false, 2},
      {36, 12, 2, 0, true, true, 2},  // look-back of 2 chunks out of 3, wrapping
      {24, 6, 3, 1, true, false, 2},  // 5 offsets over 4 chunks: one chunk named twice
      {24, 4, 0, 0, true, true, 1},   // each chunk alone
  };
  for (const Case& k : cases) {
    const auto p = params(k.L, 7, 9, k.rounds, k.chunk, k.before, k.after, k.wrap, k.causal);
    const Inputs in = make_inputs(p.L, p.dh, p.ld, 21);
    const auto perm = random_perms(k.rounds, p.L, 5);
    const auto c = run_chunked(in.qk, in.v, perm, p);
    EXPECT_LE(max_abs_diff(c.out, ref_chunked(in, perm, p), p), 1e-12)
        << "L " << k.L << " chunk " << k.chunk << " before " << k.before << " after " << k.after
        << " wrap " << k.wrap << " causal " << k.causal;
  }
}

TEST(ChunkedAttention, RepeatedWindowChunkCountedOnce) {
  // Two chunks, one before and one after, wrapping: chunk 0's window names
  // chunk 1 twice. Counted once, every query sees each key once: full attention.
  const auto p = params(24, 5, 6, 1, 12, 1, 1, true, false);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 31);
  const auto perm = random_perms(1, p.L, 3);
  const auto c = run_chunked(in.qk, in.v, perm, p);
  EXPECT_LE(max_abs_diff(c.out, run_full(in.qk, in.v, p).out, p), 1e-12);
}

TEST(ChunkedAttention, LocalAttentionSeesOwnAndPreviousChunk) {
  for (bool causal : {true, false}) {
    const auto p = params(40, 5, 8, 1, 8, 1, 0, false, causal);
    const Inputs in = make_inputs(p.L, p.dh, p.ld, 41);
    const auto c = run_chunked(in.qk, in.v, identity_perms(1, p.L), p);
    std::vector<double> ref(size_t(p.L * p.ld), 0.0);
    for (int64_t i = 0; i < p.L; ++i) {
      std::vector<int64_t> keys;
      for (int64_t j = 0; j < p.L; ++j)
        if (j / p.chunk == i / p.chunk || j / p.chunk == i / p.chunk - 1) keys.push_back(j);
      ref_softmax(in, i, keys, causal, &ref[size_t(i * p.ld)]);
    }
    EXPECT_LE(max_abs_diff(c.out, ref, p), 1e-12) << "causal " << causal;
  }
}

TEST(ChunkedAttention, IdenticalRoundsEqualOneRound) {
  const auto p1 = params(40, 7, 7, 1, 8, 1, 0, true, true);
  auto p3 = p1;
  p3.n_rounds = 3;
  const Inputs in = make_inputs(p1.L, p1.dh, p1.ld, 51);
  const auto one = random_perms(1, p1.L, 9);
  std::vector<int32_t> three;
  for (int r = 0; r < 3; ++r) three.insert(three.end(), one.begin(), one.end());
  const auto a = run_chunked(in.qk, in.v, one, p1);
  const auto b = run_chunked(in.qk, in.v, three, p3);
  EXPECT_LE(max_abs_diff(a.out, b.out, p1), 1e-13);
  // Gradients too: the three rounds share each pair's probability.
  const Grads ga = chunked_grads(in, one, p1), gb = chunked_grads(in, three, p3);
  EXPECT_LE(max_abs_diff(ga.dqk, gb.dqk, p1), 1e-12);
  EXPECT_LE(max_abs_diff(ga.dv, gb.dv, p1), 1e-12);
}

TEST(ChunkedAttention, RoundsAreSavedIndependentlyByPosition) {
  const auto p = params(24, 5, 7, 3, 6, 1, 0, true, true);
  auto p1 = p;
  p1.n_rounds = 1;
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 61);
  const auto perm = random_perms(3, p.L, 13);
  const auto all = run_chunked(in.qk, in.v, perm, p);
  for (int r = 0; r < 3; ++r) {
    const std::vector<int32_t> pr(perm.begin() + r * p.L, perm.begin() + (r + 1) * p.L);
    const auto one = run_chunked(in.qk, in.v, pr, p1);
    for (int64_t i = 0; i < p.L; ++i) {
      EXPECT_EQ(all.lse[size_t(r * p.L + i)], one.lse[size_t(i)]);
      for (int d = 0; d < p.dh; ++d) {
        EXPECT_EQ(all.out_r[size_t((r * p.L + i) * p.dh + d)], one.out_r[size_t(i * p.dh + d)]);
        // With one round, out is out_r (weight exp(0) = 1).
        EXPECT_EQ(one.out[size_t(i * p.ld + d)], one.out_r[size_t(i * p.dh + d)]);
      }
    }
  }
}

// Rounds attended one call at a time with a null out (framework/
// attention_lsh.cpp, by round) and folded into out as they come give the
// combination all rounds in one call give, padding columns untouched.
TEST(ChunkedAttention, RoundsFoldedOneAtATimeEqualAllAtOnce) {
  const auto p = params(24, 5, 7, 3, 6, 1, 0, true, true);
  auto p1 = p;
  p1.n_rounds = 1;
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 71, 3.0);
  const auto perm = random_perms(3, p.L, 17);
  const auto all = run_chunked(in.qk, in.v, perm, p);
  std::vector<double> out(size_t(p.L * p.ld), kSentinel), out_1(size_t(p.L * p.dh));
  std::vector<double> lse(size_t(3 * p.L));
  for (int r = 0; r < 3; ++r) {
    chunked_attention_forward<double>(nullptr, out_1.data(), lse.data() + r * p.L, in.qk.data(),
                                      in.v.data(), perm.data() + r * p.L, p1);
    fold_round(out.data(), out_1.data(), lse.data(), r, p.L, p.dh, p.ld);
    if (r == 0)  // the first round is copied as it is
      for (int64_t i = 0; i < p.L; ++i)
        for (int d = 0; d < p.dh; ++d)
          ASSERT_EQ(out[size_t(i * p.ld + d)], out_1[size_t(i * p.dh + d)]);
  }
  EXPECT_EQ(lse, all.lse);
  EXPECT_LE(max_abs_diff(out, all.out, p), 1e-14);
  double moved = 0.0;  // the rounds differ, so folding changed the first round's output
  for (int64_t i = 0; i < p.L; ++i)
    for (int d = 0; d < p.dh; ++d)
      moved = std::max(moved,
                       std::abs(out[size_t(i * p.ld + d)] - all.out_r[size_t(i * p.dh + d)]));
  EXPECT_GT(moved, 1e-3);
  for (int64_t i = 0; i < p.L; ++i)
    for (int64_t d = p.dh; d < p.ld; ++d) EXPECT_EQ(out[size_t(i * p.ld + d)], kSentinel);
  EXPECT_THROW(fold_round(out.data(), out_1.data(), lse.data(), -1, p.L, p.dh, p.ld), ShapeError);
  EXPECT_THROW(fold_round(out.data(), out_1.data(), lse.data(), 0, p.L, p.dh, p.dh - 1),
               ShapeError);
  // One call with fold_rounds: the same bits (out_1 left with the last
  // round), also without out_r (a slot of the op's own); it needs out.
  auto pf = p;
  pf.fold_rounds = true;
  std::vector<double> out_f(size_t(p.L * p.ld), kSentinel), out_1f(size_t(p.L * p.dh));
  std::vector<double> lse_f(size_t(3 * p.L));
  chunked_attention_forward<double>(out_f.data(), out_1f.data(), lse_f.data(), in.qk.data(),
                                    in.v.data(), perm.data(), pf);
  EXPECT_EQ(out_f, out);
  EXPECT_EQ(out_1f, out_1);
  EXPECT_EQ(lse_f, lse);
  std::vector<double> out_n(size_t(p.L * p.ld), kSentinel), lse_n(size_t(3 * p.L));
  chunked_attention_forward<double>(out_n.data(), nullptr, lse_n.data(), in.qk.data(),
                                    in.v.data(), perm.data(), pf);
  EXPECT_EQ(out_n, out);
  EXPECT_EQ(lse_n, lse);
  EXPECT_THROW(chunked_attention_forward<double>(nullptr, out_1f.data(), lse_f.data(),
                                                 in.qk.data(), in.v.data(), perm.data(), pf),
               ShapeError);
}

// lse_combine_backward adds w dout into its part's columns, or writes it
// (accumulate false), leaving the row's other columns alone.
TEST(LseCombineBackward, AddsOrWritesThePartsColumns) {
  LseCombineParams p;
  p.N = 3;
  p.parts = 2;
  p.dh = 2;
  p.ld_parts = 5;
  p.ld_lse = 2;
  p.ld_out = 3;
  const std::vector<double> dout = {1, 2, 9, 3, 4, 9, 5, 6, 9};
  const std::vector<double> w = {0.5, 0.25, 1, 2, -1, 0};
  std::vector<double> added(15, 1.0), written(15, 1.0);
  lse_combine_backward(added.data(), dout.data(), w.data(), p);
  p.accumulate = false;
  lse_combine_backward(written.data(), dout.data(), w.data(), p);
  for (int n = 0; n < 3; ++n) {
    for (int k = 0; k < 2; ++k)
      for (int d = 0; d < 2; ++d) {
        const double g = w[size_t(n * 2 + k)] * dout[size_t(n * 3 + d)];
        EXPECT_EQ(added[size_t(n * 5 + k * 2 + d)], 1.0 + g);
        EXPECT_EQ(written[size_t(n * 5 + k * 2 + d)], g);
      }
    EXPECT_EQ(added[size_t(n * 5 + 4)], 1.0);
    EXPECT_EQ(written[size_t(n * 5 + 4)], 1.0);
  }
}

TEST(ChunkedAttention, InvariantToSlotOrderWithinChunks) {
  const auto p = params(40, 5, 7, 2, 8, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 71);
  const auto perm = random_perms(2, p.L, 17);
  auto shuffled = perm;
  std::mt19937 gen(3);
  for (int64_t c = 0; c < 2 * p.L / p.chunk; ++c)
    std::shuffle(shuffled.begin() + c * p.chunk, shuffled.begin() + (c + 1) * p.chunk, gen);
  ASSERT_NE(perm, shuffled);
  EXPECT_LE(max_abs_diff(run_chunked(in.qk, in.v, perm, p).out,
                         run_chunked(in.qk, in.v, shuffled, p).out, p), 1e-13);
  const Grads a = chunked_grads(in, perm, p), b = chunked_grads(in, shuffled, p);
  EXPECT_LE(max_abs_diff(a.dqk, b.dqk, p), 1e-12);
  EXPECT_LE(max_abs_diff(a.dv, b.dv, p), 1e-12);
}

TEST(ChunkedAttention, KeysAreNormalised) {
  // Scaling row j of qk by a positive factor leaves k_hat_j unchanged, so
  // only query j's output can change.
  const auto p = params(24, 5, 7, 2, 6, 1, 0, true, false);
  Inputs in = make_inputs(p.L, p.dh, p.ld, 81);
  const auto perm = random_perms(2, p.L, 19);
  const auto a = run_chunked(in.qk, in.v, perm, p);
  const int64_t j = 9;
  for (int d = 0; d < p.dh; ++d) in.qk[size_t(j * p.ld + d)] *= 3.0;
  const auto b = run_chunked(in.qk, in.v, perm, p);
  double changed = 0;
  for (int64_t i = 0; i < p.L; ++i)
    for (int d = 0; d < p.dh; ++d) {
      const double diff = std::fabs(a.out[size_t(i * p.ld + d)] - b.out[size_t(i * p.ld + d)]);
      if (i == j) {
        changed = std::max(changed, diff);
      } else {
        EXPECT_LE(diff, 1e-14) << i;
      }
    }
  EXPECT_GT(changed, 1e-6);
}

TEST(ChunkedAttention, CausalOutputIgnoresLaterPositions) {
  const auto p = params(40, 5, 7, 3, 8, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 91);
  const auto perm = random_perms(3, p.L, 23);
  const auto base = run_chunked(in.qk, in.v, perm, p);
  for (int64_t cut : {0, 7, 20, 38}) {
    Inputs mod = in;
    for (int64_t i = cut + 1; i < p.L; ++i)
      for (int d = 0; d < p.dh; ++d) {
        mod.qk[size_t(i * p.ld + d)] = -2.0 * mod.qk[size_t(i * p.ld + d)] + 0.3;
        mod.v[size_t(i * p.ld + d)] += 1.0;
      }
    const auto o = run_chunked(mod.qk, mod.v, perm, p);
    for (int64_t i = 0; i <= cut; ++i)
      for (int d = 0; d < p.dh; ++d)
        EXPECT_EQ(o.out[size_t(i * p.ld + d)], base.out[size_t(i * p.ld + d)]) << cut << " " << i;
  }
}

TEST(ChunkedAttention, FirstPositionAttendsToItself) {
  for (int rounds : {1, 3}) {
    const auto p = params(24, 5, 7, rounds, 6, 1, 0, true, true);
    const Inputs in = make_inputs(p.L, p.dh, p.ld, 101);
    const auto o = run_chunked(in.qk, in.v, random_perms(rounds, p.L, 29), p);
    for (int d = 0; d < p.dh; ++d) EXPECT_NEAR(o.out[size_t(d)], in.v[size_t(d)], 1e-15);
  }
}

TEST(ChunkedAttention, ZeroKeyStaysFinite) {
  const auto p = params(12, 5, 5, 2, 4, 1, 0, true, true);
  Inputs in = make_inputs(p.L, p.dh, p.ld, 111);
  for (int d = 0; d < p.dh; ++d) in.qk[size_t(3 * p.ld + d)] = 0.0;
  const auto perm = random_perms(2, p.L, 31);
  const auto o = run_chunked(in.qk, in.v, perm, p);
  const Grads g = chunked_grads(in, perm, p);
  for (double x : o.out) EXPECT_TRUE(std::isfinite(x));
  for (double x : g.dqk) EXPECT_TRUE(std::isfinite(x));
  for (double x : g.dv) EXPECT_TRUE(std::isfinite(x));
}

// Without out_r the forward writes the same out and lse (the rounds'
// outputs then live in the op); with neither out nor out_r it refuses.
TEST(ChunkedAttention, OutWithoutRoundOutputs) {
  const auto p = params(48, 6, 9, 3, 8, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 131);
  const auto perm = random_perms(3, p.L, 41);
  const auto both = run_chunked(in.qk, in.v, perm, p);
  std::vector<double> out(size_t(p.L * p.ld), kSentinel), lse(size_t(p.n_rounds * p.L), 0.0);
  chunked_attention_forward(out.data(), static_cast<double*>(nullptr), lse.data(), in.qk.data(),
                            in.v.data(), perm.data(), p);
  EXPECT_EQ(out, both.out);
  EXPECT_EQ(lse, both.lse);
  EXPECT_THROW(chunked_attention_forward(static_cast<double*>(nullptr),
                                         static_cast<double*>(nullptr), lse.data(), in.qk.data(),
                                         in.v.data(), perm.data(), p),
               ShapeError);
}

TEST(ChunkedAttention, FloatAgreesWithDouble) {
  const auto p = params(40, 7, 9, 2, 8, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 121);
  const auto perm = random_perms(2, p.L, 37);
  const auto d = run_chunked(in.qk, in.v, perm, p);
  const std::vector<float> qkf(in.qk.begin(), in.qk.end()), vf(in.v.begin(), in.v.end()),
      gf(in.g.begin(), in.g.end());
  const auto f = run_chunked(qkf, vf, perm, p);
  std::vector<float> dqk(qkf.size(), 0.f), dv(vf.size(), 0.f);
  chunked_attention_backward(dqk.data(), dv.data(), gf.data(), qkf.data(), vf.data(), perm.data(),
                             f.out.data(), p.ld, f.lse.data(), p);
  const Grads gd = chunked_grads(in, perm, p);
  // fp32 rounding (6e-8) grown by sums over ~16 keys and exp: 1e-5 relative to O(1) values.
  for (size_t k = 0; k < d.out.size(); ++k) {
    EXPECT_NEAR(f.out[k], d.out[k], 1e-5 * (1 + std::fabs(d.out[k])));
    EXPECT_NEAR(dqk[k], gd.dqk[k], 1e-5 * (1 + std::fabs(gd.dqk[k])));
    EXPECT_NEAR(dv[k], gd.dv[k], 1e-5 * (1 + std::fabs(gd.dv[k])));
  }
}

TEST(ChunkedAttention, SameBitsForAnyThreadCount) {
  // Large enough that the kernels do run on several threads.
  const auto p = params(256, 8, 9, 3, 16, 1, 1, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 131);
  const auto perm = random_perms(3, p.L, 41);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto a = run_chunked(in.qk, in.v, perm, p);
  const Grads ga = chunked_grads(in, perm, p);
  for (int threads : {2, 3, 5}) {
    omp_set_num_threads(threads);
    const auto b = run_chunked(in.qk, in.v, perm, p);
    const Grads gb = chunked_grads(in, perm, p);
    EXPECT_EQ(a.out, b.out) << threads;
    EXPECT_EQ(a.lse, b.lse) << threads;
    EXPECT_EQ(ga.dqk, gb.dqk) << threads;
    EXPECT_EQ(ga.dv, gb.dv) << threads;
  }
  omp_set_num_threads(saved);
}

TEST(ChunkedAttention, RejectsChunkNotDividingL) {
  const auto p = params(20, 5, 5, 1, 6, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 1);
  const auto perm = identity_perms(1, p.L);
  std::vector<double> out(in.qk.size()), out_r(size_t(p.L * p.dh)), lse(size_t(p.L));
  EXPECT_THROW(chunked_attention_forward(out.data(), out_r.data(), lse.data(), in.qk.data(),
                                         in.v.data(), perm.data(), p),
               ShapeError);
}

// ---------------------------------------------------------------- backward

TEST(ChunkedAttentionBackward, GradEqualsFullWhenWindowCoversSequence) {
  for (bool causal : {true, false})
    for (int rounds : {1, 2, 3}) {
      const auto p = params(24, 5, 7, rounds, 12, 1, 0, true, causal);
      const Inputs in = make_inputs(p.L, p.dh, p.ld, 141 + uint64_t(rounds));
      const auto perm = random_perms(rounds, p.L, 43u * uint32_t(rounds));
      const Grads c = chunked_grads(in, perm, p), f = full_grads(in, p);
      EXPECT_LE(max_abs_diff(c.dqk, f.dqk, p), 1e-12) << "causal " << causal << " rounds " << rounds;
      EXPECT_LE(max_abs_diff(c.dv, f.dv, p), 1e-12) << "causal " << causal << " rounds " << rounds;
    }
}

TEST(ChunkedAttentionBackward, FiniteDifferencesTwoRoundsCausalWrap) {
  check_chunked_grads(params(24, 5, 7, 2, 6, 1, 0, true, true), random_perms(2, 24, 47), 151);
}

TEST(ChunkedAttentionBackward, FiniteDifferencesThreeRoundsCausalWrap) {
  check_chunked_grads(params(40, 7, 9, 3, 8, 1, 0, true, true), random_perms(3, 40, 53), 161);
}

TEST(ChunkedAttentionBackward, FiniteDifferencesLookAheadNonCausal) {
  check_chunked_grads(params(24, 5, 6, 2, 4, 1, 1, true, false), random_perms(2, 24, 59), 171);
}

TEST(ChunkedAttentionBackward, FiniteDifferencesLocalNoWrap) {
  check_chunked_grads(params(24, 5, 7, 1, 6, 1, 0, false, true), identity_perms(1, 24), 181);
}

TEST(ChunkedAttentionBackward, FiniteDifferencesRepeatedWindowChunk) {
  // Three chunks, two before and one after: every window would name one chunk twice.
  check_chunked_grads(params(18, 5, 7, 2, 6, 2, 1, true, true), random_perms(2, 18, 61), 191);
}

TEST(ChunkedAttentionBackward, FiniteDifferencesFoldedRounds) {
  auto p = params(24, 5, 7, 3, 6, 1, 0, true, true);
  p.fold_rounds = true;  // the forward folds too (run_chunked passes out and out_r)
  check_chunked_grads(p, random_perms(3, 24, 73), 163);
}

TEST(ChunkedAttentionBackward, Accumulates) {
  const auto p = params(24, 5, 7, 2, 6, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 201);
  const auto perm = random_perms(2, p.L, 67);
  const Grads g0 = chunked_grads(in, perm, p, 0.0), g1 = chunked_grads(in, perm, p, 0.75);
  for (size_t k = 0; k < g0.dqk.size(); ++k) {
    EXPECT_NEAR(g1.dqk[k], g0.dqk[k] + 0.75, 1e-15);
    EXPECT_NEAR(g1.dv[k], g0.dv[k] + 0.75, 1e-15);
  }
}

// accumulate false: the [L, dh] slices are written (the same bits as adding
// into zeros), the columns past dh (ld = 6 > dh = 5) left as they were.
void expect_written(const Grads& zero_added, const Grads& written, int64_t ld, int dh,
                    double init) {
  for (size_t k = 0; k < written.dqk.size(); ++k) {
    const bool in_slice = int64_t(k) % ld < dh;
    EXPECT_EQ(written.dqk[k], in_slice ? zero_added.dqk[k] : init) << k;
    EXPECT_EQ(written.dv[k], in_slice ? zero_added.dv[k] : init) << k;
  }
}

TEST(ChunkedAttentionBackward, WritesWithoutAccumulate) {
  auto p = params(24, 5, 6, 2, 6, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 203);
  const auto perm = random_perms(2, p.L, 69);
  const Grads g0 = chunked_grads(in, perm, p, 0.0);
  p.accumulate = false;
  expect_written(g0, chunked_grads(in, perm, p, 0.75), p.ld, p.dh, 0.75);
}

// fold_rounds adds the rounds' shares one at a time: the gradients of the
// all-rounds call, and of one-round calls given the combined output and
// w_r dout (the rule of kernels/ops.h, combine_rounds), up to rounding;
// without accumulate round 0 writes the slices.
TEST(ChunkedAttentionBackward, RoundsFoldedEqualAllAtOnceAndOneRoundCalls) {
  const auto p = params(24, 5, 7, 3, 6, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 207, 3.0);
  const auto perm = random_perms(3, p.L, 79);
  auto pf = p;
  pf.fold_rounds = true;
  const Grads all = chunked_grads(in, perm, p, 0.75);
  const Grads folded = chunked_grads(in, perm, pf, 0.75);
  ASSERT_GT(max_abs(all.dqk), 1e-2);
  for (size_t k = 0; k < all.dqk.size(); ++k) {
    EXPECT_NEAR(folded.dqk[k], all.dqk[k], 1e-13) << k;
    EXPECT_NEAR(folded.dv[k], all.dv[k], 1e-13) << k;
  }
  // One call per round with w_r dout.
  const auto o = run_chunked(in.qk, in.v, perm, p);
  std::vector<double> w(size_t(3 * p.L)), dout_r(in.g.size(), 0.0);
  combine_rounds<double>(nullptr, w.data(), o.out_r.data(), o.lse.data(), 3, p.L, p.dh, p.ld);
  auto p1 = p;
  p1.n_rounds = 1;
  Grads rounds{std::vector<double>(in.qk.size(), 0.75), std::vector<double>(in.v.size(), 0.75)};
  for (int r = 0; r < 3; ++r) {
    for (int64_t i = 0; i < p.L; ++i)
      for (int d = 0; d < p.dh; ++d)
        dout_r[size_t(i * p.ld + d)] = w[size_t(r * p.L + i)] * in.g[size_t(i * p.ld + d)];
    chunked_attention_backward(rounds.dqk.data(), rounds.dv.data(), dout_r.data(), in.qk.data(),
                               in.v.data(), perm.data() + r * p.L, o.out.data(), p.ld,
                               o.lse.data() + r * p.L, p1);
  }
  for (size_t k = 0; k < all.dqk.size(); ++k) {
    EXPECT_NEAR(folded.dqk[k], rounds.dqk[k], 1e-13) << k;
    EXPECT_NEAR(folded.dv[k], rounds.dv[k], 1e-13) << k;
  }
  pf.accumulate = false;
  expect_written(chunked_grads(in, perm, pf, 0.0), chunked_grads(in, perm, pf, 0.75), p.ld, p.dh,
                 0.75);
}

TEST(ChunkedAttentionBackward, NullGradientIsSkipped) {
  const auto p = params(24, 5, 7, 2, 6, 1, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 211);
  const auto perm = random_perms(2, p.L, 71);
  const auto o = run_chunked(in.qk, in.v, perm, p);
  const Grads both = chunked_grads(in, perm, p);
  std::vector<double> dqk(in.qk.size(), 0.0), dv(in.v.size(), 0.0);
  chunked_attention_backward(dqk.data(), static_cast<double*>(nullptr), in.g.data(), in.qk.data(),
                             in.v.data(), perm.data(), o.out.data(), p.ld, o.lse.data(), p);
  chunked_attention_backward(static_cast<double*>(nullptr), dv.data(), in.g.data(), in.qk.data(),
                             in.v.data(), perm.data(), o.out.data(), p.ld, o.lse.data(), p);
  EXPECT_EQ(dqk, both.dqk);
  EXPECT_EQ(dv, both.dv);
}

// ---------------------------------------------------------------- full

TEST(FullAttention, MatchesBruteForce) {
  for (bool causal : {true, false}) {
    const auto p = params(12, 7, 9, 1, 0, 0, 0, true, causal);
    const Inputs in = make_inputs(p.L, p.dh, p.ld, 221);
    const auto o = run_full(in.qk, in.v, p);
    std::vector<double> ref(size_t(p.L * p.ld), 0.0);
    for (int64_t i = 0; i < p.L; ++i) {
      std::vector<int64_t> keys(size_t(p.L));
      std::iota(keys.begin(), keys.end(), 0);
      EXPECT_NEAR(ref_softmax(in, i, keys, causal, &ref[size_t(i * p.ld)]), o.lse[size_t(i)],
                  1e-12);
    }
    EXPECT_LE(max_abs_diff(o.out, ref, p), 1e-12);
    expect_padding_untouched(o.out, p, kSentinel);
  }
}

TEST(FullAttention, CausalOutputIgnoresLaterPositions) {
  const auto p = params(24, 5, 7, 1, 0, 0, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 231);
  const auto base = run_full(in.qk, in.v, p);
  for (int64_t cut : {0, 5, 22}) {
    Inputs mod = in;
    for (int64_t i = cut + 1; i < p.L; ++i)
      for (int d = 0; d < p.dh; ++d) {
        mod.qk[size_t(i * p.ld + d)] *= -3.0;
        mod.v[size_t(i * p.ld + d)] -= 2.0;
      }
    const auto o = run_full(mod.qk, mod.v, p);
    for (int64_t i = 0; i <= cut; ++i)
      for (int d = 0; d < p.dh; ++d)
        EXPECT_EQ(o.out[size_t(i * p.ld + d)], base.out[size_t(i * p.ld + d)]) << cut << " " << i;
  }
}

TEST(FullAttention, FirstPositionAttendsToItself) {
  const auto p = params(12, 5, 7, 1, 0, 0, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 241);
  const auto o = run_full(in.qk, in.v, p);
  for (int d = 0; d < p.dh; ++d) EXPECT_EQ(o.out[size_t(d)], in.v[size_t(d)]);
  EXPECT_EQ(o.lse[0], -1e5);
}

TEST(FullAttention, SameBitsForAnyThreadCount) {
  const auto p = params(160, 8, 9, 1, 0, 0, 0, true, true);  // large enough to use threads
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 245);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto a = run_full(in.qk, in.v, p);
  const Grads ga = full_grads(in, p);
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const auto b = run_full(in.qk, in.v, p);
    const Grads gb = full_grads(in, p);
    EXPECT_EQ(a.out, b.out) << threads;
    EXPECT_EQ(a.lse, b.lse) << threads;
    EXPECT_EQ(ga.dqk, gb.dqk) << threads;
    EXPECT_EQ(ga.dv, gb.dv) << threads;
  }
  omp_set_num_threads(saved);
}

TEST(FullAttentionBackward, FiniteDifferencesCausal) {
  check_full_grads(params(12, 5, 7, 1, 0, 0, 0, true, true), 251);
}

TEST(FullAttentionBackward, FiniteDifferencesNonCausal) {
  check_full_grads(params(12, 7, 8, 1, 0, 0, 0, true, false), 261);
}

TEST(FullAttentionBackward, WritesWithoutAccumulate) {
  auto p = params(12, 5, 6, 1, 0, 0, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 273);
  const Grads g0 = full_grads(in, p, 0.0);
  p.accumulate = false;
  expect_written(g0, full_grads(in, p, -0.5), p.ld, p.dh, -0.5);
}

TEST(FullAttentionBackward, AccumulatesAndSkipsNull) {
  const auto p = params(12, 5, 7, 1, 0, 0, 0, true, true);
  const Inputs in = make_inputs(p.L, p.dh, p.ld, 271);
  const Grads g0 = full_grads(in, p, 0.0), g1 = full_grads(in, p, -0.5);
  for (size_t k = 0; k < g0.dqk.size(); ++k) {
    // Several += per element, so the initial value changes the rounding.
    EXPECT_NEAR(g1.dqk[k], g0.dqk[k] - 0.5, 1e-13);
    EXPECT_NEAR(g1.dv[k], g0.dv[k] - 0.5, 1e-13);
  }
  const auto o = run_full(in.qk, in.v, p);
  std::vector<double> dv(in.v.size(), 0.0);
  full_attention_backward(static_cast<double*>(nullptr), dv.data(), in.g.data(), o.out.data(),
                          in.qk.data(), in.v.data(), o.lse.data(), p);
  EXPECT_EQ(dv, g0.dv);
}

// The CPU attention writes fp32 outputs: a call asking for bf16 ones
// (AttentionParams::out_bf16) is refused, chunked and full.
TEST(ChunkedAttention, RefusesBf16Outputs) {
  AttentionParams p;
  p.L = 8;
  p.dh = 2;
  p.ld = 2;
  p.chunk = 4;
  p.out_bf16 = true;
  std::vector<float> qk(16, 0.5f), v(16, 0.25f), out(16), lse(8);
  std::vector<int32_t> perm(8);
  std::iota(perm.begin(), perm.end(), 0);
  EXPECT_THROW(chunked_attention_forward(out.data(), static_cast<float*>(nullptr),
                                              lse.data(), qk.data(), v.data(), perm.data(), p),
               ShapeError);
  EXPECT_THROW(full_attention_forward(out.data(), lse.data(), qk.data(), v.data(), p),
               ShapeError);
  p.out_bf16 = false;
  chunked_attention_forward(out.data(), static_cast<float*>(nullptr), lse.data(), qk.data(),
                                 v.data(), perm.data(), p);
  EXPECT_FLOAT_EQ(out[0], 0.25f);
}

// Nor does its backward write bf16 gradients (AttentionParams::grad_bf16),
// nor either read bf16 operands (in_bf16).
TEST(ChunkedAttention, RefusesBf16GradientsAndOperands) {
  AttentionParams p;
  p.L = 8;
  p.dh = 2;
  p.ld = 2;
  p.chunk = 4;
  p.n_rounds = 2;
  p.accumulate = false;
  std::vector<float> qk(16, 0.5f), v(16, 0.25f), out(16), lse(16), dout(16, 1.0f), dqk(16),
      dv(16);
  std::vector<int32_t> perm(16);
  std::iota(perm.begin(), perm.begin() + 8, 0);
  std::iota(perm.begin() + 8, perm.end(), 0);
  chunked_attention_forward(out.data(), static_cast<float*>(nullptr), lse.data(), qk.data(),
                            v.data(), perm.data(), p);
  p.grad_bf16 = true;
  p.ld_grad = 4;
  EXPECT_THROW(chunked_attention_backward(dqk.data(), dv.data(), dout.data(), qk.data(),
                                          v.data(), perm.data(), out.data(), p.ld, lse.data(),
                                          p),
               ShapeError);
  p.grad_bf16 = false;
  p.in_bf16 = true;  // nor bf16 operands
  EXPECT_THROW(chunked_attention_forward(out.data(), static_cast<float*>(nullptr), lse.data(),
                                         qk.data(), v.data(), perm.data(), p),
               ShapeError);
  EXPECT_THROW(chunked_attention_backward(dqk.data(), dv.data(), dout.data(), qk.data(),
                                          v.data(), perm.data(), out.data(), p.ld, lse.data(),
                                          p),
               ShapeError);
  p.in_bf16 = false;
  chunked_attention_backward(dqk.data(), dv.data(), dout.data(), qk.data(), v.data(),
                             perm.data(), out.data(), p.ld, lse.data(), p);
  EXPECT_NE(dv[0], 0.0f);
}

}  // namespace
}  // namespace reformer::cpu

