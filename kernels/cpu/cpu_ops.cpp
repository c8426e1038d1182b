#include "kernels/cpu/cpu_ops.h"

#include <cstring>

#include "kernels/cpu/activation.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/lsh.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/optimizer.h"

namespace reformer {

template <class T> T* CpuOps<T>::alloc(int64_t n) { return new T[size_t(n)]; }
template <class T> void CpuOps<T>::release(T* p) { delete[] p; }
template <class T> int32_t* CpuOps<T>::alloc_i32(int64_t n) { return new int32_t[size_t(n)]; }
template <class T> void CpuOps<T>::release_i32(int32_t* p) { delete[] p; }
template <class T> void CpuOps<T>::to_host(T* host, const T* src, int64_t n) {
  if (n > 0) std::memcpy(host, src, sizeof(T) * size_t(n));
}
template <class T> void CpuOps<T>::from_host(T* dst, const T* host, int64_t n) {
  if (n > 0) std::memcpy(dst, host, sizeof(T) * size_t(n));
}
template <class T> void CpuOps<T>::to_host_i32(int32_t* host, const int32_t* src, int64_t n) {
  if (n > 0) std::memcpy(host, src, sizeof(int32_t) * size_t(n));
}
template <class T> void CpuOps<T>::from_host_i32(int32_t* dst, const int32_t* host, int64_t n) {
  if (n > 0) std::memcpy(dst, host, sizeof(int32_t) * size_t(n));
}

template <class T> void CpuOps<T>::fill(T* x, T value, int64_t n) { cpu::fill(x, value, n); }
template <class T> void CpuOps<T>::copy(T* dst, const T* src, int64_t n) { cpu::copy(dst, src, n); }
template <class T> void CpuOps<T>::add(T* out, const T* a, const T* b, int64_t n) {
  cpu::add(out, a, b, n);
}
template <class T> void CpuOps<T>::sub(T* out, const T* a, const T* b, int64_t n) {
  cpu::sub(out, a, b, n);
}
template <class T> void CpuOps<T>::axpy(T* y, T a, const T* x, int64_t n) { cpu::axpy(y, a, x, n); }
template <class T> void CpuOps<T>::scale(T* x, T s, int64_t n) { cpu::scale(x, s, n); }
template <class T> double CpuOps<T>::sum_squares(const T* x, int64_t n) {
  return cpu::sum_squares(x, n);
}
template <class T>
void CpuOps<T>::copy_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                        int64_t cols) {
  cpu::copy_2d(dst, ld_dst, src, ld_src, rows, cols);
}
template <class T>
void CpuOps<T>::add_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                       int64_t cols) {
  cpu::add_2d(dst, ld_dst, src, ld_src, rows, cols);
}
template <class T>
void CpuOps<T>::dropout(T* x, int64_t n, float p, uint64_t seed, uint64_t step, int layer,
                        int site, int64_t offset) {
  cpu::dropout(x, n, p, seed, step, layer, site, offset);
}

template <class T>
void CpuOps<T>::embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* pos1,
                                  const T* pos2, int64_t L, int D, int d1, int a2,
                                  int64_t pos_offset) {
  cpu::embedding_forward(out, tokens, wte, pos1, pos2, L, D, d1, a2, pos_offset);
}
template <class T>
void CpuOps<T>::embedding_backward(T* dwte, T* dpos1, T* dpos2, const T* dout,
                                   const int32_t* tokens, int64_t L, int D, int d1, int a2,
                                   int64_t pos_offset) {
  cpu::embedding_backward(dwte, dpos1, dpos2, dout, tokens, L, D, d1, a2, pos_offset);
}

template <class T>
void CpuOps<T>::layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w,
                                  const T* b, int64_t N, int C, float eps) {
  cpu::layernorm_forward(out, mean, rstd, inp, w, b, N, C, eps);
}
template <class T>
void CpuOps<T>::layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp,
                                   const T* w, const T* mean, const T* rstd, int64_t N, int C) {
  cpu::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
}

