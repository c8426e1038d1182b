#include "framework/grad_reducer.h"

#include <cstddef>
#include <string>

#include "kernels/errors.h"

namespace reformer {

GradReducer::GradReducer(Communicator& comm, float* grads, int64_t n, int64_t bucket_elems,
                         int lag)
    : comm_(comm),
      grads_(grads),
      n_(n),
      bucket_elems_(bucket_elems > 0 ? bucket_elems : 1),
      lag_(lag > 0 ? lag : 0) {}

void GradReducer::begin() {
  lo_ = hi_ = n_;
  buckets_ = 0;
  reports_ = 0;
  waiting_.clear();
  inflight_.clear();
}

void GradReducer::ready(ParamRange r) {
  REFORMER_REQUIRE(r.offset + r.count == lo_, ShapeError,
                   "gradient range [" + std::to_string(r.offset) + ", " +
                       std::to_string(r.offset + r.count) + ") is not just below the pending [" +
                       std::to_string(lo_) + ", " + std::to_string(hi_) + ")");
  ++reports_;
  launch_due(false);
  lo_ = r.offset;
  if (hi_ - lo_ >= bucket_elems_) close();
  launch_due(false);
}

void GradReducer::close() {
  if (hi_ == lo_) return;
  waiting_.push_back({lo_, hi_, reports_ + lag_});
  hi_ = lo_;
}

void GradReducer::launch_due(bool all) {
  size_t k = 0;
  for (; k < waiting_.size() && (all || waiting_[k].due <= reports_); ++k) {
    inflight_.push_back(
        comm_.allreduce_sum_async(grads_ + waiting_[k].lo, waiting_[k].hi - waiting_[k].lo));
    ++buckets_;
  }
  waiting_.erase(waiting_.begin(), waiting_.begin() + std::ptrdiff_t(k));
}

void GradReducer::finish() {
  REFORMER_REQUIRE(lo_ == 0, ShapeError,
                   "gradients below offset " + std::to_string(lo_) + " were never reported ready");
  close();
  launch_due(true);
  const int64_t a = exposed_.begin();
  for (auto& w : inflight_) w->wait();
  inflight_.clear();
  exposed_.end(a);
}

}  // namespace reformer
