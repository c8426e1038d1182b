// CudaOps: Ops<float> on one CUDA device (nvcc only).
//
// Every op - kernel launches, cuBLASLt, CUB, memsets and copies - is issued
// on stream_, a non-blocking stream of its own (never the legacy default
// stream), in order, so the workspace can be reused op after op without
// synchronisation. The host waits for the stream only where the interface
// says so (kernels/ops.h, Ops::stream): synchronize, to_host, to_host_i32
// and sum_squares. Errors found on the device (lsh_sort's bucket range) are
// raised in device_error_ and thrown at those points. alloc is cudaMalloc,
// done outside the training step; the op workspace grows stream-ordered
// (workspace.h). Each op family's member functions are defined in the .cu
// file of that family (elementwise.cu, matmul.cu, attention_*.cu, ...), next
// to their kernels.
//
// Numerics: fp32 storage everywhere except the feed-forward block's hidden
// layer (bf16, ffn.cu); the linear layers' products round
// their operands to bf16 (staged in the workspace) and accumulate in fp32,
// lsh_hash's products use TF32 math (CUBLAS_COMPUTE_32F_FAST_TF32);
// everything else computes
// in fp32 (reductions of losses, norms and optimizer statistics in double).
// Determinism: every op gives the same bits on every run (no float
// atomics; embedding_backward's dwte: embedding.cu).
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <unordered_map>
#include <tuple>
#include <vector>

#include "kernels/common/gemm_staging.h"
#include "kernels/ops.h"
#include "kernels/cuda/workspace.h"

namespace reformer {

class CudaOps final : public Ops<float> {
 public:
  CudaOps();
  ~CudaOps() override;
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  using T = float;  // the element type of the op list's signatures
  const char* name() const override { return "cuda"; }
  int64_t peak_bytes() const override;
  void* stream() override { return stream_; }
  FfnStateCols ffn_state_cols(int C, int F, Activation act) const override {
    return cuda_ffn_state_cols(C, F, act == Activation::relu);
  }
  int64_t layernorm_ffn_ln_cols(int C, int F) const override {
    return reformer::layernorm_ffn_ln_cols(C, F);
  }
  int64_t stash_elems(int64_t n) const override { return bf16_stash_elems(n); }
  bool attention_output_bf16(AttentionPrecision prec) const override {
    return prec == AttentionPrecision::bf16;
  }
  int64_t attention_kept_elems(int64_t L, int dh, AttentionPrecision prec) const override {
    return prec == AttentionPrecision::bf16 ? (attention_kept_bytes(L, dh) + 3) / 4 : 0;
  }
  void reserve_workspace(int64_t bytes) override {
    if (bytes > 0) ws_.reserve(size_t(bytes));
  }
  REFORMER_OPS(REFORMER_DECLARE_OP_OVERRIDE)

