// The device's bf16 matrix-product ceiling as cuBLAS reaches it: the
// denominator of MFU (kernels/cuda/cuda_ops.h).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/errors.h"

namespace reformer {

namespace {

void cublas_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw DeviceError(std::string("cuBLAS ") + what + " failed (status " +
                      std::to_string(int(s)) + ")");
}

// Frees what it holds on every path.
struct PeakScratch {
  __nv_bfloat16* a = nullptr;
  __nv_bfloat16* b = nullptr;
  __nv_bfloat16* c = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  cublasHandle_t handle = nullptr;
  ~PeakScratch() {
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    if (handle) cublasDestroy(handle);
  }
};

}  // namespace

double measure_bf16_gemm_tflops(void* stream_handle) {
  constexpr int n = 8192;  // large enough for the ceiling, 3 x 128 MiB
  constexpr int warm = 2, timed = 8;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  PeakScratch s;
  const size_t bytes = size_t(n) * n * sizeof(__nv_bfloat16);
  CUDA_CHECK_ALLOC(cudaMalloc(&s.a, bytes), bytes);
  CUDA_CHECK_ALLOC(cudaMalloc(&s.b, bytes), bytes);
  CUDA_CHECK_ALLOC(cudaMalloc(&s.c, bytes), bytes);
  // Values do not change the time of a dense product; zeros are fine.
  CUDA_CHECK(cudaMemsetAsync(s.a, 0, bytes, stream));
  CUDA_CHECK(cudaMemsetAsync(s.b, 0, bytes, stream));
  CUDA_CHECK(cudaEventCreate(&s.start));
  CUDA_CHECK(cudaEventCreate(&s.stop));
  cublas_check(cublasCreate(&s.handle), "create");
  cublas_check(cublasSetStream(s.handle, stream), "set stream");
  const float one = 1.0f, zero = 0.0f;
  auto gemm = [&]() {
    cublas_check(cublasGemmEx(s.handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, s.a, CUDA_R_16BF,
                              n, s.b, CUDA_R_16BF, n, &zero, s.c, CUDA_R_16BF, n,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "bf16 GEMM");
  };
  for (int i = 0; i < warm; ++i) gemm();
  CUDA_CHECK(cudaEventRecord(s.start, stream));
  for (int i = 0; i < timed; ++i) gemm();
  CUDA_CHECK(cudaEventRecord(s.stop, stream));
  CUDA_CHECK(cudaEventSynchronize(s.stop));
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, s.start, s.stop));
  return 2.0 * double(n) * n * n * timed / (double(ms) * 1e-3) / 1e12;
}

}  // namespace reformer
