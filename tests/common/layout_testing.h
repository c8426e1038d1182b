// Pieces shared by the suites that run a model under several process
// layouts (tests/mpi, tests/gpu_mpi): a temporary folder every rank sees,
// and the small model they train.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/config.h"

namespace reformer::test {

// A temporary folder shared by the ranks of `comm` (host buffers): made by
// rank 0 as /tmp/<prefix>_XXXXXX, its name broadcast.
inline std::string shared_temp_dir(Communicator& comm, const std::string& prefix) {
  char name[256] = {0};
  if (comm.rank() == 0) {
    std::string tmpl = "/tmp/" + prefix + "_XXXXXX";
    const char* d = mkdtemp(tmpl.data());
    std::snprintf(name, sizeof name, "%s", d ? d : "");
  }
  comm.broadcast(name, sizeof name, 0);
  return name;
}

// Four heads, so that sp = 2 and 4 divide them; 64 positions, 16 per rank at
// sp = 4, two chunks of 8; 20 steps of the duplication task on the CPU.
inline constexpr const char* kLayoutYaml = R"(
model:
  vocab_size: 16
  d_model: 32
  n_heads: 4
  d_ff: 48
  n_layers: 2
  max_len: 64
attention:
  kinds: [lsh]
  bucket_size: 8
  n_hashes: 2
optimizer:
  name: adamw
  lr: 3.0e-3
  warmup_steps: 5
  schedule: rsqrt
training:
  steps: 20
  batch_size: 4
  device: cpu
  log_every: 1000
  eval_every: 0
  eval_batches: 1
data:
  kind: duplication
checkpoint:
  resume: none
)";

// One sequence of L positions over V tokens: tokens[i] = (7 i + 3) mod V,
// targets the next token (-1 past the end).
struct LayoutSequence {
  std::vector<int32_t> tokens, targets;
};
inline LayoutSequence layout_sequence(int64_t L, int V) {
  LayoutSequence s{std::vector<int32_t>(static_cast<size_t>(L)),
                   std::vector<int32_t>(static_cast<size_t>(L))};
  for (int64_t i = 0; i < L; ++i) {
    s.tokens[size_t(i)] = int32_t((i * 7 + 3) % V);
    s.targets[size_t(i)] = i + 1 < L ? int32_t(((i + 1) * 7 + 3) % V) : -1;
  }
  return s;
}

// The largest |a_i - b_i| over the largest |b_i| for i < n (the difference
// itself when b is all zero).
inline double relative_max_diff(const float* a, const float* b, int64_t n) {
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, double(std::fabs(a[i] - b[i])));
    scale = std::max(scale, double(std::fabs(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

inline Config layout_config(const std::vector<std::string>& sets, const char* where) {
  return parse_config(kLayoutYaml, where, sets);
}

}  // namespace reformer::test
