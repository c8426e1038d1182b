// StreamClock on a CUDA stream: each mark is a CUDA event recorded on the
// stream; events are pooled and reused after clear().
#include <cuda_runtime.h>

#include <vector>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/profiling_ops.h"

namespace reformer {

namespace {

class CudaStreamClock final : public StreamClock {
 public:
  explicit CudaStreamClock(cudaStream_t stream) : stream_(stream) {}
  ~CudaStreamClock() override {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);  // never throws
  }
  CudaStreamClock(const CudaStreamClock&) = delete;
  CudaStreamClock& operator=(const CudaStreamClock&) = delete;

  int64_t mark() noexcept override {
    try {
      if (used_ == events_.size()) {
        cudaEvent_t e = nullptr;
        if (cudaEventCreate(&e) != cudaSuccess) return -1;
        events_.push_back(e);
      }
      if (cudaEventRecord(events_[used_], stream_) != cudaSuccess) return -1;
    } catch (...) {
      return -1;
    }
    return int64_t(used_++);
  }

  double ms_between(int64_t a, int64_t b) override {
    CUDA_CHECK(cudaEventSynchronize(events_[size_t(b)]));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, events_[size_t(a)], events_[size_t(b)]));
    return double(ms);
  }

  void clear() override { used_ = 0; }

 private:
  cudaStream_t stream_;
  std::vector<cudaEvent_t> events_;  // events_[0, used_) hold marks
  size_t used_ = 0;
};

}  // namespace

std::unique_ptr<StreamClock> make_cuda_stream_clock(void* stream) {
  return std::make_unique<CudaStreamClock>(static_cast<cudaStream_t>(stream));
}

}  // namespace reformer
