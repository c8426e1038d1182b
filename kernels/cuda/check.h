// The CUDA family of error checks: every runtime, cuBLAS(Lt) call and kernel
// launch goes through one of these. A failure throws reformer::DeviceError
// whose message names the failing call, the error, the file and the line.
//
// The message is built here rather than with reformer::where() so that this
// library does not depend on reformer_framework (which links it).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/errors.h"

namespace reformer::cuda {

[[noreturn]] inline void throw_device_error(const char* call, const std::string& what,
                                            const char* file, int line) {
  throw DeviceError(std::string(call) + " failed: " + what + " (at " + file + ":" +
                    std::to_string(line) + ")");
}

inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess)
    throw_device_error(call, std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e),
                       file, line);
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw_device_error(call, "cublas status " + std::to_string(int(s)), file, line);
}

// Codes device code writes to CudaOps' error word when an op finds invalid
// input it cannot report at once (the host does not wait for ops); thrown as
// ShapeError at the next host synchronisation point (kernels/ops.h).
enum DeviceErrorCode : int32_t {
  kNoDeviceError = 0,
  kBucketOutOfRange = 1,  // lsh_sort: a bucket id outside [0, n_buckets)
};

inline const char* describe_device_error(int32_t code) {
  switch (code) {
    case kBucketOutOfRange:
      return "lsh_sort: a bucket id lies outside [0, n_buckets)";
    default:
      return "an op found invalid input on the device";
  }
}

}  // namespace reformer::cuda

// CUDA_CHECK(cudaMemcpy(...)): throws DeviceError when the call fails.
#define CUDA_CHECK(call) ::reformer::cuda::check_cuda((call), #call, __FILE__, __LINE__)
// CUBLAS_CHECK(cublasLtMatmul(...)): throws DeviceError when the call fails.
#define CUBLAS_CHECK(call) ::reformer::cuda::check_cublas((call), #call, __FILE__, __LINE__)
// After every <<<...>>> launch: throws DeviceError on a launch (configuration) error.
#define CUDA_CHECK_LAUNCH(name) \
  ::reformer::cuda::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
