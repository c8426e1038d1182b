// Conformance of the attention ops (harness: conformance.h) against the fp64
// CPU reference: chunked attention (LSH-like and local-like windows, odd
// widths, the largest chunk, several rounds) and exact full attention. Each
// backward case runs its own forward first on every side (the backward's
// inputs out_r / out and lse come from that side's forward), then
// accumulates onto nonzero gradients; null gradients are skipped; every case
// is bitwise reproducible (the harness runs it twice). Every case runs at both
// AttentionPrecision values (fp32: CUDA-core kernels, bf16: tensor cores),
// with the tolerances of its precision (see AttnTols).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/errors.h"
#include "tests/gpu/conformance.h"

using namespace reformer;
using namespace reformer::conformance;

namespace {

struct AttnShape {
  int64_t L;
  int dh, chunk, rounds, before, after;
  bool wrap, causal;
  bool reversed = false;  // perm: every round descending (a query sees only later keys
                          // in the chunks before it: all masked but itself at chunk starts)
};

const char* precision_name(AttentionPrecision pr) {
  return pr == AttentionPrecision::bf16 ? " bf16" : " fp32";
}

std::string describe(const AttnShape& c) {
  return "L" + std::to_string(c.L) + " dh" + std::to_string(c.dh) + " chunk" +
         std::to_string(c.chunk) + " rounds" + std::to_string(c.rounds) + " before" +
         std::to_string(c.before) + " after" + std::to_string(c.after) + (c.wrap ? " wrap" : "") +
         (c.causal ? " causal" : "") + (c.reversed ? " reversed" : "");
}

// Random permutations per round from random buckets through the CPU sort.
std::vector<int32_t> random_perm(int64_t L, int rounds, uint64_t seed) {
  std::vector<int32_t> b(static_cast<size_t>(L * rounds)), perm(b.size());
  const RngKey key = make_key(seed, RngPurpose::test, 5);
  for (size_t k = 0; k < b.size(); ++k) b[k] = int32_t(rng_u32(key, k) % 8u);
  CpuOps<float>().lsh_sort(perm.data(), b.data(), L, rounds, 8);
  return perm;
}

std::vector<int32_t> reversed_perm(int64_t L, int rounds) {
  std::vector<int32_t> perm(static_cast<size_t>(L * rounds));
  for (size_t k = 0; k < perm.size(); ++k) perm[k] = int32_t(L - 1 - int64_t(k) % L);
  return perm;
}

AttentionParams params(const AttnShape& c, int64_t ld, AttentionPrecision pr) {
  AttentionParams p;
  p.L = c.L;
  p.dh = c.dh;
  p.ld = ld;
  p.n_rounds = c.rounds;
  p.chunk = c.chunk;
  p.chunks_before = c.before;
  p.chunks_after = c.after;
  p.wrap = c.wrap;
  p.causal = c.causal;
  p.precision = pr;
  return p;
}

// Tolerances of one precision: out and out_r, lse, dqk (one call and two
// accumulated calls), dv.
struct AttnTols {
  Tol out, lse, dqk, dqk_twice, dv;
};

// fp32: kernels in fp32, scores are sums of dh products of O(1) numbers, then
// softmax: 1e-4 absolute and relative (kAttention; dqk sums the query and the
// key side: kAttentionDqk, twice that after two accumulated calls); lse of
// O(1) scores: absolute 1e-4.
//
// bf16: q, k_hat, v, dout, the probabilities P and dS are rounded to bf16
// (8-bit significand: relative error u = 2^-9 ~ 2e-3 each), products
// accumulate in fp32. Bounds used, with |v|, |dout| <= 1 and |qk| <= 1.5:
//  - out (a convex combination of v rows): rounding v and P costs <= 2u
//    max|v|; a score error ds moves the weights by ~ds relative, and ds is a
//    random-walk sum of dh products each off by ~2u relative, ~ 2u |q| |k_hat|
//    / sqrt(dh) ~ 2u; the rounds combination adds the lse error times
//    |out_r|. Total ~ 6u ~ 1.2e-2 worst case; an fp64 emulation of these
//    roundings on the full cases gives at most 2.9e-3: atol 1e-2 + 1e-2 rel.
//  - lse: the max score error, ~ 2u (emulated at most 4e-3): atol 1e-2 (the
//    rtol keeps lse = -1e5 of positions that see only themselves exact).
//  - dqk, dv: GEMM-like sums of rounded products with fp32 accumulation,
//    judged against the largest increment (they accumulate onto random
//    initial values): emulated at most 0.5% (dqk) and 0.3% (dv) of it; 2e-2
//    of it (kBf16Gemm's bound for bf16 GEMMs).
AttnTols tols(AttentionPrecision pr) {
  if (pr == AttentionPrecision::fp32)
    return {kAttention, Tol{1e-4, 1e-5}, kAttentionDqk, Tol{4e-4, 1e-4}, kAttention};
  const Tol grad{1e-4, 0, 0, 2e-2};
  return {Tol{1e-2, 1e-2}, Tol{1e-2, 1e-5}, grad, grad, grad};
}

constexpr AttentionPrecision kPrecisions[] = {AttentionPrecision::fp32, AttentionPrecision::bf16};

void add_chunked(std::vector<Case>& cases, AttentionPrecision pr) {
  const AttnShape shapes[] = {
      {96, 64, 16, 2, 1, 0, true, true},     // LSH-like, two rounds
      {256, 128, 64, 4, 1, 1, true, false},  // widest head, look-ahead, not causal
      {60, 24, 12, 1, 2, 0, false, true},    // local-like: odd width, clipped window
      {32, 32, 16, 3, 1, 1, true, true},     // two chunks: a repeated window chunk counts once
      {512, 128, 256, 2, 1, 0, true, true},  // largest chunk
      {97, 65, 97, 1, 1, 0, true, true},     // one chunk of odd size, dh > 64
      // Tensor-core tiling (64-row tiles, 64-key passes, 16-wide k-steps;
      // forward and backward only, the null-gradient variants above suffice):
      {256, 64, 32, 4, 1, 0, true, true},     // chunk 32: half-empty row tiles, 4 rounds
      {384, 128, 128, 1, 2, 0, false, true},  // chunk 128: two row tiles, 3-chunk clipped window
      {320, 128, 64, 4, 0, 0, true, false},   // no look-back, not causal
      {192, 64, 64, 2, 2, 0, true, true},     // 3 chunks, before 2 with wrap: every chunk once
      {200, 40, 40, 2, 1, 0, false, true},    // odd dh, chunk not a multiple of 16
      {256, 128, 64, 1, 1, 0, false, true, true},  // all keys masked but self at chunk starts
      {192, 64, 32, 2, 2, 0, true, true, true},    // the same with wrap and before 2
      // The walking forward (chunk 64, look-one-back; runs of 4 chunks):
      {576, 128, 64, 3, 1, 0, true, true},   // 9 chunks: runs of 4, 4 and 1, wrap
      {448, 64, 64, 2, 1, 0, false, false},  // 7 chunks, no wrap (chunk 0 sees itself only)
      {128, 32, 64, 2, 1, 0, true, true},    // 2 chunks with wrap: each the other's previous
      {320, 33, 64, 2, 1, 0, true, true},    // odd dh: outputs one column per store
  };
  // Enough chunks for the walking kernels' longer runs on a 132-SM device
  // (an H200): 528 chunks, 4 rounds, runs of 8 in the forward (mma_walk)
  // and of 16 in the backward (mma_bwd_walk). Its tensors are large, so
  // only the model's path runs on it (tensor cores, forward without out_r,
  // then the backward), and it is listed only where a GPU is (so that
  // REFORMER_CONFORMANCE_CPU=1 without one does not run it on the CPU).
  const AttnShape long_walk = {33792, 32, 64, 4, 1, 0, true, true};
  constexpr size_t kWithNullGradients = 6;  // the first shapes also run the null-gradient variants
  const AttnTols tol = tols(pr);
  std::vector<AttnShape> all(std::begin(shapes), std::end(shapes));
  if (pr == AttentionPrecision::bf16 && cuda_device_count() > 0) all.push_back(long_walk);
  for (const AttnShape& c : all) {
    const bool only_model_path = c.L == long_walk.L;
    const AttentionParams p = params(c, 2 * c.dh + 3, pr);  // a head slice of a wider [L, ld] buffer
    const int64_t n = c.L * p.ld, nr = int64_t(c.rounds) * c.L;
    const std::vector<TensorSpec> in = {
        input("qk", n, 60, -1.5, 1.5), input("v", n, 61), input("dout", n, 62),
        ints("perm", c.reversed ? reversed_perm(c.L, c.rounds) : random_perm(c.L, c.rounds, 63))};
    auto with = [&](std::vector<TensorSpec> extra) {
      std::vector<TensorSpec> t = in;
      t.insert(t.end(), extra.begin(), extra.end());
      return t;
    };
    const std::string s = " " + describe(c) + precision_name(pr);
    const auto forward = [p](auto& ops, auto& t) {
      ops.chunked_attention_forward(t("out"), t("out_r"), t("lse"), t("qk"), t("v"),
                                    t.i("perm"), p);
    };
    // Without out_r the op keeps the rounds' outputs itself (bf16 on tensor
    // cores) and combines them from there; then the backward from that out.
    const auto forward_out = [p](auto& ops, auto& t) {
      ops.chunked_attention_forward(t("out"), nullptr, t("lse"), t("qk"), t("v"), t.i("perm"), p);
    };
    cases.push_back(make_case("chunked_attention_forward without out_r" + s,
                              OpId::chunked_attention_forward,
                              with({output("lse", nr, 66, tol.lse), output("out", n, 67, tol.out),
                                    output("dqk", n, 68, tol.dqk), output("dv", n, 69, tol.dv)}),
                              [=](auto& ops, auto& t) {
                                forward_out(ops, t);
                                ops.chunked_attention_backward(t("dqk"), t("dv"), t("dout"),
                                                               t("qk"), t("v"), t.i("perm"),
                                                               t("out"), p.ld, t("lse"), p);
                              }));
    if (only_model_path) continue;
    const std::vector<TensorSpec> saved = {output("out_r", nr * c.dh, 65, tol.out),
                                           output("lse", nr, 66, tol.lse)};
    std::vector<TensorSpec> fwd = saved;
    fwd.push_back(output("out", n, 67, tol.out));
    cases.push_back(make_case("chunked_attention_forward" + s, OpId::chunked_attention_forward,
                              with(fwd), forward));
    std::vector<TensorSpec> bwd = fwd;
    bwd.push_back(output("dqk", n, 68, tol.dqk));
    bwd.push_back(output("dv", n, 69, tol.dv));
    cases.push_back(make_case("chunked_attention_backward" + s, OpId::chunked_attention_backward,
                              with(bwd), [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.chunked_attention_backward(t("dqk"), t("dv"), t("dout"),
                                                               t("qk"), t("v"), t.i("perm"),
                                                               t("out"), p.ld, t("lse"), p);
                              }));
    // accumulate false: dqk and dv start random and are written, their
    // columns past dh (ld > dh) left as they are.
    AttentionParams pw = p;
    pw.accumulate = false;
    cases.push_back(make_case("chunked_attention_backward written" + s,
                              OpId::chunked_attention_backward, with(bwd),
                              [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.chunked_attention_backward(t("dqk"), t("dv"), t("dout"),
                                                               t("qk"), t("v"), t.i("perm"),
                                                               t("out"), p.ld, t("lse"), pw);
                              }));
    if (c.rounds > 1) {
      // Rounds attended one call at a time (framework/attention_lsh.cpp, by
      // round): combine_rounds gives out and the rounds' weights, and
      // one-round backward calls given the combined output (copied into
      // round 0's out_r rows, [L, dh]) and the round's weight times dout add
      // the gradients of all rounds.
      AttentionParams p1 = p;
      p1.n_rounds = 1;
      std::vector<TensorSpec> rr = saved;
      rr.push_back(output("out", n, 67, tol.out));
      rr.push_back(output("w", nr, 70, tol.lse));
      rr.push_back(output("dqk", n, 68, tol.dqk));
      rr.push_back(output("dv", n, 69, tol.dv));
      rr.push_back(output("dout_r", n, 71, tol.out));
      LseCombineParams share;
      share.N = c.L;
      share.dh = c.dh;
      share.ld_parts = p.ld;
      share.ld_lse = 1;
      share.ld_out = p.ld;
      cases.push_back(make_case(
          "combine_rounds and backward round by round" + s, OpId::combine_rounds, with(rr),
          [=](auto& ops, auto& t) {
            for (int r = 0; r < c.rounds; ++r)
              ops.chunked_attention_forward(t("out"), t("out_r") + r * c.L * c.dh,
                                            t("lse") + r * c.L, t("qk"), t("v"),
                                            t.i("perm") + r * c.L, p1);
            ops.combine_rounds(t("out"), t("w"), t("out_r"), t("lse"), c.rounds, c.L, c.dh,
                               p.ld);
            ops.copy_2d(t("out_r"), c.dh, t("out"), p.ld, c.L, c.dh);
            for (int r = 0; r < c.rounds; ++r) {
              ops.fill(t("dout_r"), 0, n);
              ops.lse_combine_backward(t("dout_r"), t("dout"), t("w") + r * c.L, share);
              ops.chunked_attention_backward(t("dqk"), t("dv"), t("dout_r"), t("qk"), t("v"),
                                             t.i("perm") + r * c.L, t("out_r"), c.dh,
                                             t("lse") + r * c.L, p1);
            }
          }));
      // As framework/attention_lsh.cpp does it by round: each round's
      // forward into one out_r slot (out null), folded into out as it comes;
      // the backward adds the rounds' shares one at a time (fold_rounds: a
      // device stages its operands once for the rounds).
      AttentionParams pf = p;
      pf.fold_rounds = true;
      const std::vector<TensorSpec> fr = {
          output("out_1", c.L * c.dh, 72, tol.out), output("lse", nr, 66, tol.lse),
          output("out", n, 67, tol.out), output("dqk", n, 68, tol.dqk),
          output("dv", n, 69, tol.dv)};
      cases.push_back(make_case(
          "fold_round and backward folding its rounds" + s, OpId::fold_round, with(fr),
          [=](auto& ops, auto& t) {
            for (int r = 0; r < c.rounds; ++r) {
              ops.chunked_attention_forward(nullptr, t("out_1"), t("lse") + r * c.L, t("qk"),
                                            t("v"), t.i("perm") + r * c.L, p1);
              ops.fold_round(t("out"), t("out_1"), t("lse"), r, c.L, c.dh, p.ld);
            }
            ops.chunked_attention_backward(t("dqk"), t("dv"), t("dout"), t("qk"), t("v"),
                                           t.i("perm"), t("out"), p.ld, t("lse"), pf);
          }));
      // The same forward in one call (fold_rounds: a device stages the
      // operands once for the rounds).
      cases.push_back(make_case(
          "chunked_attention_forward folding its rounds" + s, OpId::chunked_attention_forward,
          with({output("out_1", c.L * c.dh, 72, tol.out), output("lse", nr, 66, tol.lse),
                output("out", n, 67, tol.out)}),
          [=](auto& ops, auto& t) {
            ops.chunked_attention_forward(t("out"), t("out_1"), t("lse"), t("qk"), t("v"),
                                          t.i("perm"), pf);
          }));
      // Both folded as framework/attention_lsh.cpp calls them (the forward
      // without out_r: a device keeps each round in bf16 in its workspace),
      // the backward writing (round 0 writes dqk and dv, which start random;
      // their columns past dh are left as they are).
      AttentionParams pfw = pf;
      pfw.accumulate = false;
      cases.push_back(make_case(
          "chunked_attention_backward folding its rounds, written" + s,
          OpId::chunked_attention_backward,
          with({output("lse", nr, 66, tol.lse), output("out", n, 67, tol.out),
                output("dqk", n, 68, tol.dqk), output("dv", n, 69, tol.dv)}),
          [=](auto& ops, auto& t) {
            ops.chunked_attention_forward(t("out"), nullptr, t("lse"), t("qk"), t("v"),
                                          t.i("perm"), pf);
            ops.chunked_attention_backward(t("dqk"), t("dv"), t("dout"), t("qk"), t("v"),
                                           t.i("perm"), t("out"), p.ld, t("lse"), pfw);
          }));
      cases.push_back(make_case("combine_rounds weights only" + s, OpId::combine_rounds,
                                with({output("out_r", nr * c.dh, 65, tol.out),
                                      output("lse", nr, 66, tol.lse),
                                      output("out", n, 67, tol.out),
                                      output("w", nr, 70, tol.lse)}),
                                [=](auto& ops, auto& t) {
                                  forward(ops, t);
                                  ops.combine_rounds(nullptr, t("w"), t("out_r"), t("lse"),
                                                     c.rounds, c.L, c.dh, c.dh);
                                }));
    }
    if (size_t(&c - all.data()) >= kWithNullGradients) continue;
    // Null gradients are skipped; a second call accumulates the same increment.
    bwd = fwd;
    bwd.push_back(output("dqk", n, 68, tol.dqk_twice));
    cases.push_back(make_case("chunked_attention_backward dqk only twice" + s,
                              OpId::chunked_attention_backward, with(bwd),
                              [=](auto& ops, auto& t) {
                                forward(ops, t);
                                for (int k = 0; k < 2; ++k)
                                  ops.chunked_attention_backward(t("dqk"), nullptr, t("dout"),
                                                                 t("qk"), t("v"), t.i("perm"),
                                                                 t("out"), p.ld, t("lse"), p);
                              }));
    bwd = fwd;
    bwd.push_back(output("dv", n, 69, tol.dv));
    cases.push_back(make_case("chunked_attention_backward dv only" + s,
                              OpId::chunked_attention_backward, with(bwd),
                              [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.chunked_attention_backward(nullptr, t("dv"), t("dout"),
                                                               t("qk"), t("v"), t.i("perm"),
                                                               t("out"), p.ld, t("lse"), p);
                              }));
  }
}

void add_full(std::vector<Case>& cases, AttentionPrecision pr) {
  struct Shape {
    int64_t L;
    int dh;
    bool causal;
  };
  const AttnTols tol = tols(pr);
  // The last four: L not a multiple of the 64-row tiles, one partial tile, odd dh.
  for (const Shape c : {Shape{97, 64, true}, Shape{97, 64, false}, Shape{300, 128, true},
                        Shape{16, 7, true}, Shape{1, 32, true}, Shape{200, 128, true},
                        Shape{130, 64, false}, Shape{65, 32, true}, Shape{150, 40, true}}) {
    AttentionParams p;
    p.L = c.L;
    p.dh = c.dh;
    p.ld = c.dh + 5;
    p.causal = c.causal;
    p.precision = pr;
    const int64_t n = c.L * p.ld;
    const std::string s = " L" + std::to_string(c.L) + " dh" + std::to_string(c.dh) +
                          (c.causal ? " causal" : "") + precision_name(pr);
    const std::vector<TensorSpec> fwd = {input("qk", n, 70, -1.5, 1.5), input("v", n, 71),
                                         input("dout", n, 72), output("out", n, 75, tol.out),
                                         output("lse", c.L, 76, tol.lse)};
    const auto forward = [p](auto& ops, auto& t) {
      ops.full_attention_forward(t("out"), t("lse"), t("qk"), t("v"), p);
    };
    cases.push_back(
        make_case("full_attention_forward" + s, OpId::full_attention_forward, fwd, forward));
    std::vector<TensorSpec> bwd = fwd;
    bwd.push_back(output("dqk", n, 73, tol.dqk));
    bwd.push_back(output("dv", n, 74, tol.dv));
    cases.push_back(make_case("full_attention_backward" + s, OpId::full_attention_backward, bwd,
                              [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.full_attention_backward(t("dqk"), t("dv"), t("dout"), t("out"),
                                                            t("qk"), t("v"), t("lse"), p);
                              }));
    AttentionParams pw = p;  // dqk, dv written (their random start discarded)
    pw.accumulate = false;
    cases.push_back(make_case("full_attention_backward written" + s,
                              OpId::full_attention_backward, bwd, [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.full_attention_backward(t("dqk"), t("dv"), t("dout"), t("out"),
                                                            t("qk"), t("v"), t("lse"), pw);
                              }));
  }
}

std::vector<Case> attention_cases() {
  std::vector<Case> cases;
  for (AttentionPrecision pr : kPrecisions) {
    add_chunked(cases, pr);
    add_full(cases, pr);
  }
  return cases;
}

REFORMER_CONFORMANCE_SUITE(AttentionOps, attention_cases());

// The CUDA kernels hold a head in registers up to dh = 128 and refuse wider
// heads with ShapeError (the CPU has no such limit).
TEST(AttentionLimits, DeviceRejectsWideHeads) {
  std::vector<Backend> backends = device_backends();
  if (backends.empty()) GTEST_SKIP() << "no device backend";
  for (Backend& b : backends) {
    SCOPED_TRACE("backend " + b.name);
    AttentionParams p;
    p.L = 8;
    p.dh = 129;
    p.ld = 129;
    p.chunk = 4;
    Buffer<float> x(*b.ops, 8 * 129), o(*b.ops, 8 * 129), lse(*b.ops, 8);
    EXPECT_THROW(b.ops->full_attention_forward(o.data(), lse.data(), x.data(), x.data(), p),
                 ShapeError);
  }
}

// The chunked forward writes the combined output, the rounds' outputs, or
// both; with neither it refuses (as the CPU, tests/cpu/test_attention.cpp),
// in either precision; folding the rounds needs out.
TEST(AttentionLimits, DeviceRejectsNoOutput) {
  std::vector<Backend> backends = device_backends();
  if (backends.empty()) GTEST_SKIP() << "no device backend";
  for (Backend& b : backends) {
    SCOPED_TRACE("backend " + b.name);
    for (AttentionPrecision pr : kPrecisions) {
      AttentionParams p;
      p.L = 16;
      p.dh = 8;
      p.ld = 8;
      p.chunk = 4;
      p.n_rounds = 2;
      p.precision = pr;
      Buffer<float> x(*b.ops, 16 * 8), lse(*b.ops, 2 * 16);
      IntBuffer<float> perm(*b.ops, 2 * 16);
      EXPECT_THROW(b.ops->chunked_attention_forward(nullptr, nullptr, lse.data(), x.data(),
                                                    x.data(), perm.data(), p),
                   ShapeError);
      AttentionParams f = p;
      f.fold_rounds = true;
      EXPECT_THROW(b.ops->chunked_attention_forward(nullptr, x.data(), lse.data(), x.data(),
                                                    x.data(), perm.data(), f),
                   ShapeError);
      EXPECT_THROW(b.ops->chunked_attention_forward(nullptr, nullptr, lse.data(), x.data(),
                                                    x.data(), perm.data(), f),
                   ShapeError);
    }
  }
}

// fold_rounds is the sequence of one-round calls each followed by
// fold_round, bit for bit, on a device too (where it stages the operands
// once instead of once per round): the walking kernels (chunks of 64) and
// the general ones (chunks of 32), both precisions.
TEST(AttentionFolded, EqualsOneRoundCallsAndFolds) {
  std::vector<Backend> backends = device_backends();
  if (backends.empty()) GTEST_SKIP() << "no device backend";
  for (Backend& b : backends) {
    for (AttentionPrecision pr : kPrecisions) {
      for (const int chunk : {64, 32}) {
        SCOPED_TRACE("backend " + b.name + ", " + precision_name(pr) + ", chunk " +
                     std::to_string(chunk));
        const int64_t L = 512, dh = 64, ld = 2 * dh + 3;
        const int R = 3;
        AttentionParams p;
        p.L = L;
        p.dh = int(dh);
        p.ld = ld;
        p.chunk = chunk;
        p.n_rounds = R;
        p.precision = pr;
        std::vector<float> x(size_t(L * ld));
        for (size_t i = 0; i < x.size(); ++i) x[i] = float(std::sin(0.37 * double(i)));
        const std::vector<int32_t> perm = random_perm(L, R, 5);
        Buffer<float> qk(*b.ops, L * ld), v(*b.ops, L * ld);
        IntBuffer<float> dperm(*b.ops, R * L);
        b.ops->from_host(qk.data(), x.data(), L * ld);
        std::reverse(x.begin(), x.end());
        b.ops->from_host(v.data(), x.data(), L * ld);
        b.ops->from_host_i32(dperm.data(), perm.data(), R * L);
        std::vector<float> outs[2], lses[2], lasts[2];
        for (int folded = 0; folded < 2; ++folded) {
          Buffer<float> out(*b.ops, L * ld), out_1(*b.ops, L * dh), lse(*b.ops, R * L);
          b.ops->fill(out.data(), 0.0f, L * ld);
          if (folded) {
            AttentionParams f = p;
            f.fold_rounds = true;
            b.ops->chunked_attention_forward(out.data(), out_1.data(), lse.data(), qk.data(),
                                             v.data(), dperm.data(), f);
          } else {
            AttentionParams one = p;
            one.n_rounds = 1;
            for (int r = 0; r < R; ++r) {
              b.ops->chunked_attention_forward(nullptr, out_1.data(), lse.data() + r * L,
                                               qk.data(), v.data(), dperm.data() + r * L, one);
              b.ops->fold_round(out.data(), out_1.data(), lse.data(), r, L, int(dh), ld);
            }
          }
          outs[folded].resize(size_t(L * ld));
          lses[folded].resize(size_t(R * L));
          lasts[folded].resize(size_t(L * dh));
          b.ops->to_host(outs[folded].data(), out.data(), L * ld);
          b.ops->to_host(lses[folded].data(), lse.data(), R * L);
          b.ops->to_host(lasts[folded].data(), out_1.data(), L * dh);
        }
        EXPECT_EQ(outs[0], outs[1]);
        EXPECT_EQ(lses[0], lses[1]);
        EXPECT_EQ(lasts[0], lasts[1]);
      }
    }
  }
}

}  // namespace
