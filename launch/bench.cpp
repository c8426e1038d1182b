// `reformer bench`: training-step throughput and memory of a configuration at
// several sequence lengths, printed as a table (one forward + backward +
// optimizer step per sequence, batch 1, random bytes).
#include "launch/bench.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <cstdio>
#include <memory>
#include <sstream>

#include "framework/device.h"
#include "framework/flops.h"
#include "framework/grad_reducer.h"
#include "framework/trainer.h"
#include "kernels/errors.h"
#include "framework/logging.h"
#include "framework/memory_plan.h"
#include "framework/model.h"
#include "framework/optimizer.h"
#include "kernels/common/philox.h"
#include "kernels/profiling_ops.h"
#if defined(REFORMER_HAVE_CUDA)
#include "kernels/cuda/cuda_ops.h"
#endif

namespace reformer {

namespace {

double seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

double gib(int64_t bytes) { return double(bytes) / double(1ull << 30); }

// The memory plan's peak for one rank of sp; on the CPU (no stream) without
// the device workspaces.
double planned_gib(Ops<float>& ops, const Config& cfg, int sp) {
  const MemoryPlan plan = plan_memory(cfg, sp);
  return gib(ops.stream() != nullptr ? plan.total_bytes() : plan.allocated_bytes());
}

double host_peak_gib() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is in KiB
}

// The clock for ProfilingOps over `ops`: CUDA events on its stream, host time
// where it has none.
std::unique_ptr<StreamClock> clock_for(Ops<float>& ops) {
#if defined(REFORMER_HAVE_CUDA)
  if (ops.stream() != nullptr) return make_cuda_stream_clock(ops.stream());
#endif
  return std::make_unique<WallClock>();
}

}  // namespace

