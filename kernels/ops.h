// The op interface the framework computes through.
//
// Layers never loop over elements themselves: every piece of arithmetic is
// one call on an Ops<T>. The CPU implementation (kernels/cpu/cpu_ops.h) is
// the plain C++ reference and test oracle, instantiated for float and for
// double (the double instance drives finite-difference checks); a CUDA
// implementation of Ops<float> sits beside it with the same list.
//
// Pointers are in the implementation's memory space (host for CPU, device for
// CUDA); obtain them through alloc(). Shapes are row-major; "[N, C]" means N
// rows of C contiguous elements.
//
// Gradient contract: every *_backward ACCUMULATES (+=) into each gradient it
// writes, activations and parameters alike; a null gradient pointer means
// "not needed" and is skipped. softmax_cross_entropy, which starts the
// backward pass, is the one exception (it overwrites dlogits).
#pragma once

#include <cstdint>
#include <utility>

#include "kernels/common/params.h"

namespace reformer {

template <class T>
class Ops {
 public:
  virtual ~Ops() = default;
  virtual const char* name() const = 0;

  // ---------------------------------------------------------------- memory
  virtual T* alloc(int64_t n) = 0;  // n elements, uninitialised
  virtual void release(T* p) = 0;
  virtual int32_t* alloc_i32(int64_t n) = 0;
  virtual void release_i32(int32_t* p) = 0;
  virtual void to_host(T* host, const T* src, int64_t n) = 0;
  virtual void from_host(T* dst, const T* host, int64_t n) = 0;
  virtual void to_host_i32(int32_t* host, const int32_t* src, int64_t n) = 0;
  virtual void from_host_i32(int32_t* dst, const int32_t* host, int64_t n) = 0;
  virtual void synchronize() = 0;  // all issued work is done
  // Most bytes this Ops has held allocated at once; -1 where not tracked.
  virtual int64_t peak_bytes() const { return -1; }

