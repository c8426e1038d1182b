// ProfilingOps: an Ops<float> that forwards every op of kernels/op_list.h to
// an inner Ops and times it, accumulating calls and milliseconds per op. It
// wraps the Ops a model really computes with, so the profile is the real
// call order (`reformer bench --breakdown`); the forwarding is generated from
// the op list, so it cannot miss an op.
//
// Timing goes through a StreamClock: CUDA events recorded on the inner
// stream (make_cuda_stream_clock, kernels/cuda/cuda_ops.h) where the inner
// Ops has a stream, the host's steady clock (WallClock) otherwise. Event
// timing adds two event records per op and never waits for the device until
// stats() or the mark buffer fills; an op's time is then the device time
// between its first and its last piece of work on the stream.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "kernels/ops.h"

namespace reformer {

// Marks points of the work issued on one stream and measures between them.
class StreamClock {
 public:
  virtual ~StreamClock() = default;
  // Marks the point the stream has reached (everything issued so far);
  // returns its id, valid until clear(). Never throws; -1 when marking failed.
  virtual int64_t mark() noexcept = 0;
  // Milliseconds from mark a to mark b; waits until b is reached.
  virtual double ms_between(int64_t a, int64_t b) = 0;
  // Forgets every mark (ids restart at 0).
  virtual void clear() = 0;
};

// Spans of a stream's time, each from a mark before some work (begin) to a
// mark after it (end), on a clock of that stream (nullptr: off, no marks):
// the time the compute stream spends in collectives that it waits for.
class StreamSpans {
 public:
  // The clock must outlive its use here and serve no other StreamSpans:
  // take_ms() clears its marks.
  void set_clock(StreamClock* clock) {
    clock_ = clock;
    spans_.clear();
  }
  // A mark before the work (-1 when off).
  int64_t begin() noexcept { return clock_ ? clock_->mark() : -1; }
  // The span from `a` (begin()'s) to a mark now.
  void end(int64_t a) {
    if (clock_) spans_.push_back({a, clock_->mark()});
  }
  // Milliseconds of the spans since the last take (waiting for them); forgets
  // them and the clock's marks.
  double take_ms() {
    double ms = 0;
    for (const auto& [a, b] : spans_)
      if (a >= 0 && b >= 0) ms += clock_->ms_between(a, b);
    spans_.clear();
    if (clock_) clock_->clear();
    return ms;
  }

 private:
  StreamClock* clock_ = nullptr;
  std::vector<std::pair<int64_t, int64_t>> spans_;
};

// StreamClock for Ops whose work is done when the call returns: host time.
class WallClock final : public StreamClock {
 public:
  int64_t mark() noexcept override;
  double ms_between(int64_t a, int64_t b) override;
  void clear() override { t_.clear(); }

 private:
  std::vector<double> t_;  // ms since an arbitrary origin, by mark id
};

// Calls and time of one op since the last reset().
struct OpStats {
  OpId op;
  int64_t calls = 0;
  double ms = 0.0;
  double flops = 0.0;  // matrix products and attention (kernels/common/op_flops.h); 0 for others
};

class ProfilingOps final : public Ops<float> {
 public:
  using T = float;  // the element type of the op list's signatures
  // inner must outlive this; clock measures inner's stream.
  ProfilingOps(Ops<float>& inner, std::unique_ptr<StreamClock> clock);

  const char* name() const override { return inner_.name(); }
  int64_t peak_bytes() const override { return inner_.peak_bytes(); }
  bool supports(OpId id) const override { return inner_.supports(id); }
  void* stream() override { return inner_.stream(); }
  FfnStateCols ffn_state_cols(int C, int F, Activation act) const override {
    return inner_.ffn_state_cols(C, F, act);
  }
  int64_t layernorm_ffn_ln_cols(int C, int F) const override {
    return inner_.layernorm_ffn_ln_cols(C, F);
  }
  int64_t stash_elems(int64_t n) const override { return inner_.stash_elems(n); }
  bool attention_output_bf16(AttentionPrecision prec) const override {
    return inner_.attention_output_bf16(prec);
  }
  int64_t attention_kept_elems(int64_t L, int dh, AttentionPrecision prec) const override {
    return inner_.attention_kept_elems(L, dh, prec);
  }
  void reserve_workspace(int64_t bytes) override { inner_.reserve_workspace(bytes); }
  REFORMER_OPS(REFORMER_DECLARE_OP_OVERRIDE)

  // Per-op totals since the last reset(), in op-list order (every op, called
  // or not). Waits for the marked work to be done.
  std::vector<OpStats> stats();
  // Starts counting afresh (e.g. after a warm-up step).
  void reset();

 private:
  // Times one forwarded call: marks the stream at construction and at
  // destruction (also when the op throws).
  class Span {
   public:
    Span(ProfilingOps& p, OpId id, double flops)
        : p_(p), id_(id), begin_(p.clock_->mark()), flops_(flops) {}
    ~Span() { p_.record(id_, begin_, p_.clock_->mark(), flops_); }
    Span(const Span&) = delete;
    Span& operator=(const Span&) = delete;

   private:
    ProfilingOps& p_;
    OpId id_;
    int64_t begin_;
    double flops_;
  };
  struct Pending {
    OpId op;
    int64_t begin, end;  // clock marks
    double flops;
  };
  // Before each op: flushes when pending_ is full, so record() never grows it.
  void make_room();
  void record(OpId id, int64_t begin, int64_t end, double flops) noexcept;
  void flush();  // folds pending_ into totals_ and clears the clock

  Ops<float>& inner_;
  std::unique_ptr<StreamClock> clock_;
  std::vector<Pending> pending_;
  std::vector<OpStats> totals_;  // by OpId
};

}  // namespace reformer
