// The training loop: sampling, forward/backward, gradient reduction through
// the communicator, clipping, the optimizer, progress lines and metrics,
// evaluation, checkpoints and resume.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/data.h"
#include "framework/device.h"
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

class Trainer {
 public:
  // Builds the model (initialised from training.seed), optimizer and data.
  // `metrics_path` may be empty.
  Trainer(const Config& cfg, Communicator& comm, std::string metrics_path);
  ~Trainer();

  // Applies cfg.checkpoint.resume (auto | none | PATH); returns the path
  // resumed from, or "" for a fresh start. Throws CheckpointError for a
  // named checkpoint that is missing, invalid or does not match the model.
  // On rank 0 it first checks that checkpoint.dir is writable and locks it
  // for the trainer's lifetime (CheckpointError when another run holds it).
  std::string resume();
  // Loads a checkpoint's parameters (and optimizer state and counters when
  // `full`), after checking it matches the model.
  void load(const std::string& path, bool full);

  TrainResult train();
  EvalResult evaluate(Split split, int batches);

  int64_t step() const { return step_; }
  ReformerModel<float>& model() { return *model_; }
  CheckpointState snapshot() const;

 private:
  void save();

  Config cfg_;
  Communicator& comm_;
  std::string metrics_path_;
  std::unique_ptr<Ops<float>> ops_;  // the device the run computes on
  std::unique_ptr<ReformerModel<float>> model_;
  std::unique_ptr<Optimizer<float>> opt_;
  std::unique_ptr<Dataset> data_;
  int64_t step_ = 0;
  int64_t samples_drawn_ = 0;
  int64_t tokens_seen_ = 0;
  bool resumed_ = false;
  std::unique_ptr<CheckpointDirLock> dir_lock_;  // rank 0 of a training run
};

}  // namespace reformer
