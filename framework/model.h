// The Reformer language model: embedding with axial positions, a stack of
// reversible layers (LSH / full / local attention and a chunked feed-forward),
// output LayerNorm over concat(y1, y2), a linear head and the token loss.
//
// The backward pass keeps only the top activations (y1, y2) and each layer's
// bucket ids; it rebuilds every layer's inputs from its outputs
// (x2 = y2 - FFN(LN_f(y1)), x1 = y1 - Attn(LN_a(x2))) on the way down.
// Layers kept by model.kept_layers (framework/memory_plan.h) instead keep
// their inputs and sublayer state from the forward, where memory allows.
//
// All arithmetic goes through an Ops<T>; T is float for training, double for
// finite-difference checks.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "distributed/communicator.h"
#include "framework/config.h"
#include "framework/model_tensors.h"
#include "kernels/ops.h"
#include "kernels/profiling_ops.h"
#include "framework/params.h"

namespace reformer {

// Sums over the positions of one or more sequences.
struct LossStats {
  double loss_sum = 0;   // sum of token cross-entropies (nats) over counted positions
  int64_t count = 0;     // positions with a target (target >= 0)
  int64_t correct = 0;   // counted positions whose argmax logit is the target
  LossStats& operator+=(const LossStats& o) {
    loss_sum += o.loss_sum; count += o.count; correct += o.correct;
    return *this;
  }
};

// This rank's part of a sequence-parallel group: positions
// [rank * L / size, (rank + 1) * L / size) and heads
// [rank * H / size, (rank + 1) * H / size) of attention. The default is one
// rank holding everything.
struct SequenceShard {
  int size = 1;                   // ranks sharing one sequence
  int rank = 0;                   // this rank's index among them
  Communicator* comm = nullptr;   // the group (needed when size > 1)
};

template <class T>
class ReformerModel {
 public:
  // Allocates parameters, gradients and the activations for this rank's
  // shard of one sequence of cfg.model.max_len positions. The config must be
  // validated; throws ConfigError when the shard layout cannot work.
  ReformerModel(const Config& cfg, Ops<T>& ops, const SequenceShard& shard = {});
  ~ReformerModel();
  ReformerModel(const ReformerModel&) = delete;
  ReformerModel& operator=(const ReformerModel&) = delete;

  const ParamTable& table() const { return table_; }
  int64_t num_params() const { return table_.total(); }
  T* params() { return params_.data(); }  // flat [num_params], in Ops memory
  T* grads() { return grads_.data(); }    // same layout as params()
  int64_t seq_len() const { return L_; }  // positions this rank holds
  int64_t seq_offset() const { return pos0_; }  // global position of its first

  // Fills parameters from the counter RNG keyed by `seed` (normal for
  // matrices and embeddings, ones / zeros for LayerNorm and biases).
  void init_params(uint64_t seed);
  // Times the sequence-parallel exchanges (and sort mode's histogram
  // gathers) on `clock`, a clock of ops.stream() (nullptr: off);
  // take_exchange_ms() returns the milliseconds that stream spent in them
  // since the last take (0 at sp 1).
  void set_exchange_clock(StreamClock* clock);
  double take_exchange_ms();
  void zero_grads();

  // One sequence: this rank's tokens[seq_len()] and targets[seq_len()] in
  // host memory (target -1: not counted). Runs the forward pass and, when
  // `backward`, the backward pass, ACCUMULATING parameter gradients scaled by
  // `grad_scale` (the caller passes 1 / (positions counted over the whole
  // batch and all ranks)). Under sequence parallelism every rank of the group
  // calls it together, and the gradients are this rank's part of the sum.
  // `step` keys the LSH rotations and dropout masks; `train` enables dropout.
  LossStats forward_backward(const int32_t* tokens, const int32_t* targets, uint64_t step,
                             bool backward, bool train, T grad_scale);

  // Forward only, copying every logit of this rank's positions [seq_len(), V]
  // to `logits` (host).
  void forward_logits(const int32_t* tokens, uint64_t step, std::vector<T>* logits);

  // Called during forward_backward's backward pass with each part of the
  // flat buffer (head, layers top-down, embedding) as soon as its gradients
  // for this sequence are complete; the trainer starts reducing there.
  std::function<void(ParamRange)> on_grads_ready;

