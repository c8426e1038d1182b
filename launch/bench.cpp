// `reformer bench`: training-step throughput and memory of a configuration at
// several sequence lengths, printed as a table (one forward + backward +
// optimizer step per sequence, batch 1, random bytes).
#include "launch/bench.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <sstream>

#include "framework/device.h"
#include "kernels/errors.h"
#include "framework/logging.h"
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
  std::vector<BenchRow> rows;
  for (const int64_t L : lengths) {
    Config cfg = base;
    cfg.model.max_len = int(L);
    cfg.model.axial_shape.clear();  // re-derived for this length
    cfg.attention.n_buckets = 0;
    validate_config(cfg, config_name + " (bench length " + std::to_string(L) + ")");
    auto device_ops = make_ops(cfg.training.device);
    std::unique_ptr<ProfilingOps> profiler;
    if (breakdown)
      profiler = std::make_unique<ProfilingOps>(*device_ops, clock_for(*device_ops));
    Ops<float>* ops = profiler ? profiler.get() : device_ops.get();
    ReformerModel<float> model(cfg, *ops);
    model.init_params(cfg.training.seed);
    Optimizer<float> opt(cfg.optimizer, model.table(), *ops);
    std::vector<int32_t> tokens(static_cast<size_t>(L)), targets(static_cast<size_t>(L));
    const RngKey key = make_key(cfg.training.seed, /*purpose: bench*/ 9);
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
    step(0);  // warm-up: first-touch allocations, library initialisation
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
    r.host_peak_gib = host_peak_gib();
    r.steps = steps;
    if (profiler) r.ops = profiler->stats();
    rows.push_back(r);
    log_info(strfmt("bench: %s L=%lld %.1f ms/step %.0f tok/s", r.device.c_str(), (long long)L,
                    r.ms_per_step, r.tokens_per_s));
  }
  return rows;
}

std::string format_bench(const std::vector<BenchRow>& rows) {
  std::ostringstream o;
  o << "| device | length | ms/step | tokens/s | device peak GiB | host peak GiB |\n";
  o << "| --- | --- | --- | --- | --- | --- |\n";
  for (const BenchRow& r : rows)
    o << strfmt("| %s | %lld | %.1f | %.0f | %s | %.2f |\n", r.device.c_str(), (long long)r.length,
                r.ms_per_step, r.tokens_per_s,
                r.device_peak_gib >= 0 ? strfmt("%.2f", r.device_peak_gib).c_str() : "-",
                r.host_peak_gib);
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
  o << "| op | calls | ms | % of step |\n";
  o << "| --- | --- | --- | --- |\n";
  for (const OpStats& s : ops)
    o << strfmt("| %s | %.4g | %.3f | %.1f |\n", op_name(s.op), double(s.calls) / steps,
                s.ms / steps, row.ms_per_step > 0 ? 100.0 * (s.ms / steps) / row.ms_per_step : 0.0);
  return o.str();
}

}  // namespace reformer
