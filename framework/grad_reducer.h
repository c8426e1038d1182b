// Data-parallel gradient reduction in buckets, overlapped with the backward
// pass.
//
// The model reports each part of the flat gradient buffer as soon as its
// gradients are complete (head first, then layers top-down, then the
// embedding: contiguous ranges in falling offsets). Ranges gather into a
// bucket until it holds at least `bucket_elems` elements; the bucket's
// all-reduce then starts at once (asynchronously, on the communicator's
// stream for device backends) while the backward pass goes on below it.
// finish() starts what is left and waits for every bucket, so the clip and
// the optimizer see the summed gradients.
//
// With a lag of k, a full bucket starts only after k more ranges have been
// reported (its device event is recorded that much later in the backward),
// so the ranks' kernels meet with slack for the skew between ranks instead
// of one rank's all-reduce holding its SMs while it waits for the other.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "distributed/communicator.h"
#include "framework/model_tensors.h"
#include "kernels/profiling_ops.h"

namespace reformer {

class GradReducer {
 public:
  // grads: the flat buffer [n] in the communicator's memory space.
  GradReducer(Communicator& comm, float* grads, int64_t n, int64_t bucket_elems, int lag = 0);

  // Starts a step: nothing pending.
  void begin();
  // The range's gradients are final for this step. Ranges must arrive in
  // falling, adjacent order, covering [0, n) by finish().
  void ready(ParamRange r);
  // Starts the last bucket and waits for all of them.
  void finish();

  int64_t buckets_started() const { return buckets_; }  // this step

  // Measuring the communication the backward does not hide: with a clock on
  // the compute stream (nullptr: off), finish() marks it before and after
  // waiting for the buckets, and take_exposed_ms() returns the time between
  // those marks summed over the finish() calls since the last take (waiting
  // for them; on a device stream the second mark passes once the last
  // bucket is done and the backward's work is, so the time is the wait the
  // step sees after its backward). The clock must outlive its use here.
  void set_clock(StreamClock* clock) { exposed_.set_clock(clock); }
  double take_exposed_ms() { return exposed_.take_ms(); }

 private:
  void close();               // the pending span becomes a bucket waiting for its turn
  void launch_due(bool all);  // starts the waiting buckets whose lag is over (or all)

  Communicator& comm_;
  float* grads_;
  int64_t n_;
  int64_t bucket_elems_;
  int lag_;
  int64_t lo_ = 0, hi_ = 0;  // pending span [lo_, hi_)
  int64_t reports_ = 0;      // ready() calls this step
  struct Waiting {
    int64_t lo, hi, due;  // starts at the ready() call numbered `due`
  };
  std::vector<Waiting> waiting_;
  int64_t buckets_ = 0;
  std::vector<std::unique_ptr<Work>> inflight_;
  StreamSpans exposed_;  // finish()'s waits
};

}  // namespace reformer