std::vector<BenchRow> run_bench(const Config& base, const std::vector<int64_t>& lengths,
                                int steps, const std::string& config_name, bool breakdown) {
  std::vector<Config> configs;
  for (const int64_t L : lengths) {
    const std::string where = config_name + " (bench length " + std::to_string(L) + ")";
    if (L < 1 || L > kMaxLength)
      throw ConfigError(where + ": the length must be in [1, " + std::to_string(kMaxLength) + "]");
    Config cfg = base;
    cfg.model.max_len = int(L);
    cfg.model.axial_shape.clear();  // re-derived for this length
    cfg.attention.n_buckets = 0;
    validate_config(cfg, where);
    configs.push_back(cfg);
  }
  std::vector<BenchRow> rows;
  double peak = -1;  // measured once, on the first length's device
  for (Config cfg : configs) {
    const int64_t L = cfg.model.max_len;
    auto device_ops = make_ops(cfg.training.device);
    // Heads per pass and kept layers fitted to the device (memory_plan.h).
    const bool on_device = device_ops->stream() != nullptr;
    cfg.training.device = on_device ? DeviceKind::cuda : DeviceKind::cpu;
    cfg = fit_to_device(cfg, 1, on_device ? device_memory_bytes() : 0);
    std::unique_ptr<ProfilingOps> profiler;
    if (breakdown)
      profiler = std::make_unique<ProfilingOps>(*device_ops, clock_for(*device_ops));
    Ops<float>* ops = profiler ? profiler.get() : device_ops.get();
    std::unique_ptr<ReformerModel<float>> model_ptr;
    std::unique_ptr<Optimizer<float>> opt_ptr;
    try {
      model_ptr = std::make_unique<ReformerModel<float>>(cfg, *ops);
      opt_ptr = std::make_unique<Optimizer<float>>(cfg.optimizer, model_ptr->table(), *ops);
    } catch (const OutOfMemoryError& e) {
      rethrow_with_plan(e, cfg, 1);
    }
    ReformerModel<float>& model = *model_ptr;
    Optimizer<float>& opt = *opt_ptr;
    model.init_params(cfg.training.seed);
    std::vector<int32_t> tokens(static_cast<size_t>(L)), targets(static_cast<size_t>(L));
    const RngKey key = make_key(cfg.training.seed, RngPurpose::bench);
    for (int64_t i = 0; i < L; ++i)
      tokens[size_t(i)] = int32_t(rng_u32(key, uint64_t(i)) % uint32_t(cfg.model.vocab_size));
    for (int64_t i = 0; i < L; ++i) targets[size_t(i)] = i + 1 < L ? tokens[size_t(i + 1)] : -1;
    const float scale = 1.0f / float(L - 1);
    auto step = [&](int64_t s) {
      model.zero_grads();
      model.forward_backward(tokens.data(), targets.data(), uint64_t(s), true, true, scale);
      clip_grad_norm(*ops, model.grads(), model.num_params(), cfg.optimizer.grad_clip);
      opt.step(model.params(), model.grads(), s + 1, learning_rate(cfg.optimizer, s + 1, steps));
    };
    try {
      step(0);  // warm-up: first-touch allocations, library initialisation
    } catch (const OutOfMemoryError& e) {
      rethrow_with_plan(e, cfg, 1);
    }
    ops->synchronize();
    if (profiler) profiler->reset();
    const double t0 = seconds();
    for (int s = 1; s <= steps; ++s) step(s);
    ops->synchronize();
    const double dt = (seconds() - t0) / steps;
    BenchRow r;
    r.length = L;
    r.device = ops->name();
    r.ms_per_step = 1e3 * dt;
    r.tokens_per_s = double(L) / dt;
    r.device_peak_gib = ops->peak_bytes() < 0 ? -1.0 : double(ops->peak_bytes()) / double(1ull << 30);
    r.planned_gib = planned_gib(*ops, cfg, 1);
    r.host_peak_gib = host_peak_gib();
    r.steps = steps;
    if (peak < 0) peak = peak_tflops(*device_ops, cfg.logging.peak_tflops);
    r.tflops = r.tokens_per_s * train_flops(cfg).per_token / 1e12;
    r.mfu = peak > 0 ? r.tflops / peak : -1;
    r.kept_layers = kept_layer_count(cfg);
    r.stashed_layers = stashed_layer_count(cfg, 1);
    r.heads_per_pass = attention_heads_per_pass(cfg, 1);
    r.kept_attention = kept_attention_text(cfg, 1);
    r.kept_ffn = kept_ffn_text(cfg);
    r.kept_x1 = keeps_x1(cfg) ? "x1" : "x1 rebuilt";
    r.kept_ln = keeps_ln(cfg) ? "LN rows" : "LN rows rebuilt";
    if (profiler) r.ops = profiler->stats();
    rows.push_back(r);
    log_info(strfmt("bench: %s L=%lld %.1f ms/step %.0f tok/s", r.device.c_str(), (long long)L,
                    r.ms_per_step, r.tokens_per_s));
  }
  return rows;
}

namespace {

// Every rank's per-op times (ms per step) of one profiled pass: [rank][op].
std::vector<std::vector<OpStats>> gather_op_times(ProfilingOps& p, Communicator& world,
                                                  int steps) {
  const std::vector<OpStats> mine = p.stats();
  const size_t n_ops = mine.size();
  const int R = world.size();
  std::vector<double> all(size_t(R) * n_ops * 2, 0.0);  // (ms, calls) by rank and op
  for (size_t k = 0; k < n_ops; ++k) {
    all[(size_t(world.rank()) * n_ops + k) * 2] = mine[k].ms / steps;
    all[(size_t(world.rank()) * n_ops + k) * 2 + 1] = double(mine[k].calls) / steps;
  }
  world.host().allreduce_sum(all.data(), int64_t(all.size()));
  std::vector<std::vector<OpStats>> out(size_t(R), mine);
  for (int r = 0; r < R; ++r)
    for (size_t k = 0; k < n_ops; ++k) {
      out[size_t(r)][k].ms = all[(size_t(r) * n_ops + k) * 2];
      out[size_t(r)][k].calls = int64_t(all[(size_t(r) * n_ops + k) * 2 + 1] + 0.5);
    }
  p.reset();
  return out;
}

}  // namespace

