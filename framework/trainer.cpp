#include "framework/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>

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

Trainer::Trainer(const Config& cfg, Communicator& comm, std::string metrics_path)
    : cfg_(cfg), comm_(comm), metrics_path_(std::move(metrics_path)) {
  REFORMER_REQUIRE(cfg.training.batch_size % comm.size() == 0, ConfigError,
                   "training.batch_size must be a multiple of the number of ranks");
  REFORMER_REQUIRE(cfg.parallel.sp == 1, ConfigError,
                   "parallel.sp > 1: sequence parallelism is not implemented yet");
  REFORMER_REQUIRE(cfg.parallel.dp * cfg.parallel.sp == comm.size(), ConfigError,
                   "parallel.dp * parallel.sp must equal the number of processes (" +
                       std::to_string(comm.size()) + ")");
  ops_ = make_ops(cfg_.training.device);
  REFORMER_REQUIRE(std::string(ops_->name()) == "cpu" || comm.size() == 1, ConfigError,
                   "training.device: several processes on CUDA need the NCCL backend, which is "
                   "not implemented yet (the MPI backend sums host buffers)");
  data_ = make_dataset(cfg_);
  model_ = std::make_unique<ReformerModel<float>>(cfg_, *ops_);
  model_->init_params(cfg_.training.seed);
  opt_ = std::make_unique<Optimizer<float>>(cfg_.optimizer, model_->table(), *ops_);
}

Trainer::~Trainer() = default;

