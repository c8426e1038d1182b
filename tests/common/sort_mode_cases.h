// The sort-mode (distributed bucket sort) cases that the layout suites run
// against one process, on CPUs (tests/mpi/test_mpi_layouts.cpp) and on one
// shared GPU (tests/gpu_mpi/test_staged_layouts.cpp): every rank attends
// its share of the sorted slots of every head and round, with halos from
// its neighbours; no head cap (one head over every rank), any round count
// (3), look-ahead halos too (not causal), local layers as a one-bucket
// sort; all heads in one pass (the weights in place) and two heads per
// pass (gathered columns, each head's backward after the pass's forward).
#pragma once

#include <string>
#include <vector>

namespace reformer::test {

struct SortModeCase {
  const char* kinds;
  int heads, hashes, after, per_pass;
};

inline const std::vector<SortModeCase>& sort_mode_cases() {
  static const std::vector<SortModeCase> cases = {
      {"[lsh]", 4, 2, 0, 0}, {"[lsh]", 4, 2, 0, 2}, {"[lsh, local]", 1, 3, 0, 0},
      {"[local, lsh]", 2, 2, 1, 1}};
  return cases;
}

inline std::string describe(const SortModeCase& c) {
  return std::string("sort ") + c.kinds + " " + std::to_string(c.heads) + " heads x " +
         std::to_string(c.hashes) + " hashes, chunks_after " + std::to_string(c.after) +
         ", heads per pass " + std::to_string(c.per_pass);
}

// The config settings of case c (with dropout, so that masks are keyed alike).
inline std::vector<std::string> settings(const SortModeCase& c) {
  return {std::string("attention.kinds=") + c.kinds, "model.dropout=0.1",
          "model.n_heads=" + std::to_string(c.heads),
          "attention.n_hashes=" + std::to_string(c.hashes),
          "attention.chunks_after=" + std::to_string(c.after),
          c.after > 0 ? "attention.causal=false" : "attention.causal=true",
          "model.attn_heads_per_pass=" + std::to_string(c.per_pass), "parallel.sp_mode=sort"};
}

}  // namespace reformer::test
