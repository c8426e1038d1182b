// Conformance of the attention ops (harness: conformance.h) against the fp64
// CPU reference: chunked attention (LSH-like and local-like windows, odd
// widths, the largest chunk, several rounds) and exact full attention. Each
// backward case runs its own forward first on every side (the backward's
// inputs out_r / out and lse come from that side's forward), then
// accumulates onto nonzero gradients; null gradients are skipped; every case
// is bitwise reproducible (the harness runs it twice).
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
};

std::string describe(const AttnShape& c) {
  return "L" + std::to_string(c.L) + " dh" + std::to_string(c.dh) + " chunk" +
         std::to_string(c.chunk) + " rounds" + std::to_string(c.rounds) + " before" +
         std::to_string(c.before) + " after" + std::to_string(c.after) + (c.wrap ? " wrap" : "") +
         (c.causal ? " causal" : "");
}

// Random permutations per round from random buckets through the CPU sort.
std::vector<int32_t> random_perm(int64_t L, int rounds, uint64_t seed) {
  std::vector<int32_t> b(static_cast<size_t>(L * rounds)), perm(b.size());
  const RngKey key = make_key(seed, RngPurpose::test, 5);
  for (size_t k = 0; k < b.size(); ++k) b[k] = int32_t(rng_u32(key, k) % 8u);
  CpuOps<float>().lsh_sort(perm.data(), b.data(), L, rounds, 8);
  return perm;
}

AttentionParams params(const AttnShape& c, int64_t ld) {
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
  return p;
}

const Tol kLse{1e-4, 1e-5};  // log-sum-exp of O(1) scores: absolute 1e-4
// dqk after two accumulated backward calls: twice the single-call error.
const Tol kAttentionDqkTwice{4e-4, 1e-4};

void add_chunked(std::vector<Case>& cases) {
  const AttnShape shapes[] = {
      {96, 64, 16, 2, 1, 0, true, true},     // LSH-like, two rounds
      {256, 128, 64, 4, 1, 1, true, false},  // widest head, look-ahead, not causal
      {60, 24, 12, 1, 2, 0, false, true},    // local-like: odd width, clipped window
      {32, 32, 16, 3, 1, 1, true, true},     // two chunks: a repeated window chunk counts once
      {512, 128, 256, 2, 1, 0, true, true},  // largest chunk
      {97, 65, 97, 1, 1, 0, true, true},     // one chunk of odd size, dh > 64
  };
  for (const AttnShape& c : shapes) {
    const AttentionParams p = params(c, 2 * c.dh + 3);  // a head slice of a wider [L, ld] buffer
    const int64_t n = c.L * p.ld, nr = int64_t(c.rounds) * c.L;
    const std::vector<TensorSpec> in = {input("qk", n, 60, -1.5, 1.5), input("v", n, 61),
                                        input("dout", n, 62),
                                        ints("perm", random_perm(c.L, c.rounds, 63))};
    auto with = [&](std::vector<TensorSpec> extra) {
      std::vector<TensorSpec> t = in;
      t.insert(t.end(), extra.begin(), extra.end());
      return t;
    };
    const std::string s = " " + describe(c);
    const auto forward = [p](auto& ops, auto& t) {
      ops.chunked_attention_forward(t("out"), t("out_r"), t("lse"), t("qk"), t("v"),
                                    t.i("perm"), p);
    };
    const std::vector<TensorSpec> saved = {output("out_r", nr * c.dh, 65, kAttention),
                                           output("lse", nr, 66, kLse)};
    std::vector<TensorSpec> fwd = saved;
    fwd.push_back(output("out", n, 67, kAttention));
    cases.push_back(make_case("chunked_attention_forward" + s, OpId::chunked_attention_forward,
                              with(fwd), forward));
    std::vector<TensorSpec> bwd = fwd;
    bwd.push_back(output("dqk", n, 68, kAttentionDqk));
    bwd.push_back(output("dv", n, 69, kAttention));
    cases.push_back(make_case("chunked_attention_backward" + s, OpId::chunked_attention_backward,
                              with(bwd), [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.chunked_attention_backward(t("dqk"), t("dv"), t("dout"),
                                                               t("qk"), t("v"), t.i("perm"),
                                                               t("out_r"), t("lse"), p);
                              }));
    // Null gradients are skipped; a second call accumulates the same increment.
    bwd = fwd;
    bwd.push_back(output("dqk", n, 68, kAttentionDqkTwice));
    cases.push_back(make_case("chunked_attention_backward dqk only twice" + s,
                              OpId::chunked_attention_backward, with(bwd),
                              [=](auto& ops, auto& t) {
                                forward(ops, t);
                                for (int k = 0; k < 2; ++k)
                                  ops.chunked_attention_backward(t("dqk"), nullptr, t("dout"),
                                                                 t("qk"), t("v"), t.i("perm"),
                                                                 t("out_r"), t("lse"), p);
                              }));
    bwd = fwd;
    bwd.push_back(output("dv", n, 69, kAttention));
    cases.push_back(make_case("chunked_attention_backward dv only" + s,
                              OpId::chunked_attention_backward, with(bwd),
                              [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.chunked_attention_backward(nullptr, t("dv"), t("dout"),
                                                               t("qk"), t("v"), t.i("perm"),
                                                               t("out_r"), t("lse"), p);
                              }));
  }
}

void add_full(std::vector<Case>& cases) {
  struct Shape {
    int64_t L;
    int dh;
    bool causal;
  };
  for (const Shape c : {Shape{97, 64, true}, Shape{97, 64, false}, Shape{300, 128, true},
                        Shape{16, 7, true}, Shape{1, 32, true}}) {
    AttentionParams p;
    p.L = c.L;
    p.dh = c.dh;
    p.ld = c.dh + 5;
    p.causal = c.causal;
    const int64_t n = c.L * p.ld;
    const std::string s =
        " L" + std::to_string(c.L) + " dh" + std::to_string(c.dh) + (c.causal ? " causal" : "");
    const std::vector<TensorSpec> fwd = {input("qk", n, 70, -1.5, 1.5), input("v", n, 71),
                                         input("dout", n, 72), output("out", n, 75, kAttention),
                                         output("lse", c.L, 76, kLse)};
    const auto forward = [p](auto& ops, auto& t) {
      ops.full_attention_forward(t("out"), t("lse"), t("qk"), t("v"), p);
    };
    cases.push_back(
        make_case("full_attention_forward" + s, OpId::full_attention_forward, fwd, forward));
    std::vector<TensorSpec> bwd = fwd;
    bwd.push_back(output("dqk", n, 73, kAttentionDqk));
    bwd.push_back(output("dv", n, 74, kAttention));
    cases.push_back(make_case("full_attention_backward" + s, OpId::full_attention_backward, bwd,
                              [=](auto& ops, auto& t) {
                                forward(ops, t);
                                ops.full_attention_backward(t("dqk"), t("dv"), t("dout"), t("out"),
                                                            t("qk"), t("v"), t("lse"), p);
                              }));
  }
}

std::vector<Case> attention_cases() {
  std::vector<Case> cases;
  add_chunked(cases);
  add_full(cases);
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

}  // namespace