  // Test hooks (host copies, [seq_len(), D] each): the inputs (x1, x2) of
  // every layer as the forward pass saw them, and as the backward pass
  // rebuilt them.
  struct Trace {
    std::vector<std::vector<T>> forward_x1, forward_x2, rebuilt_x1, rebuilt_x2;
  };
  Trace* trace = nullptr;

 private:
  struct Scratch;   // activation buffers
  void embed(const int32_t* tokens);
  // The attention sublayer y1 = x1 + Attn(LN_a(x2)) in place on x1: the
  // forward pass (sign +1) and, in the backward pass, the rebuild of x1
  // (x1 = y1 - Attn) followed by the backward into dx2 and the gradients.
  // A kept layer's backward skips the rebuild of x1 (`rebuild_x1` false:
  // its input is the kept one) and, where its attention state was
  // kept, the attention forward (`attend` false: its state is in place).
  void attention_layer_forward(int l, uint64_t step, bool train, const T* x1_in = nullptr);
  void attention_layer_backward(int l, uint64_t step, bool train, bool attend = true,
                                bool rebuild_x1 = true);
  // The weights attention pass `pass` of a layer reads and the gradient it
  // adds its Wo part to (see pass_weights in model.cpp).
  struct PassWeights {
    bool all;  // the pass holds every local head: the layer's weights in place
    bool wo_in_place;  // wo, gwo are the layer's own rows of Wo and its gradient
    const T *wq, *wv, *wo;
    T* gwo;
  };
  PassWeights pass_weights(int l, int pass);
  const T* attend_pass(int l, int pass, uint64_t step, bool rehash);
  void project_pass(int l, int pass);
  const T* attend_sorted(int l, int pass, uint64_t step, bool rehash);
  int64_t pass_col(int rank, int pass) const;
  void load_pass_weights(int l, int pass);
  void add_pass_gradients(int l, int pass);
  int out_cols() const;
  LseCombineParams combine_params(int rounds) const;
  const T* combine_parts(int l);
  void parts_backward();
  void project(int l, const T* wq, const T* wv, int n, T* qk, T* v);
  void project_backward(int l, const T* dqk, const T* dv, const T* wq, const T* wv, T* gwq,
                        T* gwv, int n);
  // Element i of an attention output buffer (ao, its kept and stashed
  // copies): T i, or bf16 i where the outputs are kept in bf16 (i even).
  T* ao_at(T* ao, int64_t i) const;
  const T* ao_at(const T* ao, int64_t i) const { return ao_at(const_cast<T*>(ao), i); }
  // The same for qk and v (bf16 where the operands are kept so).
  T* qkv_at(T* x, int64_t i) const;
  void add_output(int l, const T* ao, const T* wo, int n, bool subtract, uint64_t step,
                  bool train, const T* res = nullptr);
  void output_backward(int l, const T* ao, const T* wo, T* gwo, int n, T* dao, uint64_t step,
                       bool train);
  void ffn_chunk(int l, const T* y1, T* x2, bool subtract, int64_t rows, int64_t row0,
                 uint64_t step, bool train, const T* x2_in = nullptr);
  void ffn_chunk_backward(int l, const T* y1, const T* dg, T* dy1, int64_t rows, int64_t row0,
                          uint64_t step, bool train);
  LossStats head(const int32_t* targets, bool backward, T grad_scale, std::vector<T>* logits);
  void stack_forward(const int32_t* tokens, uint64_t step, bool train);
  void stack_backward(uint64_t step, bool train);
  void grads_ready(ParamRange r) { if (on_grads_ready) on_grads_ready(r); }

  Config cfg_;
  Ops<T>& ops_;
  SequenceShard shard_;
  ParamTable table_;
  int64_t L_;      // positions of this rank
  int64_t Lfull_;  // positions of the whole sequence
  int64_t pos0_;   // global position of this rank's first
  int D_, H_, Hloc_, dh_, F_, V_, NL_;
  int Hp_;  // heads each rank attends per attention pass (attention_heads_per_pass)
  int g_;   // ranks per head: 1, or > 1 in pairs mode (sp_ranks_per_head)
  int d1_, a2_;
  Buffer<T> params_, grads_;
  ModelTensors<T> P_, G_;  // named views of params_ and grads_
  Scratch* s_;
};

extern template class ReformerModel<float>;
extern template class ReformerModel<double>;

}  // namespace reformer
