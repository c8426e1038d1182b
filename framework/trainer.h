// The training loop: sampling, forward/backward, gradient reduction through
// the communicator, clipping, the optimizer, progress lines and metrics,
// evaluation, checkpoints and resume.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/process_grid.h"
#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/data.h"
#include "framework/device.h"
#include "framework/grad_reducer.h"
#include "framework/logging.h"
#include "framework/model.h"
#include "framework/optimizer.h"

namespace reformer {

// Asks a running train() to finish its current step, write a checkpoint and
// return. Async-signal-safe (called from SIGINT / SIGTERM handlers).
void request_stop();
bool stop_requested();

struct EvalResult {
  double loss = 0;      // mean token cross-entropy (nats)
  double bpc = 0;       // loss / ln 2
  double accuracy = 0;  // share of counted positions predicted exactly
  int64_t tokens = 0;   // positions counted
};

struct TrainResult {
  int64_t step = 0;        // steps completed
  bool interrupted = false;  // stopped by request_stop()
  EvalResult eval;         // the last evaluation
  std::vector<double> losses;  // mean training loss of each step this call ran
};

struct StepResult {
  double loss = 0;       // mean training loss of the step's tokens (all ranks)
  double grad_norm = 0;  // global gradient norm before clipping
  double lr = 0;         // learning rate the update used
  bool skipped = false;  // not finite: no update (training.on_nonfinite: skip)
};

class Trainer {
 public:
  // Builds the process grid (parallel.dp x parallel.sp over `world`), the
  // model (initialised from training.seed), optimizer and data. Throws
  // ConfigError when the layout, the device and the backend do not fit
  // together. `metrics_path` may be empty.
  Trainer(const Config& cfg, Communicator& world, std::string metrics_path);
  // The same, with every op the run makes going through `decorate(device
  // ops)` (measurement: ProfilingOps). The decorator must report the device
  // ops' stream().
  using OpsDecorator = std::function<std::unique_ptr<Ops<float>>(Ops<float>&)>;
  Trainer(const Config& cfg, Communicator& world, std::string metrics_path,
          const OpsDecorator& decorate);
  ~Trainer();

  // Applies cfg.checkpoint.resume (auto | none | PATH); returns the path
  // resumed from, or "" for a fresh start. Throws CheckpointError for a
  // named checkpoint that is missing, invalid or does not match the model
  // (naming the configuration keys that changed its shapes). Logs every key
  // whose value differs from the checkpoint's stored configuration and
  // throws ConfigError for changes that break continuation unless
  // checkpoint.allow_changes (framework/resume_check.h).
  // On rank 0 it first checks that checkpoint.dir is writable and locks it
  // for the trainer's lifetime (CheckpointError when another run holds it).
  std::string resume();
  // Loads a checkpoint's parameters (and optimizer state and counters when
  // `full`), after checking it matches the model.
  void load(const std::string& path, bool full);

  TrainResult train();
  // One optimizer step over the next global batch: every rank calls it
  // together. Throws NonFiniteError on a non-finite loss or gradient norm
  // unless training.on_nonfinite is skip.
  StepResult train_step();
  // Measurement only: with `on` false, train_step computes without summing
  // gradients over ranks (the ranks' models then drift apart).
  void set_gradient_reduction(bool on) { reduce_enabled_ = on; }
  // Measurement only: the gradient reducer's clock for the wait it leaves
  // after the backward (GradReducer::set_clock, take_exposed_ms).
  GradReducer& reducer() { return *reducer_; }
  EvalResult evaluate(Split split, int batches);

  int64_t step() const { return step_; }
  const ProcessGrid& grid() const { return *grid_; }
  ReformerModel<float>& model() { return *model_; }
  Ops<float>& ops() { return *ops_; }
  // The configuration the model runs: the run's, with the heads per
  // attention pass fitted to this rank's device.
  const Config& model_config() const { return model_cfg_; }
  CheckpointState snapshot() const;

 private:
  void save();
  // load() of a checkpoint already read from `path`.
  void load_state(const CheckpointState& st, const std::string& path, bool full);
  // This rank's share of sequence `index`: the positions its model holds.
  void sample_shard(Split split, int64_t index, int32_t* tokens, int32_t* targets);
  // Forward and backward over this rank's sequences of one step; gradients
  // summed over every rank when it returns.
  LossStats accumulate_step(const std::vector<int32_t>& tokens,
                            const std::vector<int32_t>& targets, int n_seq, float grad_scale);

  Config cfg_;
  // cfg_ with the heads per attention pass fitted to this rank's device
  // (fit_heads_per_pass): what the model runs and the memory plan prints;
  // checkpoints keep cfg_.
  Config model_cfg_;
  Communicator& world_;
  Communicator& host_;  // world_.host(): small host-side sums
  std::unique_ptr<ProcessGrid> grid_;
  std::unique_ptr<GradReducer> reducer_;
  std::vector<int32_t> seq_tokens_, seq_targets_;    // one whole sequence
  std::vector<int32_t> step_tokens_, step_targets_;  // this rank's share of a step
  std::string metrics_path_;
  std::unique_ptr<Ops<float>> device_ops_;  // the device the run computes on
  std::unique_ptr<Ops<float>> decorated_;   // wraps device_ops_ when decorated
  Ops<float>* ops_ = nullptr;               // the ops every call goes through
  std::unique_ptr<ReformerModel<float>> model_;
  std::unique_ptr<Optimizer<float>> opt_;
  std::unique_ptr<Dataset> data_;
  int64_t step_ = 0;
  int64_t samples_drawn_ = 0;
  int64_t tokens_seen_ = 0;
  bool resumed_ = false;
  bool reduce_enabled_ = true;
  std::unique_ptr<CheckpointDirLock> dir_lock_;  // rank 0 of a training run
};

}  // namespace reformer
