// Device scratch memory owned by CudaOps and lent to one op at a time.
//
// All ops run on one stream, so a region handed out by get() may be reused by
// the next op without synchronisation. Growing is stream-ordered
// (cudaFreeAsync of the old block, cudaMallocAsync of the new one on the
// bound stream): it never blocks the host or the device, and pointers from an
// earlier get() are invalid after the next one. The op shapes of a training
// step are fixed, so the workspace reaches its size during the first step
// and later steps allocate nothing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/workspace_growth.h"
#include "kernels/cuda/check.h"

namespace reformer::cuda {

class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { free_now(); }
  // The stream every user of the workspace runs on; set once, before get().
  void bind(cudaStream_t stream) { stream_ = stream; }
  // At least `bytes` bytes of device memory, 256-byte aligned, usable by work
  // issued on the bound stream from now on.
  void* get(size_t bytes) {
    if (bytes > cap_) grow_to(size_t(workspace_capacity(int64_t(bytes))));
    return p_;
  }
  // Makes the capacity at least `bytes`, exactly `bytes` where it grows: for
  // a caller that knows the largest request to come (the memory plan's
  // estimate), so that no margin is allocated.
  void reserve(size_t bytes) {
    if (bytes > cap_) grow_to(bytes);
  }
  size_t capacity() const { return cap_; }
  // Frees the block once the bound stream's work is done; never throws.
  void free_now() {
    if (!p_) return;
    cudaFreeAsync(p_, stream_);
    cudaStreamSynchronize(stream_);
    p_ = nullptr;
    cap_ = 0;
  }

 private:
  void grow_to(size_t grown) {
    if (p_) CUDA_CHECK(cudaFreeAsync(p_, stream_));
    p_ = nullptr;
    cap_ = 0;
    cudaError_t rc = cudaMallocAsync(&p_, grown, stream_);
    if (rc == cudaErrorMemoryAllocation) {
      // The stream-ordered pool still holds the blocks freed above (and
      // by earlier growth) until the stream passes them: wait for it and
      // hand them back to the device, then ask again. Only a reservation
      // or growth, before or in a run's first step, ever gets here.
      (void)cudaGetLastError();
      CUDA_CHECK(cudaStreamSynchronize(stream_));
      int device = 0;
      cudaMemPool_t pool = nullptr;
      CUDA_CHECK(cudaGetDevice(&device));
      CUDA_CHECK(cudaDeviceGetMemPool(&pool, device));
      CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
      rc = cudaMallocAsync(&p_, grown, stream_);
    }
    check_alloc(rc, grown, "cudaMallocAsync (op workspace)", __FILE__, __LINE__);
    cap_ = grown;
  }

  cudaStream_t stream_ = nullptr;
  void* p_ = nullptr;
  size_t cap_ = 0;
};

// Lays out several regions in one workspace allocation: reserve() every
// region first (recording offsets), then base = ws.get(total()), then at().
class Carve {
 public:
  size_t reserve(size_t bytes) {
    const size_t off = total_;
    total_ += (bytes + 255) / 256 * 256;
    return off;
  }
  size_t total() const { return total_ > 0 ? total_ : 256; }
  template <class T>
  static T* at(void* base, size_t off) {
    return reinterpret_cast<T*>(static_cast<char*>(base) + off);
  }

 private:
  size_t total_ = 0;
};

// The bf16 operands of a product over blocks of rows, carved from one
// workspace request in gemm_stage_bytes' layout (kernels/common/
// gemm_staging.h): a weight [C, K], a block of `rows` input rows [rows, C]
// and as many dout rows [rows, K] (reserved whether or not the caller uses
// them, so every product of a step asks for the same bytes).
struct GemmStage {
  __nv_bfloat16 *w, *x, *d;
};
inline GemmStage carve_gemm_stage(Workspace& ws, int64_t C, int64_t K, int64_t rows) {
  Carve carve;
  const size_t o_w = carve.reserve(2 * size_t(C) * size_t(K));
  const size_t o_x = carve.reserve(2 * size_t(rows) * size_t(C));
  const size_t o_d = carve.reserve(2 * size_t(rows) * size_t(K));
  void* base = ws.get(carve.total());
  return {Carve::at<__nv_bfloat16>(base, o_w), Carve::at<__nv_bfloat16>(base, o_x),
          Carve::at<__nv_bfloat16>(base, o_d)};
}

}  // namespace reformer::cuda
