// CudaOps: Ops<float> on one CUDA device (nvcc only).
//
// Every op is issued on stream_ (the legacy default stream), in order, so the
// workspace can be reused op after op without synchronisation; to_host /
// from_host are synchronous cudaMemcpy calls, alloc is cudaMalloc. Each op
// family's member functions are defined in the .cu file of that family
// (elementwise.cu, matmul.cu, attention.cu, ...), next to their kernels.
//
// Numerics: fp32 storage everywhere; GEMMs use bf16 tensor-core math with
// fp32 accumulation (CUBLAS_COMPUTE_32F_FAST_16BF), except lsh_hash's TF32
// products (CUBLAS_COMPUTE_32F_FAST_TF32); everything else computes
// in fp32 (reductions of losses, norms and optimizer statistics in double).
// Determinism: every op gives the same bits on every run except
// embedding_backward's dwte (atomicAdd over tokens) - see embedding.cu.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <unordered_map>
#include <tuple>

#include "kernels/ops.h"
#include "kernels/cuda/workspace.h"

namespace reformer {

class CudaOps final : public Ops<float> {
 public:
  CudaOps();
  ~CudaOps() override;
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  const char* name() const override { return "cuda"; }

  float* alloc(int64_t n) override;
  void release(float* p) override;
  int32_t* alloc_i32(int64_t n) override;
  void release_i32(int32_t* p) override;
  void to_host(float* host, const float* src, int64_t n) override;
  void from_host(float* dst, const float* host, int64_t n) override;
  void to_host_i32(int32_t* host, const int32_t* src, int64_t n) override;
  void from_host_i32(int32_t* dst, const int32_t* host, int64_t n) override;
  void synchronize() override;
  int64_t peak_bytes() const override;

  void fill(float* x, float value, int64_t n) override;
  void copy(float* dst, const float* src, int64_t n) override;
  void add(float* out, const float* a, const float* b, int64_t n) override;
  void sub(float* out, const float* a, const float* b, int64_t n) override;
  void axpy(float* y, float a, const float* x, int64_t n) override;
  void scale(float* x, float s, int64_t n) override;
  double sum_squares(const float* x, int64_t n) override;
  void copy_2d(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
               int64_t cols) override;
  void add_2d(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
              int64_t cols) override;
  void dropout(float* x, int64_t n, float p, uint64_t seed, uint64_t step, int layer, int site,
               int64_t offset) override;

  void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* pos1,
                         const float* pos2, int64_t L, int D, int d1, int a2,
                         int64_t pos_offset) override;
  void embedding_backward(float* dwte, float* dpos1, float* dpos2, const float* dout,
                          const int32_t* tokens, int64_t L, int D, int d1, int a2,
                          int64_t pos_offset) override;

  void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                         const float* b, int64_t N, int C, float eps) override;
  void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                          const float* w, const float* mean, const float* rstd, int64_t N,
                          int C) override;

  void matmul_forward(float* out, const float* inp, const float* w, const float* bias, int64_t N,
                      int C, int OC) override;
  void matmul_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                       const float* w, int64_t N, int C, int OC) override;

  void activation_forward(float* out, const float* inp, int64_t n, Activation act) override;
  void activation_backward(float* dinp, const float* dout, const float* inp, int64_t n,
                           Activation act) override;

  void lsh_rotations(float* R, uint64_t seed, uint64_t step, int layer, int head, int n_hashes,
                     int dh, int n_buckets, int factor0) override;
  void lsh_hash(int32_t* buckets, const float* qk, int64_t ld, const float* R, int64_t L, int dh,
                int n_hashes, int n_buckets, int factor0) override;
  void lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes,
                int n_buckets) override;

  void chunked_attention_forward(float* out, float* out_r, float* lse, const float* qk,
                                 const float* v, const int32_t* perm,
                                 const AttentionParams& p) override;
  void chunked_attention_backward(float* dqk, float* dv, const float* dout, const float* qk,
                                  const float* v, const int32_t* perm, const float* out_r,
                                  const float* lse, const AttentionParams& p) override;
  void full_attention_forward(float* out, float* lse, const float* qk, const float* v,
                              const AttentionParams& p) override;
  void full_attention_backward(float* dqk, float* dv, const float* dout, const float* out,
                               const float* qk, const float* v, const float* lse,
                               const AttentionParams& p) override;

  void softmax_cross_entropy(float* loss, float* dlogits, const float* logits,
                             const int32_t* targets, int64_t N, int V, float grad_scale) override;
  void argmax_rows(int32_t* out, const float* logits, int64_t N, int V) override;

  void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                    const AdamWParams& p) override;
  void adafactor_update(float* param, const float* grad, float* m, float* vr, float* vc,
                        int64_t rows, int64_t cols, const AdafactorParams& p) override;

 private:
  // C[m, n] (column-major, ldc) = op(A) op(B) + beta C through cuBLASLt, fp32
  // in memory and accumulation, with the tensor-core math `fast`
  // (CUBLAS_COMPUTE_32F_FAST_16BF or _FAST_TF32), or plain fp32 where cuBLASLt
  // offers no such kernel for the shape (matmul.cu).
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A,
            int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
            cublasComputeType_t fast = CUBLAS_COMPUTE_32F_FAST_16BF);

  cudaStream_t stream_ = nullptr;  // the legacy default stream
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
  int32_t* host_flag_ = nullptr;   // pinned: lsh_sort's bucket-range check
  // Heuristic choices by (transa, transb, m, n, k, lda, ldb, ldc, beta != 0,
  // alignments, fast compute type).
  using GemmKey =
      std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int>;
  struct GemmChoice {
    cublasLtMatmulAlgo_t algo;
    cublasComputeType_t compute;  // the key's fast type unless none fits, then CUBLAS_COMPUTE_32F
  };
  std::map<GemmKey, GemmChoice> algo_cache_;
};

}  // namespace reformer