ParallelBenchRow run_parallel_bench(const Config& cfg, Communicator& world, int steps,
                                    bool breakdown) {
  ProfilingOps* profiler = nullptr;
  Trainer::OpsDecorator decorate;
  if (breakdown)
    decorate = [&profiler](Ops<float>& device) -> std::unique_ptr<Ops<float>> {
      auto p = std::make_unique<ProfilingOps>(device, clock_for(device));
      profiler = p.get();
      return p;
    };
  Trainer t(cfg, world, "", decorate);
  Ops<float>& ops = t.ops();
  // Every rank idle and in step before a timer starts.
  auto sync = [&]() {
    ops.synchronize();
    world.host().barrier();
  };
  // The wait for the gradient sum after the backward, marked on the compute
  // stream (ms per step of the last timed run with the sum).
  std::unique_ptr<StreamClock> wait_clock = clock_for(ops);
  t.reducer().set_clock(wait_clock.get());
  // The sequence-parallel exchanges, marked on the compute stream too.
  const bool sp = t.grid().sp() > 1;
  std::unique_ptr<StreamClock> exchange_clock = clock_for(ops);
  if (sp) t.model().set_exchange_clock(exchange_clock.get());
  double exposed = 0, exchange = 0;
  auto time_steps = [&]() {
    t.train_step();  // warm-up
    sync();
    if (profiler) profiler->reset();
    t.reducer().take_exposed_ms();
    t.model().take_exchange_ms();
    const double t0 = seconds();
    for (int s = 0; s < steps; ++s) t.train_step();
    sync();
    const double ms = 1e3 * (seconds() - t0) / steps;
    exposed = t.reducer().take_exposed_ms() / steps;
    exchange = t.model().take_exchange_ms() / steps;
    return ms;
  };
  ParallelBenchRow r;
  r.layout = strfmt("dp %d x sp %d (%s)", t.grid().dp(), t.grid().sp(), world.backend());
  r.length = cfg.model.max_len;
  r.batch = cfg.training.batch_size;
  r.ms_per_step = time_steps();
  if (sp) r.ms_exchange = exchange;
  ReformerModel<float>& model = t.model();
  r.grad_mib = double(model.num_params()) * sizeof(float) / double(1 << 20);
  if (world.size() > 1) {
    // With and without the gradient sum, interleaved so that drift (clocks,
    // first-use costs) falls on both: on, off, on, off; each the mean of two.
    if (profiler) r.ops_with = gather_op_times(*profiler, world, steps);
    const double exposed1 = exposed;
    t.set_gradient_reduction(false);
    r.ms_compute = time_steps();
    if (profiler) r.ops_without = gather_op_times(*profiler, world, steps);
    t.set_gradient_reduction(true);
    const double on2 = time_steps();
    r.ms_exposed = 0.5 * (exposed1 + exposed);
    t.set_gradient_reduction(false);
    const double off2 = time_steps();
    t.set_gradient_reduction(true);
    log_info(strfmt("bench: ms/step with the sum %.1f, %.1f; without %.1f, %.1f", r.ms_per_step,
                    on2, r.ms_compute, off2));
    r.ms_per_step = 0.5 * (r.ms_per_step + on2);
    r.ms_compute = 0.5 * (r.ms_compute + off2);
    // The reduction alone: the trainer's buckets in the order the backward
    // pass reports them, then the same bytes as one call.
    const ParamTable& table = model.table();
    GradReducer reducer(world, model.grads(), model.num_params(),
                        int64_t(cfg.parallel.bucket_mb * 1024 * 1024 / sizeof(float)),
                        cfg.parallel.bucket_lag);
    auto bucketed = [&]() {
      reducer.begin();
      reducer.ready(head_range(table));
      for (int l = cfg.model.n_layers - 1; l >= 0; --l) reducer.ready(layer_range(table, l));
      reducer.ready(embedding_range(table));
      reducer.finish();
    };
    auto one_call = [&]() { world.allreduce_sum(model.grads(), model.num_params()); };
    auto time_it = [&](const std::function<void()>& run) {
      run();
      sync();
      const double t0 = seconds();
      for (int s = 0; s < steps; ++s) run();
      sync();
      return 1e3 * (seconds() - t0) / steps;
    };
    r.ms_reduce = time_it(bucketed);
    r.ms_one_call = time_it(one_call);
  }
  r.steps = steps;
  r.tokens_per_s = double(r.batch) * double(r.length) * 1e3 / r.ms_per_step;
  r.tflops_per_gpu = r.tokens_per_s *
                     train_flops(t.model_config(), t.grid().sp()).per_token / 1e12 / world.size();
  const double peak = peak_tflops(ops, cfg.logging.peak_tflops);
  r.mfu = peak > 0 ? r.tflops_per_gpu / peak : -1;
  r.device_peak_gib = ops.peak_bytes() < 0 ? -1.0 : double(ops.peak_bytes()) / double(1ull << 30);
  r.planned_gib = planned_gib(ops, t.model_config(), t.grid().sp());
  return r;
}

