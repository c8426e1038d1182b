// Conformance of lse_combine_forward / lse_combine_backward (harness:
// conformance.h) against the fp64 CPU reference: a head combined from parts
// of several rounds each, parts of one round (replicas: equal weights), large
// lse values (a query that saw only itself) and strided rows.
#include <string>
#include <vector>

#include "tests/gpu/conformance.h"

using namespace reformer;
using namespace reformer::conformance;

namespace {

struct CombineShape {
  int64_t N;
  int parts, rounds, dh;
  double lse_lo, lse_hi;  // range of the log-sum-exps
};

std::vector<Case> lse_combine_cases() {
  const CombineShape shapes[] = {
      {97, 2, 2, 64, -3, 3},        // two ranks of two rounds each
      {64, 4, 1, 32, -1, 1},        // four parts of one round
      {33, 3, 2, 65, -1e5, -1e5 + 4},  // large lse, odd width
  };
  std::vector<Case> cases;
  for (const CombineShape& c : shapes) {
    LseCombineParams p;
    p.N = c.N;
    p.parts = c.parts;
    p.rounds = c.rounds;
    p.dh = c.dh;
    p.ld_parts = int64_t(c.parts) * c.dh + 3;
    p.ld_lse = int64_t(c.parts) * c.rounds + 1;
    p.ld_out = c.dh + 7;
    const std::string name = " N" + std::to_string(c.N) + " parts" + std::to_string(c.parts) +
                             " rounds" + std::to_string(c.rounds) + " dh" + std::to_string(c.dh);
    cases.push_back(make_case(
        "lse_combine_forward" + name, OpId::lse_combine_forward,
        {input("parts", c.N * p.ld_parts, 90), input("lse", c.N * p.ld_lse, 91, c.lse_lo, c.lse_hi),
         output("out", c.N * p.ld_out, 92, kFp32Reduction),
         output("w", c.N * c.parts, 93, kFp32Reduction)},
        [p](auto& ops, auto& t) { ops.lse_combine_forward(t("out"), t("w"), t("parts"), t("lse"), p); }));
    cases.push_back(make_case(
        "lse_combine_backward" + name, OpId::lse_combine_backward,
        {input("dout", c.N * p.ld_out, 94), input("w", c.N * c.parts, 95, 0.0, 1.0),
         output("dparts", c.N * p.ld_parts, 96, kFp32Elementwise)},
        [p](auto& ops, auto& t) { ops.lse_combine_backward(t("dparts"), t("dout"), t("w"), p); }));
    LseCombineParams pw = p;  // written, not added
    pw.accumulate = false;
    cases.push_back(make_case(
        "lse_combine_backward written" + name, OpId::lse_combine_backward,
        {input("dout", c.N * p.ld_out, 94), input("w", c.N * c.parts, 95, 0.0, 1.0),
         output("dparts", c.N * p.ld_parts, 96, kFp32Elementwise)},
        [pw](auto& ops, auto& t) { ops.lse_combine_backward(t("dparts"), t("dout"), t("w"), pw); }));
  }
  return cases;
}

REFORMER_CONFORMANCE_SUITE(LseCombineOps, lse_combine_cases());

}  // namespace
