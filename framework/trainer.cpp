#include "framework/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>

#include "framework/flops.h"
#include "framework/memory_plan.h"
#include "framework/plot.h"
#include "framework/resume_check.h"
#include "framework/same_config.h"
#include "kernels/errors.h"

namespace reformer {

namespace {
volatile std::sig_atomic_t g_stop = 0;

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

std::string human_count(double x) {
  if (x >= 1e9) return strfmt("%.2fG", x / 1e9);
  if (x >= 1e6) return strfmt("%.2fM", x / 1e6);
  if (x >= 1e3) return strfmt("%.1fK", x / 1e3);
  return strfmt("%.0f", x);
}

std::string human_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = int64_t(s + 0.5);
  if (t >= 3600) return strfmt("%lldh%02lldm", (long long)(t / 3600), (long long)(t % 3600 / 60));
  if (t >= 60) return strfmt("%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  return strfmt("%llds", (long long)t);
}
}  // namespace

void request_stop() { g_stop = 1; }
bool stop_requested() { return g_stop != 0; }

Trainer::Trainer(const Config& cfg, Communicator& world, std::string metrics_path)
    : Trainer(cfg, world, std::move(metrics_path), nullptr) {}

Trainer::Trainer(const Config& cfg, Communicator& world, std::string metrics_path,
                 const OpsDecorator& decorate)
    : cfg_(cfg), world_(world), host_(world.host()), metrics_path_(std::move(metrics_path)) {
  grid_ = std::make_unique<ProcessGrid>(world, cfg.parallel.dp, cfg.parallel.sp);
  cfg_.parallel.dp = grid_->dp();
  REFORMER_REQUIRE(cfg.training.batch_size % grid_->dp() == 0, ConfigError,
                   "training.batch_size = " + std::to_string(cfg.training.batch_size) +
                       " must be a multiple of parallel.dp = " + std::to_string(grid_->dp()) +
                       " (each data-parallel group takes an equal share of the batch)");
  device_ops_ = make_ops(cfg_.training.device);
  if (decorate) decorated_ = decorate(*device_ops_);
  ops_ = decorated_ ? decorated_.get() : device_ops_.get();
  const bool on_device = std::string(ops_->name()) != "cpu";
  if (world.size() > 1 && on_device != world.device_buffers())
    throw ConfigError(std::string("training.device computes in ") +
                      (on_device ? "device" : "host") + " memory but parallel.backend '" +
                      world.backend() + "' reduces " +
                      (world.device_buffers() ? "device" : "host") +
                      " buffers: use backend nccl (or mpi, staged through host memory) with "
                      "device cuda, mpi with device cpu");
  world.set_compute_stream(ops_->stream());
  if (grid_->sp() > 1) grid_->sp_group().set_compute_stream(ops_->stream());
  data_ = make_dataset(cfg_);
  const SequenceShard shard{grid_->sp(), grid_->sp_rank(), &grid_->sp_group()};
  // The device as resolved (the plan's layout of kept state follows it) and
  // every auto memory knob fitted to it (memory_plan.h).
  model_cfg_ = cfg_;
  model_cfg_.training.device = on_device ? DeviceKind::cuda : DeviceKind::cpu;
  // Ranks that share a GPU (staged MPI) share its memory.
  model_cfg_ = fit_to_device(model_cfg_, grid_->sp(),
                             on_device ? device_memory_bytes() / world.ranks_on_device() : 0);
  // Ranks whose GPUs differ in memory could fit different heads per pass or
  // kept layers: refused by name (model.attn_heads_per_pass,
  // model.kept_layers) before any collective of the model.
  require_same_config(model_cfg_, world);
  try {  // out of device memory: say what the memory plan expects
    model_ = std::make_unique<ReformerModel<float>>(model_cfg_, *ops_, shard);
    model_->init_params(cfg_.training.seed);
    opt_ = std::make_unique<Optimizer<float>>(cfg_.optimizer, model_->table(), *ops_);
  } catch (const OutOfMemoryError& e) {
    rethrow_with_plan(e, model_cfg_, grid_->sp(), world_.ranks_on_device());
  }
  const auto bucket_elems = int64_t(cfg_.parallel.bucket_mb * 1024 * 1024 / sizeof(float));
  reducer_ = std::make_unique<GradReducer>(world, model_->grads(), model_->num_params(),
                                           bucket_elems, cfg_.parallel.bucket_lag);
  seq_tokens_.resize(size_t(cfg_.model.max_len));
  seq_targets_.resize(size_t(cfg_.model.max_len));
}

Trainer::~Trainer() = default;

CheckpointState Trainer::snapshot() const {
  CheckpointState st;
  st.step = step_;
  st.tokens_seen = tokens_seen_;
  st.samples_drawn = samples_drawn_;
  st.seed = cfg_.training.seed;
  st.dp = grid_->dp();
  st.sp = grid_->sp();
  st.config_text = to_yaml(cfg_);
  st.optimizer_name = to_string(cfg_.optimizer.name);
  auto& model = *model_;
  const auto& ps = model.table().params();
  for (const ParamInfo& p : ps) {
    CheckpointTensor t{p.name, p.shape, std::vector<float>(size_t(p.size))};
    ops_->to_host(t.data.data(), model.params() + p.offset, p.size);
    st.model.push_back(std::move(t));
  }
  for (const auto& s : opt_->state()) {
    auto it = std::find_if(st.optimizer.begin(), st.optimizer.end(),
                           [&](const auto& e) { return e.first == s.state; });
    if (it == st.optimizer.end()) {
      st.optimizer.emplace_back(s.state, std::vector<CheckpointTensor>{});
      it = st.optimizer.end() - 1;
    }
    CheckpointTensor t{ps[s.param].name, s.shape, std::vector<float>(size_t(s.size))};
    ops_->to_host(t.data.data(), s.data, s.size);
    it->second.push_back(std::move(t));
  }
  return st;
}

void Trainer::load(const std::string& path, bool full) { load_state(read_checkpoint(path), path, full); }

void Trainer::load_state(const CheckpointState& st, const std::string& path, bool full) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected;
  const auto& ps = model_->table().params();
  for (const ParamInfo& p : ps) expected.emplace_back(p.name, p.shape);
  check_matches(st, expected);
  for (size_t k = 0; k < ps.size(); ++k)
    ops_->from_host(model_->params() + ps[k].offset, st.model[k].data.data(), ps[k].size);
  if (!full) return;
  if (st.optimizer_name != to_string(cfg_.optimizer.name))
    throw CheckpointError(path + ": written with optimizer '" + st.optimizer_name +
                          "' but the config asks for '" + to_string(cfg_.optimizer.name) + "'");
  for (const auto& s : opt_->state()) {
    const CheckpointTensor* found = nullptr;
    for (const auto& [name, tensors] : st.optimizer)
      if (name == s.state)
        for (const auto& t : tensors)
          if (t.name == ps[s.param].name) found = &t;
    if (!found)
      throw CheckpointError(path + ": missing optimizer state " + s.state + "/" + ps[s.param].name);
    if (found->shape != s.shape)
      throw CheckpointError(path + ": optimizer state " + s.state + "/" + ps[s.param].name +
                            " has the wrong shape");
    ops_->from_host(s.data, found->data.data(), s.size);
  }
  step_ = st.step;
  samples_drawn_ = st.samples_drawn;
  tokens_seen_ = st.tokens_seen;
  resumed_ = true;
}