template <class T>
void CpuOps<T>::matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C,
                               int OC) {
  cpu::matmul_forward(out, inp, w, bias, N, C, OC);
}
template <class T>
void CpuOps<T>::matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp,
                                const T* w, int64_t N, int C, int OC) {
  cpu::matmul_backward(dinp, dw, dbias, dout, inp, w, N, C, OC);
}

template <class T>
void CpuOps<T>::activation_forward(T* out, const T* inp, int64_t n, Activation act) {
  cpu::activation_forward(out, inp, n, act);
}
template <class T>
void CpuOps<T>::activation_backward(T* dinp, const T* dout, const T* inp, int64_t n,
                                    Activation act) {
  cpu::activation_backward(dinp, dout, inp, n, act);
}

template <class T>
void CpuOps<T>::lsh_rotations(T* R, uint64_t seed, uint64_t step, int layer, int head,
                              int n_hashes, int dh, int n_buckets, int factor0) {
  cpu::lsh_rotations(R, seed, step, layer, head, n_hashes, dh, n_buckets, factor0);
}
template <class T>
void CpuOps<T>::lsh_hash(int32_t* buckets, const T* qk, int64_t ld, const T* R, int64_t L, int dh,
                         int n_hashes, int n_buckets, int factor0) {
  cpu::lsh_hash(buckets, qk, ld, R, L, dh, n_hashes, n_buckets, factor0);
}
template <class T>
void CpuOps<T>::lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes,
                         int n_buckets) {
  cpu::lsh_sort(perm, buckets, L, n_hashes, n_buckets);
}

template <class T>
void CpuOps<T>::chunked_attention_forward(T* out, T* out_r, T* lse, const T* qk, const T* v,
                                          const int32_t* perm, const AttentionParams& p) {
  cpu::chunked_attention_forward(out, out_r, lse, qk, v, perm, p);
}
template <class T>
void CpuOps<T>::chunked_attention_backward(T* dqk, T* dv, const T* dout, const T* qk, const T* v,
                                           const int32_t* perm, const T* out_r, const T* lse,
                                           const AttentionParams& p) {
  cpu::chunked_attention_backward(dqk, dv, dout, qk, v, perm, out_r, lse, p);
}
template <class T>
void CpuOps<T>::full_attention_forward(T* out, T* lse, const T* qk, const T* v,
                                       const AttentionParams& p) {
  cpu::full_attention_forward(out, lse, qk, v, p);
}
template <class T>
void CpuOps<T>::full_attention_backward(T* dqk, T* dv, const T* dout, const T* out, const T* qk,
                                        const T* v, const T* lse, const AttentionParams& p) {
  cpu::full_attention_backward(dqk, dv, dout, out, qk, v, lse, p);
}

template <class T>
void CpuOps<T>::softmax_cross_entropy(T* loss, T* dlogits, const T* logits,
                                      const int32_t* targets, int64_t N, int V, T grad_scale) {
  cpu::softmax_cross_entropy(loss, dlogits, logits, targets, N, V, grad_scale);
}
template <class T>
void CpuOps<T>::argmax_rows(int32_t* out, const T* logits, int64_t N, int V) {
  cpu::argmax_rows(out, logits, N, V);
}

template <class T>
void CpuOps<T>::adamw_update(T* param, const T* grad, T* m, T* v, int64_t n,
                             const AdamWParams& p) {
  cpu::adamw_update(param, grad, m, v, n, p);
}
template <class T>
void CpuOps<T>::adafactor_update(T* param, const T* grad, T* m, T* vr, T* vc, int64_t rows,
                                 int64_t cols, const AdafactorParams& p) {
  cpu::adafactor_update(param, grad, m, vr, vc, rows, cols, p);
}

template class CpuOps<float>;
template class CpuOps<double>;

}  // namespace reformer
