// CudaOps construction, memory and the framework's entry points
// (cuda_device_count, make_cuda_ops). The op families live in their own .cu
// files, mirroring kernels/cpu/.
#include "kernels/cuda/cuda_ops.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "kernels/errors.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"

namespace reformer {

int cuda_device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls start clean
    return 0;
  }
  return n;
}

int64_t cuda_device_memory_bytes() {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return int64_t(total_b);
}

std::unique_ptr<Ops<float>> make_cuda_ops() { return std::make_unique<CudaOps>(); }

namespace {
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;  // cuBLASLt scratch; Hopper wants >= 32 MiB
}  // namespace

CudaOps::CudaOps() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaSetDevice(dev));
  device_ = dev;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  ws_.bind(stream_);
  CUBLAS_CHECK(cublasLtCreate(&lt_));
  CUDA_CHECK_ALLOC(cudaMalloc(&lt_ws_, kLtWorkspaceBytes), kLtWorkspaceBytes);
  lt_ws_bytes_ = kLtWorkspaceBytes;
  CUDA_CHECK(cudaMallocHost(&host_scalar_, sizeof(double)));
  CUDA_CHECK(cudaHostAlloc(&device_error_, sizeof(int32_t), cudaHostAllocMapped));
  *device_error_ = 0;
  CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_error_dev_),
                                      device_error_, 0));
}

CudaOps::~CudaOps() {
  // Destructors never throw: errors here are ignored.
  if (stream_) cudaStreamSynchronize(stream_);
  ws_.free_now();
  if (device_error_) cudaFreeHost(device_error_);
  if (host_scalar_) cudaFreeHost(host_scalar_);
  if (lt_ws_) cudaFree(lt_ws_);
  if (lt_) cublasLtDestroy(lt_);
  if (stream_) cudaStreamDestroy(stream_);
}

float* CudaOps::alloc(int64_t n) {
  if (n <= 0) return nullptr;
  void* p = nullptr;
  CUDA_CHECK_ALLOC(cudaMalloc(&p, sizeof(float) * size_t(n)), sizeof(float) * size_t(n));
  track_alloc(p, sizeof(float) * size_t(n));
  return static_cast<float*>(p);
}

// release() runs from Buffer destructors, so it must not throw.
void CudaOps::release(float* p) {
  if (!p) return;
  track_release(p);
  cudaFree(p);
}

int32_t* CudaOps::alloc_i32(int64_t n) {
  if (n <= 0) return nullptr;
  void* p = nullptr;
  CUDA_CHECK_ALLOC(cudaMalloc(&p, sizeof(int32_t) * size_t(n)), sizeof(int32_t) * size_t(n));
  track_alloc(p, sizeof(int32_t) * size_t(n));
  return static_cast<int32_t*>(p);
}

void CudaOps::release_i32(int32_t* p) {
  if (!p) return;
  track_release(p);
  cudaFree(p);
}

void CudaOps::track_alloc(const void* p, size_t bytes) {
  sizes_[p] = bytes;
  live_ += bytes;
  peak_live_ = std::max(peak_live_, live_);
}

void CudaOps::track_release(const void* p) {
  const auto it = sizes_.find(p);
  if (it == sizes_.end()) return;
  live_ -= it->second;
  sizes_.erase(it);
}

// The op scratch only grows and the cuBLASLt workspace is held throughout,
// so both count as held at the moment of peak allocation.
int64_t CudaOps::peak_bytes() const {
  return int64_t(peak_live_ + ws_.capacity() + lt_ws_bytes_);
}

namespace {

// True when host is page-locked (cudaMallocHost / registered): an async copy
// from it reads the buffer later, so the caller may not reuse it at once.
bool is_pinned(const void* host) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, host) != cudaSuccess) {
    cudaGetLastError();  // not known to CUDA: pageable
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

}  // namespace

void CudaOps::sync_and_check() {
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  const int32_t code = *static_cast<volatile int32_t*>(device_error_);
  if (code == 0) return;
  *device_error_ = 0;
  throw ShapeError(std::string("cuda: ") + cuda::describe_device_error(code));
}

void CudaOps::to_host(float* host, const float* src, int64_t n) {
  if (n > 0)
    CUDA_CHECK(cudaMemcpyAsync(host, src, sizeof(float) * size_t(n), cudaMemcpyDeviceToHost,
                               stream_));
  sync_and_check();
}

void CudaOps::to_host_i32(int32_t* host, const int32_t* src, int64_t n) {
  if (n > 0)
    CUDA_CHECK(cudaMemcpyAsync(host, src, sizeof(int32_t) * size_t(n), cudaMemcpyDeviceToHost,
                               stream_));
  sync_and_check();
}

// A copy from pageable memory returns once the data is staged, so the host
// buffer may be reused at once without waiting for the device; from pinned
// memory the DMA reads the buffer later, so that case waits for the stream.
void CudaOps::from_host(float* dst, const float* host, int64_t n) {
  if (n <= 0) return;
  CUDA_CHECK(
      cudaMemcpyAsync(dst, host, sizeof(float) * size_t(n), cudaMemcpyHostToDevice, stream_));
  if (is_pinned(host)) CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaOps::from_host_i32(int32_t* dst, const int32_t* host, int64_t n) {
  if (n <= 0) return;
  CUDA_CHECK(
      cudaMemcpyAsync(dst, host, sizeof(int32_t) * size_t(n), cudaMemcpyHostToDevice, stream_));
  if (is_pinned(host)) CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaOps::synchronize() { sync_and_check(); }

}  // namespace reformer
