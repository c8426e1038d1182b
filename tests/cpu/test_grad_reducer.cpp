// GradReducer on one rank: buckets close at the bucket size in the order the
// backward reports its ranges, and with a clock finish() marks the wait it
// leaves after the backward, which take_exposed_ms() sums and clears.
#include <gtest/gtest.h>

#include <vector>

#include "distributed/communicator.h"
#include "framework/grad_reducer.h"
#include "kernels/profiling_ops.h"

using namespace reformer;

namespace {

// Marks numbered 0, 1, ...; mark k is at time 10 k^2 ms, so pairs differ.
class FakeClock final : public StreamClock {
 public:
  int64_t mark() noexcept override { return n_++; }
  double ms_between(int64_t a, int64_t b) override { return 10.0 * double(b * b - a * a); }
  void clear() override { n_ = 0; ++clears; }
  int clears = 0;

 private:
  int64_t n_ = 0;
};

}  // namespace

TEST(GradReducer, BucketsAndTheExposedWait) {
  LocalCommunicator comm;
  std::vector<float> grads(100, 1.0f);
  GradReducer reducer(comm, grads.data(), 100, /*bucket_elems*/ 30);
  FakeClock clock;
  reducer.set_clock(&clock);
  for (int step = 0; step < 2; ++step) {
    reducer.begin();
    reducer.ready({70, 30});  // a bucket of 30
    reducer.ready({50, 20});
    reducer.ready({0, 50});  // 70 pending: one bucket
    reducer.finish();
    EXPECT_EQ(reducer.buckets_started(), 2);
  }
  // Marks (0, 1) and (2, 3): 10 (1 - 0) + 10 (9 - 4) ms.
  EXPECT_DOUBLE_EQ(reducer.take_exposed_ms(), 60.0);
  EXPECT_EQ(clock.clears, 1);
  EXPECT_DOUBLE_EQ(reducer.take_exposed_ms(), 0.0);
  for (float g : grads) EXPECT_EQ(g, 1.0f);  // one rank: the sum is the gradient
  reducer.set_clock(nullptr);
  reducer.begin();
  reducer.ready({0, 100});
  reducer.finish();
  EXPECT_DOUBLE_EQ(reducer.take_exposed_ms(), 0.0);
}