  // ---------------------------------------------------------------- elementwise
  virtual void fill(T* x, T value, int64_t n) = 0;
  virtual void copy(T* dst, const T* src, int64_t n) = 0;
  virtual void add(T* out, const T* a, const T* b, int64_t n) = 0;  // out = a + b (may alias)
  virtual void sub(T* out, const T* a, const T* b, int64_t n) = 0;  // out = a - b (may alias)
  virtual void axpy(T* y, T a, const T* x, int64_t n) = 0;          // y += a * x
  virtual void scale(T* x, T s, int64_t n) = 0;                     // x *= s
  virtual double sum_squares(const T* x, int64_t n) = 0;            // sum x^2, accumulated in double
  // dst[r, :cols] = src[r, :cols] for r < rows; row strides ld_dst, ld_src.
  virtual void copy_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                       int64_t cols) = 0;
  // dst[r, :cols] += src[r, :cols].
  virtual void add_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                      int64_t cols) = 0;
  // x[i] = keep_i ? x[i] / (1 - p) : 0, keep_i drawn from the counter RNG
  // keyed by (seed, step, layer, site) at element offset + i. Applying it to a
  // gradient with the same key is its backward.
  virtual void dropout(T* x, int64_t n, float p, uint64_t seed, uint64_t step, int layer,
                       int site, int64_t offset) = 0;

  // ---------------------------------------------------------------- embedding
  // out[L, D] = wte[tokens[i]] + concat(pos1[p / a2], pos2[p % a2]), p = pos_offset + i.
  // wte [V, D], pos1 [a1, d1], pos2 [a2, D - d1].
  virtual void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* pos1,
                                 const T* pos2, int64_t L, int D, int d1, int a2,
                                 int64_t pos_offset) = 0;
  virtual void embedding_backward(T* dwte, T* dpos1, T* dpos2, const T* dout,
                                  const int32_t* tokens, int64_t L, int D, int d1, int a2,
                                  int64_t pos_offset) = 0;

  // ---------------------------------------------------------------- layernorm
  // out[N, C] = (inp - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps);
  // mean[N], rstd[N] are saved for the backward.
  virtual void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w,
                                 const T* b, int64_t N, int C, float eps) = 0;
  virtual void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp,
                                  const T* w, const T* mean, const T* rstd, int64_t N,
                                  int C) = 0;

  // ---------------------------------------------------------------- linear
  // out[N, OC] = inp[N, C] @ w[C, OC] (+ bias[OC] when bias is non-null).
  virtual void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C,
                              int OC) = 0;
  // dinp += dout @ w^T; dw += inp^T @ dout; dbias += column sums of dout.
  virtual void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp,
                               const T* w, int64_t N, int C, int OC) = 0;

  // ---------------------------------------------------------------- activation
  virtual void activation_forward(T* out, const T* inp, int64_t n, Activation act) = 0;
  virtual void activation_backward(T* dinp, const T* dout, const T* inp, int64_t n,
                                   Activation act) = 0;

  // ---------------------------------------------------------------- LSH
  // factor0: 0 hashes into n_buckets with one rotation block per round;
  // otherwise n_buckets = factor0 * factor1 (both even) with one block per
  // factor (kernels/common/params.h, rotation_cols). cols below is
  // rotation_cols(n_buckets, factor0).
  // R [n_hashes, dh, cols] ~ N(0, 1) from the stream keyed by
  // (seed, step, layer, head); round r uses R + r * dh * cols.
  virtual void lsh_rotations(T* R, uint64_t seed, uint64_t step, int layer, int head,
                             int n_hashes, int dh, int n_buckets, int factor0) = 0;
  // y = x_i R_r, x_i = qk[i * ld .. + dh]. factor0 == 0:
  // buckets[r, i] = argmax(concat(y, -y)); otherwise b0 + factor0 * b1 with
  // b0 = argmax(concat(y0, -y0)), y0 = y[0, factor0/2), b1 likewise over the
  // rest of y. Ties go to the lowest index.
  virtual void lsh_hash(int32_t* buckets, const T* qk, int64_t ld, const T* R, int64_t L, int dh,
                        int n_hashes, int n_buckets, int factor0) = 0;
  // perm[r, s] = position at slot s when round r is sorted by (bucket, position).
  virtual void lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes,
                        int n_buckets) = 0;

  // ---------------------------------------------------------------- attention
  // Chunked attention over permuted positions (LSH, and local with the identity
  // permutation). qk, v, out: [L, ld] slices of one head. Keys are qk rows
  // normalised to unit length; logits q . k_hat, masked per AttentionParams.
  // Writes out; saves out_r [n_rounds, L, dh] and lse [n_rounds, L] (by
  // position) for the backward. Rounds combine by their log-sum-exp.
  virtual void chunked_attention_forward(T* out, T* out_r, T* lse, const T* qk, const T* v,
                                         const int32_t* perm, const AttentionParams& p) = 0;
  virtual void chunked_attention_backward(T* dqk, T* dv, const T* dout, const T* qk, const T* v,
                                          const int32_t* perm, const T* out_r, const T* lse,
                                          const AttentionParams& p) = 0;
  // Exact causal attention with the same scoring and masks (p.n_rounds, p.chunk
  // and the chunk fields are ignored). lse [L] saved for the backward.
  virtual void full_attention_forward(T* out, T* lse, const T* qk, const T* v,
                                      const AttentionParams& p) = 0;
  virtual void full_attention_backward(T* dqk, T* dv, const T* dout, const T* out, const T* qk,
                                       const T* v, const T* lse, const AttentionParams& p) = 0;

  // ---------------------------------------------------------------- loss
  // loss[n] = logsumexp(logits[n, :]) - logits[n, targets[n]], 0 where targets[n] < 0.
  // When dlogits is non-null it is OVERWRITTEN with
  // (softmax(logits[n]) - onehot(targets[n])) * grad_scale (0 rows where
  // targets[n] < 0); dlogits may alias logits.
  virtual void softmax_cross_entropy(T* loss, T* dlogits, const T* logits,
                                     const int32_t* targets, int64_t N, int V,
                                     T grad_scale) = 0;
  // out[n] = argmax_v logits[n, v] (lowest index on ties).
  virtual void argmax_rows(int32_t* out, const T* logits, int64_t N, int V) = 0;

  // ---------------------------------------------------------------- optimizers
  virtual void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n,
                            const AdamWParams& p) = 0;
  // One tensor viewed as [rows, cols]. Factored (vr [rows], vc [cols]) when
  // rows > 1 and cols > 1; otherwise vr holds the full second moment [n] and vc
  // is unused. m [rows * cols] is used only when p.beta1 > 0.
  virtual void adafactor_update(T* param, const T* grad, T* m, T* vr, T* vc, int64_t rows,
                                int64_t cols, const AdafactorParams& p) = 0;
};

// Owns n elements allocated through an Ops.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Ops<T>& ops, int64_t n) : ops_(&ops), n_(n), p_(n > 0 ? ops.alloc(n) : nullptr) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept { swap(o); return *this; }
  ~Buffer() { if (p_) ops_->release(p_); }
  T* data() { return p_; }
  const T* data() const { return p_; }
  int64_t size() const { return n_; }
 private:
  void swap(Buffer& o) { std::swap(ops_, o.ops_); std::swap(n_, o.n_); std::swap(p_, o.p_); }
  Ops<T>* ops_ = nullptr;
  int64_t n_ = 0;
  T* p_ = nullptr;
};

// Owns n int32 elements allocated through an Ops.
template <class T>
class IntBuffer {
 public:
  IntBuffer() = default;
  IntBuffer(Ops<T>& ops, int64_t n) : ops_(&ops), n_(n), p_(n > 0 ? ops.alloc_i32(n) : nullptr) {}
  IntBuffer(const IntBuffer&) = delete;
  IntBuffer& operator=(const IntBuffer&) = delete;
  IntBuffer(IntBuffer&& o) noexcept { swap(o); }
  IntBuffer& operator=(IntBuffer&& o) noexcept { swap(o); return *this; }
  ~IntBuffer() { if (p_) ops_->release_i32(p_); }
  int32_t* data() { return p_; }
  const int32_t* data() const { return p_; }
  int64_t size() const { return n_; }
 private:
  void swap(IntBuffer& o) { std::swap(ops_, o.ops_); std::swap(n_, o.n_); std::swap(p_, o.p_); }
  Ops<T>* ops_ = nullptr;
  int64_t n_ = 0;
  int32_t* p_ = nullptr;
};

}  // namespace reformer
