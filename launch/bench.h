// `reformer bench`: step throughput and memory at several sequence lengths.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "framework/config.h"

namespace reformer {

struct BenchRow {
  int64_t length = 0;
  std::string device;
  double ms_per_step = 0;      // one sequence: forward, backward, optimizer
  double tokens_per_s = 0;
  double device_peak_gib = -1; // peak device memory held by the run's ops; -1: not tracked
  double host_peak_gib = 0;    // peak resident memory of the process
};

// Runs `steps` timed training steps (after one warm-up step) of `base` at each
// length (model.max_len replaced, axial shape and buckets re-derived). Every
// length's configuration is validated before the first runs: a length the
// model cannot take (not positive, too long, not a multiple of the bucket
// size, ...) throws ConfigError naming it.
std::vector<BenchRow> run_bench(const Config& base, const std::vector<int64_t>& lengths,
                                int steps, const std::string& config_name);

// A Markdown table of the rows.
std::string format_bench(const std::vector<BenchRow>& rows);

}  // namespace reformer
