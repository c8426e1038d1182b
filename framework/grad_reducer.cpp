#include "framework/grad_reducer.h"

#include <string>

#include "kernels/errors.h"

namespace reformer {

GradReducer::GradReducer(Communicator& comm, float* grads, int64_t n, int64_t bucket_elems)
    : comm_(comm), grads_(grads), n_(n), bucket_elems_(bucket_elems > 0 ? bucket_elems : 1) {}

void GradReducer::begin() {
  lo_ = hi_ = n_;
  buckets_ = 0;
  inflight_.clear();
}

void GradReducer::ready(ParamRange r) {
  REFORMER_REQUIRE(r.offset + r.count == lo_, ShapeError,
                   "gradient range [" + std::to_string(r.offset) + ", " +
                       std::to_string(r.offset + r.count) + ") is not just below the pending [" +
                       std::to_string(lo_) + ", " + std::to_string(hi_) + ")");
  lo_ = r.offset;
  if (hi_ - lo_ >= bucket_elems_) launch();
}

void GradReducer::launch() {
  if (hi_ == lo_) return;
  inflight_.push_back(comm_.allreduce_sum_async(grads_ + lo_, hi_ - lo_));
  ++buckets_;
  hi_ = lo_;
}

void GradReducer::finish() {
  REFORMER_REQUIRE(lo_ == 0, ShapeError,
                   "gradients below offset " + std::to_string(lo_) + " were never reported ready");
  launch();
  for (auto& w : inflight_) w->wait();
  inflight_.clear();
}

}  // namespace reformer
