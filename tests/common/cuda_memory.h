// Device buffers for the collective checks (collective_checks.h), moved in
// and out on the tests' compute stream.
#pragma once

#include <cuda_runtime.h>

#include "kernels/errors.h"
#include "tests/common/collective_checks.h"

namespace reformer::test {

inline Memory device_memory(const cudaStream_t* stream) {
  return {[](size_t b) {
            void* p = nullptr;
            if (cudaMalloc(&p, b > 0 ? b : 1) != cudaSuccess) throw DeviceError("cudaMalloc failed");
            return p;
          },
          [](void* p) { cudaFree(p); },
          [stream](void* d, const void* s, size_t b) {
            cudaMemcpyAsync(d, s, b, cudaMemcpyHostToDevice, *stream);
            cudaStreamSynchronize(*stream);
          },
          [stream](void* d, const void* s, size_t b) {
            cudaMemcpyAsync(d, s, b, cudaMemcpyDeviceToHost, *stream);
            cudaStreamSynchronize(*stream);
          }};
}

}  // namespace reformer::test