std::string Trainer::resume() {
  // Training writes checkpoints: prove the directory writable and hold it
  // against a second run before anything else (rank 0 alone writes).
  if (world_.rank() == 0) {
    check_checkpoint_dir_writable(cfg_.checkpoint.dir);
    dir_lock_ = std::make_unique<CheckpointDirLock>(cfg_.checkpoint.dir);
  }
  const std::string& r = cfg_.checkpoint.resume;
  if (r == "none") return "";
  std::string path = r;
  if (r == "auto") {
    std::vector<std::string> notes;
    const auto found = find_resumable(cfg_.checkpoint.dir, &notes);
    for (const auto& n : notes) log_info("checkpoint: passed over " + n);
    if (!found) return "";
    path = *found;
  }
  const CheckpointState st = read_checkpoint(path);
  const ResumeReport report = check_resume_config(st.config_text, cfg_, path);
  for (const std::string& line : report.lines) log_info(line);
  try {
    load_state(st, path, /*full*/ true);
  } catch (const CheckpointError& e) {
    if (report.shape_changes.empty()) throw;
    std::string changes;
    for (const std::string& c : report.shape_changes) changes += (changes.empty() ? "" : ", ") + c;
    throw CheckpointError(std::string(e.what()) + " (changed in the configuration: " + changes +
                          "; a checkpoint loads only into a model and optimizer of its shapes)");
  }
  log_info(strfmt("checkpoint: resumed from %s at step %lld", path.c_str(), (long long)step_));
  return path;
}