std::string format_parallel_bench(const ParallelBenchRow& r, int n) {
  // Bus bandwidth of a ring all-reduce (nccl-tests): 2 (n - 1) / n bytes per
  // byte reduced.
  const double bytes = r.grad_mib * double(1 << 20) * 2.0 * (n - 1) / n;
  auto busbw = [&](double ms) { return ms > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0; };
  std::string out =
      "| layout | length | batch | ms/step | tokens/s | ms compute only | ms reduce alone | "
      "reduce GB/s (bus) | one-call GB/s (bus) | reduce hidden | ms exposed wait | "
      "reduce hidden (wait) | TFLOP/s per GPU | MFU | peak GiB | planned GiB | "
      "ms sp exchanges |\n"
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
      "| --- | --- |\n";
  // Hidden share of the reduction alone: from the step times with and without
  // it (includes any slowdown of the backward by the concurrent reduction,
  // but rests on a small difference of two large times), and from the wait
  // the step sees after its backward (exact, but blind to that slowdown).
  const bool many = r.ms_compute >= 0;
  const double hidden =
      many && r.ms_reduce > 0 ? 1.0 - (r.ms_per_step - r.ms_compute) / r.ms_reduce : 0.0;
  const double hidden_wait =
      many && r.ms_reduce > 0 && r.ms_exposed >= 0 ? 1.0 - r.ms_exposed / r.ms_reduce : 0.0;
  out += strfmt("| %s | %lld | %d | %.1f | %.0f | %s | %s | %s | %s | %s | %s | %s | %.1f | %s | "
                "%.1f | %.1f | %s |\n",
                r.layout.c_str(), (long long)r.length, r.batch, r.ms_per_step, r.tokens_per_s,
                many ? strfmt("%.1f", r.ms_compute).c_str() : "-",
                many ? strfmt("%.2f", r.ms_reduce).c_str() : "-",
                many ? strfmt("%.0f", busbw(r.ms_reduce)).c_str() : "-",
                many ? strfmt("%.0f", busbw(r.ms_one_call)).c_str() : "-",
                many ? strfmt("%.0f%%", 100.0 * std::clamp(hidden, 0.0, 1.0)).c_str() : "-",
                many ? strfmt("%.2f", r.ms_exposed).c_str() : "-",
                many ? strfmt("%.0f%%", 100.0 * std::clamp(hidden_wait, 0.0, 1.0)).c_str() : "-",
                r.tflops_per_gpu, r.mfu >= 0 ? strfmt("%.1f%%", 100 * r.mfu).c_str() : "-",
                r.device_peak_gib, r.planned_gib,
                r.ms_exchange >= 0 ? strfmt("%.1f", r.ms_exchange).c_str() : "-");
  return out;
}

