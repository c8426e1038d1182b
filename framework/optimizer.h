// Optimizers over the flat parameter buffer, learning-rate schedules and
// gradient clipping.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "framework/config.h"
#include "kernels/ops.h"
#include "framework/params.h"

namespace reformer {

// Learning rate after `step` completed steps (step >= 1 is the step being taken).
//  rsqrt:    lr * min(1, step / warmup) * sqrt(warmup / max(step, warmup))
//  cosine:   linear warm-up, then cosine from lr to lr * min_lr_ratio at `total_steps`
//  constant: linear warm-up, then lr
double learning_rate(const OptimizerConfig& c, int64_t step, int64_t total_steps);

// A tensor's name and shape, e.g. {"layers.0.attn.wqk", {64, 64}}.
struct NamedShape {
  std::string name;
  std::vector<int64_t> shape;
};

// The shape rules for optimizer state read from a checkpoint, against the
// model's parameters (name -> shape). One message per violation, empty when
// the state fits:
//  - every state tensor is named like a parameter, at most once per state;
//  - "vr" and "vc" hold Adafactor's second moment viewed as [rows, cols]:
//    factored, numel(vr) * numel(vc) == numel(param); unfactored, vc is absent
//    (or empty) and numel(vr) == numel(param); every parameter has a vr;
//  - any other state ("m", "v", ...) holds one tensor per parameter with the
//    parameter's shape, and covers every parameter.
std::vector<std::string> optimizer_state_shape_problems(
    const std::vector<std::pair<std::string, std::vector<NamedShape>>>& states,
    const std::vector<std::pair<std::string, std::vector<int64_t>>>& params);

// One named optimizer state tensor per (state, parameter), e.g. ("v", wqk).
template <class T>
class Optimizer {
 public:
  Optimizer(const OptimizerConfig& cfg, const ParamTable& table, Ops<T>& ops);
  // Applies one update with learning rate `lr` as step number `step` (1-based).
  void step(T* params, const T* grads, int64_t step, double lr);
  OptimizerKind kind() const { return cfg_.name; }

  // State for checkpoints: names ("m", "v" for AdamW; "vr", "vc", "m" for
  // Adafactor) and, per parameter, the shape and location of each state tensor.
  struct StateTensor {
    std::string state;           // "m", "v", "vr", "vc"
    size_t param;                // index into the ParamTable
    std::vector<int64_t> shape;  // shape of this state tensor
    T* data;                     // in Ops memory
    int64_t size;
  };
  const std::vector<StateTensor>& state() const { return state_; }

 private:
  OptimizerConfig cfg_;
  const ParamTable& table_;
  Ops<T>& ops_;
  std::vector<Buffer<T>> buffers_;
  std::vector<StateTensor> state_;
};

// Global L2 norm of the gradient; when max_norm > 0 and the norm exceeds it,
// scales the gradient down to max_norm. Returns the norm before clipping.
template <class T>
double clip_grad_norm(Ops<T>& ops, T* grads, int64_t n, double max_norm);

extern template class Optimizer<float>;
extern template class Optimizer<double>;

}  // namespace reformer