void Trainer::save() {
  // Parameters and optimizer state are the same on every rank (gradients
  // are summed over the world before the update): rank 0 writes.
  if (world_.rank() == 0) {
    const auto warnings = save_checkpoint(cfg_.checkpoint.dir, snapshot(), cfg_.checkpoint.keep);
    log_info("checkpoint: wrote " + checkpoint_path(cfg_.checkpoint.dir, step_));
    for (const auto& w : warnings) log_info("checkpoint: warning: " + w);
  }
  host_.barrier();
}

void Trainer::sample_shard(Split split, int64_t index, int32_t* tokens, int32_t* targets) {
  data_->sample(split, index, seq_tokens_.data(), seq_targets_.data());
  const int64_t n = model_->seq_len(), p0 = model_->seq_offset();
  std::copy_n(seq_tokens_.begin() + p0, n, tokens);
  std::copy_n(seq_targets_.begin() + p0, n, targets);
}

LossStats Trainer::accumulate_step(const std::vector<int32_t>& tokens,
                                   const std::vector<int32_t>& targets, int n_seq,
                                   float grad_scale) {
  const int64_t L = model_->seq_len();
  const bool reduce = world_.size() > 1 && reduce_enabled_;
  LossStats st;
  for (int j = 0; j < n_seq; ++j) {
    // Gradients accumulate over this rank's sequences; the reduction starts
    // during the last one's backward pass, bucket by bucket.
    const bool last = j + 1 == n_seq;
    if (reduce && last) {
      reducer_->begin();
      model_->on_grads_ready = [this](ParamRange r) { reducer_->ready(r); };
    }
    st += model_->forward_backward(tokens.data() + j * L, targets.data() + j * L,
                                   uint64_t(step_), /*backward*/ true, /*train*/ true,
                                   grad_scale);
  }
  model_->on_grads_ready = nullptr;
  if (reduce) reducer_->finish();
  return st;
}

EvalResult Trainer::evaluate(Split split, int batches) {
  const int64_t L = model_->seq_len();
  const int64_t n = int64_t(batches) * cfg_.training.batch_size;
  std::vector<int32_t> tokens(static_cast<size_t>(L)), targets(static_cast<size_t>(L));
  LossStats total;
  // Sequence i goes to data-parallel group i mod dp; its sequence-parallel
  // ranks each take their positions.
  for (int64_t i = grid_->dp_rank(); i < n; i += grid_->dp()) {
    sample_shard(split, i, tokens.data(), targets.data());
    total += model_->forward_backward(tokens.data(), targets.data(), uint64_t(step_),
                                      /*backward*/ false, /*train*/ false, 0.0f);
  }
  double sums[3] = {total.loss_sum, double(total.count), double(total.correct)};
  host_.allreduce_sum(sums, 3);
  EvalResult r;
  r.tokens = int64_t(sums[1]);
  r.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  r.bpc = r.loss / std::log(2.0);
  r.accuracy = sums[1] > 0 ? sums[2] / sums[1] : 0;
  return r;
}