 private:
  // The operands of a product (matmul.cu): bf16 in memory (fp32
  // accumulation), or fp32 in memory with TF32 or bf16 tensor-core math.
  enum class GemmOperands { bf16, fp32_bf16_math, fp32_tf32 };
  // C[m, n] (column-major, ldc, fp32) = op(A) op(B) + beta C through
  // cuBLASLt, accumulating in fp32. fp32 operands fall back to plain fp32
  // math where cuBLASLt offers no tensor-core kernel for the shape; bf16
  // operands return false instead (nothing is computed) so the caller can
  // multiply its fp32 operands.
  bool gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* A,
            int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc,
            GemmOperands operands = GemmOperands::fp32_bf16_math, float alpha = 1.0f,
            const float* c_in = nullptr);
  // Where a product's result goes (column-major [m, n] with leading
  // dimension ld, fp32 or bf16) and what cuBLASLt's epilogue does on the
  // way: `bias` (length m) added, an activation applied, its input
  // kept in `aux` (bf16, leading dimension aux_ld) or read back from it.
  // The bias is fp32, or bf16 where bias_bf16.
  struct GemmOut {
    void* d = nullptr;
    const void* c = nullptr;  // the beta term's input where it is not d (same layout)
    int64_t ld = 0;
    bool bf16 = false;
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void* bias = nullptr;
    bool bias_bf16 = false;
    void* aux = nullptr;
    int64_t aux_ld = 0;
  };
  // gemm() into `out`; bf16 operands only where out is bf16 or has an
  // epilogue. False (nothing computed) where cuBLASLt offers no kernel.
  bool gemm_to(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* A,
               int64_t lda, const void* B, int64_t ldb, float beta, const GemmOut& out,
               GemmOperands operands, float alpha = 1.0f);
  // ffn_forward / ffn_backward (ffn.cu) with the input rows given in fp32
  // (inp, rounded to bf16 a block at a time) or, where x16 is non-null,
  // already in bf16 ([N, C], as layernorm_ffn_forward leaves them in ln).
  void ffn_forward_rows(float* out, float* h, float* a, const float* inp,
                        const __nv_bfloat16* x16, const float* w1, const float* b1,
                        const float* w2, const float* b2, int64_t N, int C, int F,
                        Activation act, float alpha, bool accumulate, const float* res);
  void ffn_backward_rows(float* dinp, float* dw1, float* db1, float* dw2, float* db2,
                         const float* dout, const float* inp, const __nv_bfloat16* x16, float* h,
                         float* a, const float* w1, const float* w2, int64_t N, int C, int F,
                         Activation act);
  // layernorm_ffn_forward's LayerNorm state (ffn.cu): bf16 rows in ln where
  // the block is fused and the rows fit the bf16 kernel (true), else fp32.
  bool ffn_layernorm_rows(float* ln, float* mean, float* rstd, const float* inp,
                          const float* ln_w, const float* ln_b, int64_t N, int C, int F,
                          float eps);
  // out[r, c] += alpha * bias[c] for row-major out [rows, cols].
  void add_bias(float* out, const float* bias, int64_t rows, int64_t cols, float alpha);
  // out = alpha (inp @ w + bias) + beta out (res in place of out where
  // given) for row-major out [N, OC], inp [N, C], w [C, OC]: matmul_forward
  // (1, 0) and matmul_accumulate (alpha, 1).
  // An Operand input in bf16 is the product's bf16 operand as it is (no
  // rounding pass; no fp32 fallback: DeviceError where cuBLASLt has no
  // bf16 product for it).
  void product(float* out, Operand<float> inp, const float* w, const float* bias, int64_t N,
               int C, int OC, float alpha, float beta, const float* res = nullptr);

  // Waits for stream_; then throws the device error raised since the last
  // check, if any (device_error_, cleared). Every host synchronisation point
  // goes through it.
  void sync_and_check();

  cudaStream_t stream_ = nullptr;  // non-blocking; every op is issued on it
  // Device bytes held through alloc / alloc_i32, for peak_bytes().
  std::unordered_map<const void*, size_t> sizes_;
  size_t live_ = 0, peak_live_ = 0;
  void track_alloc(const void* p, size_t bytes);
  void track_release(const void* p);
  cuda::Workspace ws_;             // op scratch (CUB temp storage, attention buffers, partial sums)
  cublasLtHandle_t lt_ = nullptr;
  void* lt_ws_ = nullptr;          // cuBLASLt workspace
  size_t lt_ws_bytes_ = 0;
  double* host_scalar_ = nullptr;  // pinned: results of sum_squares
  // Pinned, mapped host word written by device code when an op finds invalid
  // input (nonzero: an error code of cuda::DeviceErrorCode); read and cleared
  // by sync_and_check() only, after the stream is idle.
  int32_t* device_error_ = nullptr;
  int32_t* device_error_dev_ = nullptr;  // device_error_ as device code addresses it
  // cuBLASLt's algorithm for a large product, timed (matmul.cu).
  int tuned_choice(cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb,
                   cublasLtMatrixLayout_t lc, const std::vector<cublasLtMatmulAlgo_t>& algos,
                   const void* A, const void* B, float beta, const GemmOut& out, float alpha,
                   int64_t n);
  int device_ = 0;  // the device this Ops runs on (keys the process-wide GEMM choices)
  // cuBLASLt's algorithm choices (matmul.cu, gemm_to) by (device, transa,
  // transb, m, n, k, lda, ldb, ldc, beta != 0, alignments of A, B, D,
  // operands, D in bf16, epilogue, alignments of the bias and aux, aux_ld),
  // shared by every CudaOps of the process.
  using GemmKey = std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int, int, int, int, int, int, int64_t>;
  struct GemmChoice {
    bool found;  // false: no kernel for bf16 operands (the caller uses fp32 ones)
    cublasLtMatmulAlgo_t algo;
    cublasComputeType_t compute;  // the tensor-core type unless none fits, then CUBLAS_COMPUTE_32F
  };
};

}  // namespace reformer