CheckpointState Trainer::snapshot() const {
  CheckpointState st;
  st.step = step_;
  st.tokens_seen = tokens_seen_;
  st.samples_drawn = samples_drawn_;
  st.seed = cfg_.training.seed;
  st.dp = cfg_.parallel.dp;
  st.sp = cfg_.parallel.sp;
  st.config_text = to_yaml(cfg_);
  st.optimizer_name = cfg_.optimizer.name;
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

void Trainer::load(const std::string& path, bool full) {
  CheckpointState st = read_checkpoint(path);
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected;
  const auto& ps = model_->table().params();
  for (const ParamInfo& p : ps) expected.emplace_back(p.name, p.shape);
  check_matches(st, expected);
  for (size_t k = 0; k < ps.size(); ++k)
    ops_->from_host(model_->params() + ps[k].offset, st.model[k].data.data(), ps[k].size);
  if (!full) return;
  if (st.optimizer_name != cfg_.optimizer.name)
    throw CheckpointError(path + ": written with optimizer '" + st.optimizer_name +
                          "' but the config asks for '" + cfg_.optimizer.name + "'");
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
  if (comm_.rank() == 0) {
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
  load(path, /*full*/ true);
  log_info(strfmt("checkpoint: resumed from %s at step %lld", path.c_str(), (long long)step_));
  return path;
}

void Trainer::save() {
  if (comm_.rank() == 0) {
    const auto warnings = save_checkpoint(cfg_.checkpoint.dir, snapshot(), cfg_.checkpoint.keep);
    log_info("checkpoint: wrote " + checkpoint_path(cfg_.checkpoint.dir, step_));
    for (const auto& w : warnings) log_info("checkpoint: warning: " + w);
  }
  comm_.barrier();
}

EvalResult Trainer::evaluate(Split split, int batches) {
  const int64_t L = cfg_.model.max_len;
  const int64_t n = int64_t(batches) * cfg_.training.batch_size;
  std::vector<int32_t> tokens(static_cast<size_t>(L)), targets(static_cast<size_t>(L));
  LossStats total;
  for (int64_t i = comm_.rank(); i < n; i += comm_.size()) {
    data_->sample(split, i, tokens.data(), targets.data());
    total += model_->forward_backward(tokens.data(), targets.data(), uint64_t(step_),
                                      /*backward*/ false, /*train*/ false, 0.0f);
  }
  double sums[3] = {total.loss_sum, double(total.count), double(total.correct)};
  comm_.allreduce_sum(sums, 3);
  EvalResult r;
  r.tokens = int64_t(sums[1]);
  r.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  r.bpc = r.loss / std::log(2.0);
  r.accuracy = sums[1] > 0 ? sums[2] / sums[1] : 0;
  return r;
}

TrainResult Trainer::train() {
  const TrainingConfig& tc = cfg_.training;
  const int64_t L = cfg_.model.max_len;
  const int per_rank = tc.batch_size / comm_.size();
  MetricsWriter metrics(comm_.rank() == 0 ? metrics_path_ : "", /*append*/ resumed_);
  std::vector<int32_t> tokens(size_t(per_rank * L)), targets(size_t(per_rank * L));
  TrainResult result;
  const bool dup = cfg_.data.kind == "duplication";

  auto run_eval = [&]() {
    const EvalResult e = evaluate(Split::valid, tc.eval_batches);
    std::string line = strfmt("eval step %lld | loss %.9g | bpc %.4f", (long long)step_, e.loss, e.bpc);
    JsonLine j;
    j.add("step", step_).add("eval", true).add("eval_loss", e.loss).add("eval_bpc", e.bpc);
    if (dup) {
      line += strfmt(" | accuracy %.4f", e.accuracy);
      j.add("eval_accuracy", e.accuracy);
    }
    j.add("eval_tokens", e.tokens);
    log_info(line);
    metrics.write(j);
    result.eval = e;
  };

  log_info(strfmt("model: %lld parameters, %d layers, d_model %d, %d heads, max_len %lld",
                  (long long)model_->num_params(), cfg_.model.n_layers, cfg_.model.d_model,
                  cfg_.model.n_heads, (long long)L));
  log_info("data: " + data_->describe());
  double interval_start = now_seconds();
  int64_t interval_steps = 0;
  const double run_start = interval_start;
  const int64_t first_step = step_;
  while (step_ < tc.steps) {
    model_->zero_grads();
    // This rank's share of the global batch; indices are global so the
    // batch is the same whatever the number of ranks.
    int64_t local_count = 0;
    for (int j = 0; j < per_rank; ++j) {
      const int64_t index = samples_drawn_ + int64_t(comm_.rank()) * per_rank + j;
      data_->sample(Split::train, index, tokens.data() + j * L, targets.data() + j * L);
    }
    for (int64_t i = 0; i < per_rank * L; ++i) local_count += targets[size_t(i)] >= 0;
    double count = double(local_count);
    comm_.allreduce_sum(&count, 1);
    const float grad_scale = count > 0 ? float(1.0 / count) : 0.0f;
    LossStats st;
    for (int j = 0; j < per_rank; ++j)
      st += model_->forward_backward(tokens.data() + j * L, targets.data() + j * L,
                                     uint64_t(step_), /*backward*/ true, /*train*/ true,
                                     grad_scale);
    comm_.allreduce_sum(model_->grads(), model_->num_params());
    double sums[3] = {st.loss_sum, double(st.count), double(st.correct)};
    comm_.allreduce_sum(sums, 3);
    const double grad_norm =
        clip_grad_norm(*ops_, model_->grads(), model_->num_params(), cfg_.optimizer.grad_clip);
    const double lr = learning_rate(cfg_.optimizer, step_ + 1, tc.steps);
    opt_->step(model_->params(), model_->grads(), step_ + 1, lr);
    ++step_;
    samples_drawn_ += tc.batch_size;
    tokens_seen_ += int64_t(tc.batch_size) * L;
    ++interval_steps;

    const double loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
    result.losses.push_back(loss);
    const bool last = step_ == tc.steps;
    if (step_ % tc.log_every == 0 || last || step_ == first_step + 1) {
      const double t1 = now_seconds();
      const double ms = 1e3 * (t1 - interval_start) / double(interval_steps);
      const double tok_s = double(tc.batch_size) * double(L) * 1e3 / ms;
      const double eta = (t1 - run_start) / double(step_ - first_step) * double(tc.steps - step_);
      log_info(strfmt("step %6lld/%lld | loss %.9g | bpc %.4f | lr %.3e | gnorm %.4f | "
                      "%.1f ms | %s tok/s | ETA %s",
                      (long long)step_, (long long)tc.steps, loss, loss / std::log(2.0), lr,
                      grad_norm, ms, human_count(tok_s).c_str(), human_duration(eta).c_str()));
      JsonLine j;
      j.add("step", step_).add("loss", loss).add("bpc", loss / std::log(2.0)).add("lr", lr)
          .add("grad_norm", grad_norm).add("ms_per_step", ms).add("tokens_per_s", tok_s)
          .add("tokens_seen", tokens_seen_);
      metrics.write(j);
      interval_start = now_seconds();
      interval_steps = 0;
    }
    if (tc.eval_every > 0 && step_ % tc.eval_every == 0 && !last) run_eval();
    // A stop request on any rank stops every rank at the same step.
    double stop_votes = stop_requested() ? 1.0 : 0.0;
    comm_.allreduce_sum(&stop_votes, 1);
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
  return result;
}

}  // namespace reformer