StepResult Trainer::train_step() {
  const TrainingConfig& tc = cfg_.training;
  const int64_t Ll = model_->seq_len();
  const int per_group = tc.batch_size / grid_->dp();
  step_tokens_.resize(size_t(per_group * Ll));
  step_targets_.resize(size_t(per_group * Ll));
  model_->zero_grads();
  // This group's share of the global batch; indices are global so the batch
  // is the same whatever the layout.
  for (int j = 0; j < per_group; ++j) {
    const int64_t index = samples_drawn_ + int64_t(grid_->dp_rank()) * per_group + j;
    sample_shard(Split::train, index, step_tokens_.data() + j * Ll,
                 step_targets_.data() + j * Ll);
  }
  int64_t local_count = 0;
  for (const int32_t t : step_targets_) local_count += t >= 0;
  double count = double(local_count);
  host_.allreduce_sum(&count, 1);
  const float grad_scale = count > 0 ? float(1.0 / count) : 0.0f;
  LossStats st;
  try {  // the op workspaces grow during the first step
    st = accumulate_step(step_tokens_, step_targets_, per_group, grad_scale);
  } catch (const OutOfMemoryError& e) {
    rethrow_with_plan(e, model_cfg_, grid_->sp(), world_.ranks_on_device());
  }
  double sums[3] = {st.loss_sum, double(st.count), double(st.correct)};
  host_.allreduce_sum(sums, 3);
  StepResult r;
  r.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  // Clips only a finite gradient; the norm is the same on every rank (the
  // gradients were summed over all of them).
  r.grad_norm = clip_grad_norm(*ops_, model_->grads(), model_->num_params(),
                               cfg_.optimizer.grad_clip);
  r.lr = learning_rate(cfg_.optimizer, step_ + 1, tc.steps);
  if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) {
    if (cfg_.training.on_nonfinite == OnNonFinite::stop)
      throw NonFiniteError(strfmt(
          "step %lld: loss %g, gradient norm %g: not finite; the run stops without a checkpoint "
          "(the last checkpoint is intact; lower optimizer.lr or set training.on_nonfinite: skip)",
          (long long)(step_ + 1), r.loss, r.grad_norm));
    r.skipped = true;
  } else {
    opt_->step(model_->params(), model_->grads(), step_ + 1, r.lr);
  }
  ++step_;
  samples_drawn_ += tc.batch_size;
  tokens_seen_ += int64_t(tc.batch_size) * cfg_.model.max_len;
  return r;
}

