// Dense linear layer out = inp @ w + bias (CUDA twin of kernels/cpu/matmul.cpp).
//
// Products go through cuBLASLt with fp32 matrices in memory and bf16
// tensor-core math accumulating in fp32 (CUBLAS_COMPUTE_32F_FAST_16BF), so
// results carry bf16 input rounding (~3 significant digits relative to the
// output scale). Row-major [N, C] @ [C, OC] is computed as the column-major
// product out^T = w^T inp^T by swapping the operands. The bias is added by a
// separate broadcast kernel; dbias is a deterministic two-pass column sum.
// cuBLASLt's heuristic is queried once per (shape, strides, alignment) and
// cached; if it offers no bf16 kernel the product falls back to plain fp32.
// Bitwise reproducible on one GPU model and toolkit (cuBLAS's guarantee).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/errors.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

// out[r, c] += bias[c] for a row-major [rows, cols] matrix.
__global__ void add_bias_kernel(float* out, const float* bias, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] += bias[i % cols];
}

struct DoutValue {
  const float* dout;
  int64_t cols;
  __device__ double operator()(int64_t r, int64_t c) const { return double(dout[r * cols + c]); }
};
struct AddTo {
  float* dst;
  __device__ void operator()(int64_t c, double s) const { dst[c] += float(s); }
};

// Largest power of two (<= 16) dividing both the address and the row stride in bytes.
int alignment(const void* p, int64_t ld) {
  const uint64_t a = uint64_t(reinterpret_cast<uintptr_t>(p)) | uint64_t(ld * 4);
  int al = 16;
  while (al > 4 && (a % uint64_t(al)) != 0) al >>= 1;
  return al;
}

// RAII holders for the cuBLASLt descriptors of one call.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace
}  // namespace cuda

void CudaOps::gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                   cublasComputeType_t fast) {
  const int al_a = cuda::alignment(A, lda), al_b = cuda::alignment(B, ldb),
            al_c = cuda::alignment(C, ldc);
  const GemmKey key{int(trans_a), int(trans_b), m, n, k, lda, ldb, ldc, beta != 0.0f ? 1 : 0,
                    al_a * 10000 + al_b * 100 + al_c, int(fast)};
  auto make = [&](cuda::LtDescs& d, cublasComputeType_t compute) {
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F));
    const cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, CUDA_R_32F, uint64_t(trans_a ? k : m),
                                            uint64_t(trans_a ? m : k), lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_32F, uint64_t(trans_b ? n : k),
                                            uint64_t(trans_b ? k : n), ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, CUDA_R_32F, uint64_t(m), uint64_t(n), ldc));
  };

  // The algorithm and compute type chosen for this key: tensor-core math
  // first; plain fp32 only if cuBLASLt offers no such kernel for the shape.
  auto it = algo_cache_.find(key);
  if (it == algo_cache_.end()) {
    for (cublasComputeType_t compute : {fast, CUBLAS_COMPUTE_32F}) {
      cuda::LtDescs q;
      make(q, compute);
      CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&q.pref));
      const uint64_t ws = lt_ws_bytes_;
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      const uint32_t aa = uint32_t(al_a), ab = uint32_t(al_b), ac = uint32_t(al_c);
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa)));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab)));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof(ac)));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof(ac)));
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_, q.op, q.a, q.b, q.c, q.c,
                                                               q.pref, 1, &result, &found);
      if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
        it = algo_cache_.emplace(key, GemmChoice{result.algo, compute}).first;
        break;
      }
    }
    if (it == algo_cache_.end())
      throw DeviceError("cublasLtMatmulAlgoGetHeuristic: no algorithm for m=" + std::to_string(m) +
                        " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                        " (at " __FILE__ ")");
  }
  cuda::LtDescs d;
  make(d, it->second.compute);
  const float alpha = 1.0f;
  CUBLAS_CHECK(cublasLtMatmul(lt_, d.op, &alpha, A, d.a, B, d.b, &beta, C, d.c, C, d.c,
                              &it->second.algo, lt_ws_, lt_ws_bytes_, stream_));
}

void CudaOps::matmul_forward(float* out, const float* inp, const float* w, const float* bias,
                             int64_t N, int C, int OC) {
  if (N <= 0 || OC <= 0) return;
  if (C <= 0) {
    fill(out, 0.0f, N * OC);
  } else {
    // out^T [OC, N] = w^T [OC, C] inp^T [C, N], all column-major views of row-major data.
    gemm(false, false, OC, N, C, w, OC, inp, C, 0.0f, out, OC);
  }
  if (bias) {
    cuda::add_bias_kernel<<<cuda::grid_for(N * OC), cuda::kThreads, 0, stream_>>>(out, bias, N,
                                                                                  OC);
    CUDA_CHECK_LAUNCH("add_bias_kernel");
  }
}

void CudaOps::matmul_backward(float* dinp, float* dw, float* dbias, const float* dout,
                              const float* inp, const float* w, int64_t N, int C, int OC) {
  if (N <= 0 || OC <= 0) return;
  if (dinp && C > 0) {
    // dinp^T [C, N] += w [C, OC] dout^T [OC, N].
    gemm(true, false, C, N, OC, w, OC, dout, OC, 1.0f, dinp, C);
  }
  if (dw && C > 0) {
    // dw^T [OC, C] += dout^T [OC, N] inp [N, C].
    gemm(false, true, OC, C, N, dout, OC, inp, C, 1.0f, dw, OC);
  }
  if (dbias) {
    double* scratch =
        static_cast<double*>(ws_.get(sizeof(double) * size_t(cuda::colsum_slabs(N) * OC)));
    cuda::colsum<double>(scratch, cuda::DoutValue{dout, OC}, cuda::AddTo{dbias}, N, OC, stream_);
  }
}

}  // namespace reformer
