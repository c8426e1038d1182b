// The CUDA family of error checks: every runtime, cuBLAS(Lt) call and kernel
// launch goes through one of these. A failure throws reformer::DeviceError
// whose message names the failing call, the error, the file and the line.
//
// The message is built here rather than with reformer::where() so that this
// library does not depend on reformer_framework (which links it).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "kernels/errors.h"

namespace reformer::cuda {

[[noreturn]] inline void throw_device_error(const char* call, const std::string& what,
                                            const char* file, int line) {
  throw DeviceError(std::string(call) + " failed: " + what + " (at " + file + ":" +
                    std::to_string(line) + ")");
}

inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e == cudaSuccess) return;
  // A failed call also leaves its error as the last one, where the next
  // launch's check would find it and blame that kernel: clear it (a sticky
  // error, one that breaks the context, stays reported by every call).
  cudaGetLastError();
  throw_device_error(call, std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e), file,
                     line);
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw_device_error(call, "cublas status " + std::to_string(int(s)), file, line);
}

// Like check_cuda for an allocation of `bytes` bytes; running out of device
// memory throws OutOfMemoryError saying how much was asked for and what the
// device has free of its total.
inline void check_alloc(cudaError_t e, size_t bytes, const char* call, const char* file, int line) {
  if (e != cudaErrorMemoryAllocation) return check_cuda(e, call, file, line);
  cudaGetLastError();  // clear it: the device stays usable
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) cudaGetLastError();
  const auto gib = [](size_t b) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f GiB", double(b) / double(size_t(1) << 30));
    return std::string(buf);
  };
  throw OutOfMemoryError("out of device memory: " + std::string(call) + " asked for " + gib(bytes) +
                             "; the device has " + gib(free_b) + " free of " + gib(total_b) +
                             " (at " + file + ":" + std::to_string(line) + ")",
                         int64_t(bytes), int64_t(free_b), int64_t(total_b));
}

// Codes device code writes to CudaOps' error word when an op finds invalid
// input it cannot report at once (the host does not wait for ops); thrown as
// ShapeError at the next host synchronisation point (kernels/ops.h).
enum DeviceErrorCode : int32_t {
  kNoDeviceError = 0,
  kBucketOutOfRange = 1,  // lsh_sort, lsh_pack_buckets, bucket_histogram: an id outside [0, n_buckets)
  kRouteOutOfRange = 2,   // sort_route: a slot outside the sequence, or entries past capacity
  kNotPermutation = 3,    // invert_index: an index out of range or repeated
};

inline const char* describe_device_error(int32_t code) {
  switch (code) {
    case kBucketOutOfRange:
      return "lsh_sort, lsh_pack_buckets or bucket_histogram: a bucket id lies outside [0, "
             "n_buckets)";
    case kRouteOutOfRange:
      return "sort_route: a global slot lies outside the sequence, or the entries exceed the "
             "send arrays' capacity";
    case kNotPermutation:
      return "invert_index: the indices are not a permutation of [0, n)";
    default:
      return "an op found invalid input on the device";
  }
}

}  // namespace reformer::cuda

// CUDA_CHECK(cudaMemcpy(...)): throws DeviceError when the call fails.
#define CUDA_CHECK(call) ::reformer::cuda::check_cuda((call), #call, __FILE__, __LINE__)
// CUDA_CHECK_ALLOC(cudaMalloc(&p, bytes), bytes): CUDA_CHECK, with
// OutOfMemoryError when the device has too little memory.
#define CUDA_CHECK_ALLOC(call, bytes) \
  ::reformer::cuda::check_alloc((call), (bytes), #call, __FILE__, __LINE__)
// CUBLAS_CHECK(cublasLtMatmul(...)): throws DeviceError when the call fails.
#define CUBLAS_CHECK(call) ::reformer::cuda::check_cublas((call), #call, __FILE__, __LINE__)
// After every <<<...>>> launch: throws DeviceError on a launch (configuration) error.
#define CUDA_CHECK_LAUNCH(name) \
  ::reformer::cuda::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
