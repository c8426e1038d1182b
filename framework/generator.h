// Incremental decoding (generation) with a key/value cache.
//
// A Generator feeds a trained model one token at a time and returns the
// logits of the next token, at a cost per token of O(context) attention work
// per layer instead of a full forward pass over the sequence. Per layer it
// keeps the shared query/key projection (the key) and the value of every
// position fed so far; the new position's query attends, per head, to:
//   - full layers: every cached position;
//   - local layers: the positions of its own chunk (bucket_size consecutive
//     positions) and of the chunks_before chunks before it;
//   - LSH layers: per hash round, the cached positions whose bucket in that
//     round equals the new position's (buckets from the rotations the model
//     draws at evaluation for that layer and head, keyed by `rotation_step`);
//     the rounds combine by their log-sum-exp as in the model.
// Scores, key normalisation and masks (self -1e5, causal -1e9) are the
// model's. The reversible layer runs forward: y1 = x1 + Attn(LN_a(x2)),
// y2 = x2 + FFN(LN_f(y1)), then logits = head(LN_out(concat(y1, y2))).
// Full and local layers therefore give exactly the logits of the model's
// forward pass at that position; LSH layers differ from the training-time
// function, whose chunks of the sorted order mix buckets and depend on later
// positions (docs/generation.md).
//
// Every op runs through Ops<T>, so the same code decodes on the CPU and on a
// GPU. Dropout is off (evaluation).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "framework/config.h"
#include "kernels/ops.h"

namespace reformer {

// How the next token is chosen from its logits.
struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy (argmax, lowest index on ties); > 0: logits / T
  int top_k = 0;             // keep the k most likely tokens; 0: all
  double top_p = 1.0;        // keep the smallest most-likely set with mass >= top_p; in (0, 1]
  uint64_t seed = 0;         // keys the sampling stream (RngPurpose::sampling)
};

// The token for `position` drawn from logits [V] (host): greedy when
// temperature is 0, otherwise a draw from softmax(logits / temperature)
// restricted by top_k and top_p, using the uniform number of the stream
// make_key(seed, RngPurpose::sampling, position). Deterministic in its inputs.
template <class T>
int32_t sample_token(const T* logits, int V, const SamplingOptions& o, int64_t position);

template <class T>
class Generator {
 public:
  static constexpr int64_t kPrefillRows = 512;
  // Decodes with the parameters at `params` (Ops memory, laid out by
  // model_param_table(cfg); borrowed, must outlive the generator), for at
  // most `capacity` positions (<= model.max_len). `rotation_step` keys the
  // LSH rotations (the checkpoint's step). Throws ConfigError for a model
  // that cannot decode left to right (attention.causal false) or a capacity
  // outside [1, max_len].
  // prefill() runs up to `prefill_rows` positions per step.
  Generator(const Config& cfg, Ops<T>& ops, const T* params, int64_t capacity,
            uint64_t rotation_step, int64_t prefill_rows = kPrefillRows);
  ~Generator();
  Generator(const Generator&) = delete;
  Generator& operator=(const Generator&) = delete;

  // Feeds `token` (in [0, vocab_size)) at position position() and returns
  // the logits [vocab_size] of the token after it (host). Throws DataError
  // for a token outside the vocabulary and ShapeError past the capacity.
  const std::vector<T>& feed(int32_t token);
  // Feeds tokens[0 .. n) as n feed() calls would and returns the logits
  // after the last: the same function, with the projections, feed-forward
  // and hashing as products of up to prefill_rows rows at a time (the
  // attention still runs query by query). Throws as feed() does.
  const std::vector<T>& prefill(const int32_t* tokens, int64_t n);
  int64_t position() const { return pos_; }
  int64_t capacity() const { return cap_; }
  // The attention kind layer l decodes with (full when the model's sequence
  // fits one chunk, as in the model).
  AttentionKind layer_kind(int l) const { return kinds_[size_t(l)]; }

  // Test hook: when set, feed() (prefill(): its last position) copies each
  // layer's key (qk), value and attention output before the output
  // projection ([H * dh] each, host).
  struct Trace {
    std::vector<std::vector<T>> qk, v, ao;  // [n_layers][H * dh]
  };
  Trace* trace = nullptr;

 private:
  struct State;  // device buffers and the LSH bucket lists
  void step(const int32_t* tokens, int64_t rows);
  void layer(int l, int64_t rows);
  void attend(int l, int64_t rows);

  Config cfg_;
  Ops<T>& ops_;
  int64_t cap_, pos_ = 0;
  int D_, H_, dh_, F_, V_, NL_;
  std::vector<AttentionKind> kinds_;
  std::unique_ptr<State> s_;
  std::vector<T> logits_;
};

// A checkpoint's model, read for decoding.
struct GenerationModel {
  Config cfg;                 // the stored configuration with the overrides applied
  int64_t step = 0;           // optimizer steps of the checkpoint (keys the LSH rotations)
  std::vector<float> params;  // host, laid out by model_param_table(cfg)
};

// Reads and validates `path` (read_checkpoint: a missing or damaged file
// throws CheckpointError), parses its stored configuration with `overrides`
// (ConfigError), and checks that the parameters match it (CheckpointError).
GenerationModel read_generation_model(const std::string& path,
                                      const std::vector<std::string>& overrides);

extern template class Generator<float>;
extern template class Generator<double>;

}  // namespace reformer
