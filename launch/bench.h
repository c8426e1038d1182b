// `reformer bench`: step throughput and memory at several sequence lengths.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/config.h"
#include "kernels/profiling_ops.h"

namespace reformer {

struct BenchRow {
  int64_t length = 0;
  std::string device;
  double ms_per_step = 0;      // one sequence: forward, backward, optimizer
  double tokens_per_s = 0;
  double device_peak_gib = -1; // peak device memory held by the run's ops; -1: not tracked
  double planned_gib = 0;      // the memory plan's peak for the step (framework/memory_plan.h)
  double host_peak_gib = 0;    // peak resident memory of the process
  double tflops = 0;           // model FLOP/s (framework/flops.h) / 1e12
  double mfu = -1;             // tflops / the device's ceiling; -1: no ceiling known
  // The memory knobs as fitted to the device (memory_plan.h): kept and
  // stashed layers, heads per attention pass.
  int kept_layers = 0, stashed_layers = 0, heads_per_pass = 0;
  std::string kept_attention;  // what kept layers keep of their attention
  std::string kept_ffn;        // and of their feed-forward hidden layer
  std::string kept_x1;         // and whether x1 ("x1" or "x1 rebuilt")
  std::string kept_ln;         // and the LayerNorm rows ("LN rows" or "LN rows rebuilt")
  // With breakdown: per-op totals over the timed steps (ProfilingOps), in
  // op-list order; empty otherwise.
  std::vector<OpStats> ops;
  int steps = 0;               // timed steps
};

// Runs `steps` timed training steps (after one warm-up step) of `base` at each
// length (model.max_len replaced, axial shape and buckets re-derived). Every
// length's configuration is validated before the first runs: a length the
// model cannot take (not positive, too long, not a multiple of the bucket
// size, ...) throws ConfigError naming it. With breakdown the device Ops is
// wrapped in a ProfilingOps for the whole run and each row carries the
// per-op times of the timed steps (the per-op timing adds a little to
// ms/step).
std::vector<BenchRow> run_bench(const Config& base, const std::vector<int64_t>& lengths,
                                int steps, const std::string& config_name,
                                bool breakdown = false);

// One layout's figures from `reformer bench` under mpirun (every rank runs
// it; rank 0's timings are reported).
struct ParallelBenchRow {
  std::string layout;         // "dp 2 x sp 1 (nccl)"
  int64_t length = 0;         // positions per sequence
  int batch = 0;              // sequences per step, all ranks
  double ms_per_step = 0;     // whole training step, gradients summed
  double tokens_per_s = 0;    // batch * length / step time
  double ms_compute = -1;     // the same step without the gradient sum; -1: one rank
  double ms_reduce = -1;      // the trainer's bucketed all-reduce of the gradients alone
  double ms_one_call = -1;    // one all-reduce call over the same bytes
  double ms_exposed = -1;     // per step, the wait for the gradient sum after the backward
                              // (GradReducer::take_exposed_ms)
  double ms_exchange = -1;    // per step, the compute stream's time in the sequence-parallel
                              // exchanges (ReformerModel::take_exchange_ms); -1: sp 1
  double grad_mib = 0;        // gradient bytes reduced per step
  double device_peak_gib = -1;
  double tflops_per_gpu = 0;  // model FLOP/s per rank / 1e12
  double mfu = -1;            // per rank, against its ceiling; -1: none known
  double planned_gib = 0;     // the memory plan's peak for one rank
  // With a breakdown: per rank, per op, ms per step with and without the
  // gradient sum; [rank][op] in op-list order (empty without a breakdown).
  std::vector<std::vector<OpStats>> ops_with, ops_without;
  int steps = 0;  // timed steps per pass
};

// Runs `steps` timed steps of `cfg` through the Trainer over `world`
// (parallel.dp x parallel.sp, any backend), then times the gradient
// reduction alone, bucketed as the trainer does it and as one call. With
// `breakdown`, every op is timed on every rank (ProfilingOps) in the passes
// with and without the sum.
ParallelBenchRow run_parallel_bench(const Config& cfg, Communicator& world, int steps,
                                    bool breakdown);
std::string format_parallel_bench(const ParallelBenchRow& row, int world_size);
// Per op and rank: ms per step with and without the gradient sum, the ops
// whose time differs most first (where the sum's cost lands).
std::string format_parallel_breakdown(const ParallelBenchRow& row);

// A Markdown table of the rows.
std::string format_bench(const std::vector<BenchRow>& rows);

// A Markdown table of one row's per-op times (ops with calls, slowest first):
// op, calls per step, ms per step, % of the step's wall time.
std::string format_breakdown(const BenchRow& row);

}  // namespace reformer
