// Ops<T> on the host: every method forwards to the plain C++ reference op of
// the same name in kernels/cpu/. Instantiated for float (training on CPU)
// and double (finite-difference checks).
#pragma once

#include "kernels/ops.h"

namespace reformer {

template <class T>
class CpuOps final : public Ops<T> {
 public:
  const char* name() const override { return "cpu"; }

  T* alloc(int64_t n) override;
  void release(T* p) override;
  int32_t* alloc_i32(int64_t n) override;
  void release_i32(int32_t* p) override;
  void to_host(T* host, const T* src, int64_t n) override;
  void from_host(T* dst, const T* host, int64_t n) override;
  void to_host_i32(int32_t* host, const int32_t* src, int64_t n) override;
  void from_host_i32(int32_t* dst, const int32_t* host, int64_t n) override;
  void synchronize() override {}

  void fill(T* x, T value, int64_t n) override;
  void copy(T* dst, const T* src, int64_t n) override;
  void add(T* out, const T* a, const T* b, int64_t n) override;
  void sub(T* out, const T* a, const T* b, int64_t n) override;
  void axpy(T* y, T a, const T* x, int64_t n) override;
  void scale(T* x, T s, int64_t n) override;
  double sum_squares(const T* x, int64_t n) override;
  void copy_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
               int64_t cols) override;
  void add_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
              int64_t cols) override;
  void dropout(T* x, int64_t n, float p, uint64_t seed, uint64_t step, int layer, int site,
               int64_t offset) override;

  void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* pos1,
                         const T* pos2, int64_t L, int D, int d1, int a2,
                         int64_t pos_offset) override;
  void embedding_backward(T* dwte, T* dpos1, T* dpos2, const T* dout, const int32_t* tokens,
                          int64_t L, int D, int d1, int a2, int64_t pos_offset) override;

  void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b,
                         int64_t N, int C, float eps) override;
  void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w,
                          const T* mean, const T* rstd, int64_t N, int C) override;

  void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C,
                      int OC) override;
  void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w,
                       int64_t N, int C, int OC) override;

  void activation_forward(T* out, const T* inp, int64_t n, Activation act) override;
  void activation_backward(T* dinp, const T* dout, const T* inp, int64_t n,
                           Activation act) override;

  void lsh_rotations(T* R, uint64_t seed, uint64_t step, int layer, int head, int n_hashes,
                     int dh, int n_buckets, int factor0) override;
  void lsh_hash(int32_t* buckets, const T* qk, int64_t ld, const T* R, int64_t L, int dh,
                int n_hashes, int n_buckets, int factor0) override;
  void lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes,
                int n_buckets) override;

  void chunked_attention_forward(T* out, T* out_r, T* lse, const T* qk, const T* v,
                                 const int32_t* perm, const AttentionParams& p) override;
  void chunked_attention_backward(T* dqk, T* dv, const T* dout, const T* qk, const T* v,
                                  const int32_t* perm, const T* out_r, const T* lse,
                                  const AttentionParams& p) override;
  void full_attention_forward(T* out, T* lse, const T* qk, const T* v,
                              const AttentionParams& p) override;
  void full_attention_backward(T* dqk, T* dv, const T* dout, const T* out, const T* qk,
                               const T* v, const T* lse, const AttentionParams& p) override;

  void softmax_cross_entropy(T* loss, T* dlogits, const T* logits, const int32_t* targets,
                             int64_t N, int V, T grad_scale) override;
  void argmax_rows(int32_t* out, const T* logits, int64_t N, int V) override;

  void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n,
                    const AdamWParams& p) override;
  void adafactor_update(T* param, const T* grad, T* m, T* vr, T* vc, int64_t rows,
                        int64_t cols, const AdafactorParams& p) override;
};

extern template class CpuOps<float>;
extern template class CpuOps<double>;

}  // namespace reformer