std::string format_parallel_breakdown(const ParallelBenchRow& row) {
  if (row.ops_with.empty() || row.ops_without.empty()) return "";
  const size_t R = row.ops_with.size(), n_ops = row.ops_with[0].size();
  // Ops by the largest difference over ranks, then by time.
  std::vector<size_t> order;
  auto diff = [&](size_t k) {
    double d = 0.0;
    for (size_t r = 0; r < R; ++r)
      d = std::max(d, std::abs(row.ops_with[r][k].ms - row.ops_without[r][k].ms));
    return d;
  };
  for (size_t k = 0; k < n_ops; ++k)
    if (row.ops_with[0][k].calls > 0 || row.ops_without[0][k].calls > 0) order.push_back(k);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return diff(a) > diff(b); });
  std::ostringstream o;
  o << strfmt("Per-op ms per step at length %lld, %s, by rank: with the gradient sum / without "
              "(the first pass of each; the op after the last bucket's wait absorbs any wait):\n\n",
              (long long)row.length, row.layout.c_str());
  o << "| op | calls |";
  for (size_t r = 0; r < R; ++r) o << strfmt(" rank %zu with | rank %zu without |", r, r);
  o << "\n| --- | --- |";
  for (size_t r = 0; r < R; ++r) o << " --- | --- |";
  o << "\n";
  std::vector<double> with_total(R, 0.0), without_total(R, 0.0);
  for (const size_t k : order) {
    o << strfmt("| %s | %lld |", op_name(row.ops_with[0][k].op),
                (long long)row.ops_with[0][k].calls);
    for (size_t r = 0; r < R; ++r) {
      o << strfmt(" %.3f | %.3f |", row.ops_with[r][k].ms, row.ops_without[r][k].ms);
      with_total[r] += row.ops_with[r][k].ms;
      without_total[r] += row.ops_without[r][k].ms;
    }
    o << "\n";
  }
  o << "| all ops | |";
  for (size_t r = 0; r < R; ++r) o << strfmt(" %.1f | %.1f |", with_total[r], without_total[r]);
  o << "\n";
  return o.str();
}

std::string format_bench(const std::vector<BenchRow>& rows) {
  std::ostringstream o;
  o << "| device | length | ms/step | tokens/s | model TFLOP/s | MFU | device peak GiB | "
       "planned GiB | host peak GiB | kept (their attention; feed-forward; x1; LN rows), "
       "stashed layers, heads per pass |\n";
  o << "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  for (const BenchRow& r : rows)
    o << strfmt("| %s | %lld | %.1f | %.0f | %.3g | %s | %s | %.2f | %.2f | %d (%s; %s; %s; "
                "%s), %d, %d |\n",
                r.device.c_str(), (long long)r.length, r.ms_per_step, r.tokens_per_s, r.tflops,
                r.mfu >= 0 ? strfmt("%.1f%%", 100 * r.mfu).c_str() : "-",
                r.device_peak_gib >= 0 ? strfmt("%.2f", r.device_peak_gib).c_str() : "-",
                r.planned_gib, r.host_peak_gib, r.kept_layers, r.kept_attention.c_str(),
                r.kept_ffn.c_str(), r.kept_x1.c_str(), r.kept_ln.c_str(), r.stashed_layers,
                r.heads_per_pass);
  return o.str();
}

std::string format_breakdown(const BenchRow& row) {
  std::vector<OpStats> ops;
  for (const OpStats& s : row.ops)
    if (s.calls > 0) ops.push_back(s);
  std::sort(ops.begin(), ops.end(), [](const OpStats& a, const OpStats& b) { return a.ms > b.ms; });
  const double steps = std::max(1, row.steps);
  double total_ms = 0.0;
  for (const OpStats& s : ops) total_ms += s.ms / steps;
  std::ostringstream o;
  o << strfmt("Per-op time of one step at length %lld on %s (%.1f ms/step; ops sum to %.1f ms):\n\n",
              (long long)row.length, row.device.c_str(), row.ms_per_step, total_ms);
  o << "| op | calls | ms | % of step | GFLOP | TFLOP/s |\n";
  o << "| --- | --- | --- | --- | --- | --- |\n";
  for (const OpStats& s : ops)
    o << strfmt("| %s | %.4g | %.3f | %.1f | %s | %s |\n", op_name(s.op), double(s.calls) / steps,
                s.ms / steps, row.ms_per_step > 0 ? 100.0 * (s.ms / steps) / row.ms_per_step : 0.0,
                s.flops > 0 ? strfmt("%.1f", s.flops / steps / 1e9).c_str() : "",
                s.flops > 0 && s.ms > 0 ? strfmt("%.1f", s.flops / (s.ms * 1e-3) / 1e12).c_str()
                                        : "");
  return o.str();
}

}  // namespace reformer