TrainResult Trainer::train() {
  const TrainingConfig& tc = cfg_.training;
  const int64_t L = cfg_.model.max_len;     // positions per sequence
  if (resumed_ && world_.rank() == 0 && !metrics_path_.empty()) {
    const int64_t dropped = drop_metrics_after(metrics_path_, step_);
    if (dropped > 0)
      log_info(strfmt("metrics: dropped %lld lines past step %lld from %s (logged after the "
                      "checkpoint resumed from)", (long long)dropped, (long long)step_,
                      metrics_path_.c_str()));
  }
  MetricsWriter metrics(world_.rank() == 0 ? metrics_path_ : "", /*append*/ resumed_);
  TrainResult result;
  const bool dup = cfg_.data.kind == DataKind::duplication;
  // logging.plot: the curves are redrawn after each evaluation (not per
  // step), reading only the lines added since the last one; a failure is
  // reported once and training goes on.
  const bool plot = cfg_.logging.plot && world_.rank() == 0 && !metrics_path_.empty();
  MetricsFollower plotted(metrics_path_);
  bool plot_failed = false;
  auto redraw_plot = [&]() {
    try {
      write_svg(render_svg(plotted.update()), plot_path_for(metrics_path_));
    } catch (const Error& e) {
      if (!plot_failed) log_info(std::string("plot: not drawn (training goes on): ") + e.what());
      plot_failed = true;
    }
  };

  double run_start = 0;  // set when the loop starts; elapsed_s in the metrics counts from there
  auto run_eval = [&]() {
    const EvalResult e = evaluate(Split::valid, tc.eval_batches);
    std::string line = strfmt("eval step %lld | loss %.9g | bpc %.4f", (long long)step_, e.loss, e.bpc);
    JsonLine j;
    j.add("step", step_).add("eval", true).add("eval_loss", e.loss).add("eval_bpc", e.bpc);
    if (dup) {
      line += strfmt(" | accuracy %.4f", e.accuracy);
      j.add("eval_accuracy", e.accuracy);
    }
    j.add("eval_tokens", e.tokens).add("tokens_seen", tokens_seen_)
        .add("elapsed_s", now_seconds() - run_start);
    log_info(line);
    metrics.write(j);
    if (plot) redraw_plot();
    result.eval = e;
  };

  log_info(strfmt("model: %lld parameters, %d layers, d_model %d, %d heads, max_len %lld",
                  (long long)model_->num_params(), cfg_.model.n_layers, cfg_.model.d_model,
                  cfg_.model.n_heads, (long long)L));
  log_info("memory: " + memory_layout_text(model_cfg_, grid_->sp()) +
           " (model.attn_heads_per_pass, kept_layers, stashed_layers and the kept forms)");
  log_info("data: " + data_->describe());
  // Model FLOP/s and MFU per GPU (framework/flops.h) on the progress line.
  const double flops_per_token = train_flops(model_cfg_, grid_->sp()).per_token;
  const double peak = peak_tflops(*ops_, cfg_.logging.peak_tflops);
  if (peak > 0)
    log_info(strfmt("mfu: %.3g GFLOP per token (products and attention), ceiling %.0f TFLOP/s "
                    "per rank (%s)", flops_per_token / 1e9, peak,
                    cfg_.logging.peak_tflops > 0 ? "logging.peak_tflops" : "bf16 GEMM timed now"));
  double interval_start = now_seconds();
  run_start = interval_start;
  int64_t interval_steps = 0;
  const int64_t first_step = step_;
  while (step_ < tc.steps) {
    const StepResult sr = train_step();
    ++interval_steps;
    const double loss = sr.loss, grad_norm = sr.grad_norm, lr = sr.lr;
    if (sr.skipped)
      log_info(strfmt("step %lld: loss %g, gradient norm %g: not finite, update skipped "
                      "(training.on_nonfinite: skip)", (long long)step_, loss, grad_norm));
    result.losses.push_back(loss);
    const bool last = step_ == tc.steps;
    if (step_ % tc.log_every == 0 || last || step_ == first_step + 1) {
      const double t1 = now_seconds();
      const double ms = 1e3 * (t1 - interval_start) / double(interval_steps);
      const double tok_s = double(tc.batch_size) * double(L) * 1e3 / ms;
      const double eta = (t1 - run_start) / double(step_ - first_step) * double(tc.steps - step_);
      const double tflops = tok_s * flops_per_token / 1e12 / double(world_.size());
      const std::string mfu =
          peak > 0 ? strfmt(" | %.3g TFLOP/s %.1f%% MFU", tflops, 100.0 * tflops / peak) : "";
      log_info(strfmt("step %6lld/%lld | loss %.9g | bpc %.4f | lr %.3e | gnorm %.4f | "
                      "%.1f ms | %s tok/s%s | ETA %s",
                      (long long)step_, (long long)tc.steps, loss, loss / std::log(2.0), lr,
                      grad_norm, ms, human_count(tok_s).c_str(), mfu.c_str(),
                      human_duration(eta).c_str()));
      JsonLine j;
      j.add("step", step_).add("loss", loss).add("bpc", loss / std::log(2.0)).add("lr", lr)
          .add("grad_norm", grad_norm).add("ms_per_step", ms).add("tokens_per_s", tok_s)
          .add("tflops_per_rank", tflops)
          .add("tokens_seen", tokens_seen_).add("elapsed_s", t1 - run_start);
      metrics.write(j);
      interval_start = now_seconds();
      interval_steps = 0;
    }
    if (tc.eval_every > 0 && step_ % tc.eval_every == 0 && !last) run_eval();
    // A stop request on any rank stops every rank at the same step.
    double stop_votes = stop_requested() ? 1.0 : 0.0;
    host_.allreduce_sum(&stop_votes, 1);
    const bool stop = stop_votes > 0;
    if (cfg_.checkpoint.every > 0 && step_ % cfg_.checkpoint.every == 0 && !last && !stop) save();
    if (stop) {
      log_info(strfmt("stop requested: saving a checkpoint at step %lld", (long long)step_));
      save();
      result.interrupted = true;
      result.step = step_;
      return result;
    }
  }
  run_eval();
  save();
  result.step = step_;
  if (ops_->peak_bytes() >= 0)
    log_info(strfmt("device memory: peak %s held by this rank's ops (the memory plan: %s)",
                    format_bytes(ops_->peak_bytes()).c_str(),
                    format_bytes(plan_memory(model_cfg_, grid_->sp()).total_bytes()).c_str()));
  return result;
}

}  // namespace reformer
