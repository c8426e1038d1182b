// The one list of ops of the Ops<T> interface (kernels/ops.h).
//
// Each entry is X(ret, name, (parameters), (arguments)): the return type, the
// method name, its parameter list and the same names as an argument list. The
// parameters are written with T, the element type (each backend class
// defines T). From this list Ops<T> declares its pure virtual methods, each
// backend declares its overrides (REFORMER_DECLARE_OP_OVERRIDE), CpuOps
// forwards to kernels/cpu/ (cpu::name(arguments)), ProfilingOps forwards and
// times, and OpId names every op for Ops::supports(). Adding an op is one
// entry here plus one implementation per backend; the conformance suite
// (tests/gpu/conformance_*.cpp) then needs one case.
//
// Contracts of each op are written in kernels/ops.h beside the declaration
// list's section, and in kernels/cpu/<family>.h.
#pragma once

// Memory and transfers: implemented by hand in each backend (they are not
// arithmetic, so CpuOps does not forward them to kernels/cpu/).
#define REFORMER_MEMORY_OPS(X)                                                              \
  X(T*, alloc, (int64_t n), (n))                                                            \
  X(void, release, (T* p), (p))                                                             \
  X(int32_t*, alloc_i32, (int64_t n), (n))                                                  \
  X(void, release_i32, (int32_t* p), (p))                                                   \
  X(void, to_host, (T* host, const T* src, int64_t n), (host, src, n))                      \
  X(void, from_host, (T* dst, const T* host, int64_t n), (dst, host, n))                    \
  X(void, to_host_i32, (int32_t* host, const int32_t* src, int64_t n), (host, src, n))      \
  X(void, from_host_i32, (int32_t* dst, const int32_t* host, int64_t n), (dst, host, n))    \
  X(void, synchronize, (), ())

// Arithmetic: CpuOps forwards each to the function of the same name in
// kernels/cpu/ (namespace reformer::cpu).
#define REFORMER_COMPUTE_OPS(X)                                                             \
  /* elementwise */                                                                         \
  X(void, fill, (T* x, T value, int64_t n), (x, value, n))                                  \
  X(void, copy, (T* dst, const T* src, int64_t n), (dst, src, n))                           \
  X(void, add, (T* out, const T* a, const T* b, int64_t n), (out, a, b, n))                 \
  X(void, sub, (T* out, const T* a, const T* b, int64_t n), (out, a, b, n))                 \
  X(void, axpy, (T* y, T a, const T* x, int64_t n), (y, a, x, n))                           \
  X(void, scale, (T* x, T s, int64_t n), (x, s, n))                                         \
  X(double, sum_squares, (const T* x, int64_t n), (x, n))                                   \
  X(void, stash, (T* dst, const T* src, int64_t n), (dst, src, n))                          \
  X(void, unstash, (T* dst, const T* src, int64_t n), (dst, src, n))                        \
  X(void, stash_2d, (T* dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols),     \
    (dst, src, ld_src, rows, cols))                                                         \
  X(void, unstash_2d, (T* dst, int64_t ld_dst, const T* src, int64_t rows, int64_t cols),   \
    (dst, ld_dst, src, rows, cols))                                                         \
  X(void, copy_2d,                                                                          \
    (T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols),     \
    (dst, ld_dst, src, ld_src, rows, cols))                                                 \
  X(void, add_2d,                                                                           \
    (T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols),     \
    (dst, ld_dst, src, ld_src, rows, cols))                                                 \
  X(void, gather_rows,                                                                      \
    (T* dst, int64_t ld_dst, const T* src, int64_t ld_src, const int32_t* idx, int64_t rows,\
     int64_t cols, bool accumulate),                                                        \
    (dst, ld_dst, src, ld_src, idx, rows, cols, accumulate))                                \
  X(void, dropout,                                                                          \
    (T* out, const T* x, int64_t n, float p, uint64_t seed, uint64_t step, int layer,       \
     int site, int64_t offset, float alpha, bool accumulate, const T* res),                 \
    (out, x, n, p, seed, step, layer, site, offset, alpha, accumulate, res))                \
  /* embedding */                                                                           \
  X(void, embedding_forward,                                                                \
    (T* out, const int32_t* tokens, const T* wte, const T* pos1, const T* pos2, int64_t L,  \
     int D, int d1, int a2, int64_t pos_offset),                                            \
    (out, tokens, wte, pos1, pos2, L, D, d1, a2, pos_offset))                               \
  X(void, embedding_backward,                                                               \
    (T* dwte, T* dpos1, T* dpos2, const T* dout, const int32_t* tokens, int64_t L, int D,   \
     int d1, int a2, int64_t pos_offset),                                                   \
    (dwte, dpos1, dpos2, dout, tokens, L, D, d1, a2, pos_offset))                           \
  /* layernorm */                                                                           \
  X(void, layernorm_forward,                                                                \
    (T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int64_t N, int C,      \
     float eps),                                                                            \
    (out, mean, rstd, inp, w, b, N, C, eps))                                                \
  X(void, layernorm_backward,                                                               \
    (T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w, const T* mean,         \
     const T* rstd, int64_t N, int C),                                                      \
    (dinp, dw, db, dout, inp, w, mean, rstd, N, C))                                         \
  /* linear */                                                                              \
  X(void, matmul_forward,                                                                   \
    (T* out, Operand<T> inp, const T* w, const T* bias, int64_t N, int C, int OC),          \
    (out, inp, w, bias, N, C, OC))                                                          \
  X(void, matmul_backward,                                                                  \
    (T* dinp, T* dw, T* dbias, const T* dout, Operand<T> inp, const T* w, int64_t N, int C, \
     int OC, bool add_dinp),                                                                \
    (dinp, dw, dbias, dout, inp, w, N, C, OC, add_dinp))                                    \
  X(void, matmul_accumulate,                                                                \
    (T* out, Operand<T> inp, const T* w, const T* bias, int64_t N, int C, int OC,           \
     float alpha, const T* res),                                                            \
    (out, inp, w, bias, N, C, OC, alpha, res))                                              \
  /* activation */                                                                          \
  X(void, activation_forward, (T* out, const T* inp, int64_t n, Activation act),            \
    (out, inp, n, act))                                                                     \
  X(void, activation_backward,                                                              \
    (T* dinp, const T* dout, const T* inp, int64_t n, Activation act),                      \
    (dinp, dout, inp, n, act))                                                              \
  /* LayerNorm and the projections that read it */                                          \
  X(void, layernorm_project_forward,                                                        \
    (T* out1, T* out2, T* ln, T* mean, T* rstd, const T* inp, const T* ln_w, const T* ln_b, \
     const T* w1, const T* w2, int64_t N, int C, int OC, float eps, bool out_bf16),         \
    (out1, out2, ln, mean, rstd, inp, ln_w, ln_b, w1, w2, N, C, OC, eps, out_bf16))         \
  X(void, layernorm_project_backward,                                                       \
    (T* dinp, T* dln_w, T* dln_b, T* dw1, T* dw2, Operand<T> dout1, Operand<T> dout2, T* ln,\
     T* dln, T* mean, T* rstd, const T* inp, const T* ln_w, const T* ln_b, const T* w1,     \
     const T* w2, int64_t N, int C, int OC, float eps),                                     \
    (dinp, dln_w, dln_b, dw1, dw2, dout1, dout2, ln, dln, mean, rstd, inp, ln_w, ln_b, w1,  \
     w2, N, C, OC, eps))                                                                    \
  /* feed-forward block */                                                                   \
  X(void, ffn_forward,                                                                      \
    (T* out, T* h, T* a, const T* inp, const T* w1, const T* b1, const T* w2, const T* b2,  \
     int64_t N, int C, int F, Activation act, float alpha, bool accumulate, const T* res),  \
    (out, h, a, inp, w1, b1, w2, b2, N, C, F, act, alpha, accumulate, res))                 \
  X(void, ffn_backward,                                                                     \
    (T* dinp, T* dw1, T* db1, T* dw2, T* db2, const T* dout, const T* inp, T* h, T* a,      \
     const T* w1, const T* w2, int64_t N, int C, int F, Activation act),                    \
    (dinp, dw1, db1, dw2, db2, dout, inp, h, a, w1, w2, N, C, F, act))                      \
  X(void, ffn_rebuild, (T* a, const T* h, int64_t N, int C, int F, Activation act),          \
    (a, h, N, C, F, act))                                                                   \
  X(void, layernorm_ffn_rows,                                                               \
    (T* ln, T* mean, T* rstd, const T* inp, const T* ln_w, const T* ln_b, int64_t N, int C, \
     int F, float eps),                                                                     \
    (ln, mean, rstd, inp, ln_w, ln_b, N, C, F, eps))                                        \
  X(void, layernorm_ffn_forward,                                                            \
    (T* out, T* h, T* a, T* ln, T* mean, T* rstd, const T* inp, const T* ln_w,              \
     const T* ln_b, const T* w1, const T* b1, const T* w2, const T* b2, int64_t N, int C,   \
     int F, Activation act, float eps, float alpha, bool accumulate, const T* res),         \
    (out, h, a, ln, mean, rstd, inp, ln_w, ln_b, w1, b1, w2, b2, N, C, F, act, eps, alpha,  \
     accumulate, res))                                                                      \
  X(void, layernorm_ffn_backward,                                                           \
    (T* dinp, T* dln_w, T* dln_b, T* dw1, T* db1, T* dw2, T* db2, const T* dout, T* ln,     \
     T* dln, T* h, T* a, const T* inp, const T* ln_w, const T* mean, const T* rstd,         \
     const T* w1, const T* w2, int64_t N, int C, int F, Activation act),                    \
    (dinp, dln_w, dln_b, dw1, db1, dw2, db2, dout, ln, dln, h, a, inp, ln_w, mean, rstd,    \
     w1, w2, N, C, F, act))                                                                 \
  /* LSH */                                                                                 \
  X(void, lsh_rotations,                                                                    \
    (T* R, uint64_t seed, uint64_t step, int layer, int head, int n_hashes, int dh,         \
     int n_buckets, int factor0),                                                           \
    (R, seed, step, layer, head, n_hashes, dh, n_buckets, factor0))                         \
  X(void, lsh_hash,                                                                         \
    (int32_t* buckets, Operand<T> qk, int64_t ld, const T* R, int64_t L, int dh,            \
     int n_hashes, int n_buckets, int factor0, int heads),                                  \
    (buckets, qk, ld, R, L, dh, n_hashes, n_buckets, factor0, heads))                       \
  X(void, lsh_sort,                                                                         \
    (int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes, int n_buckets),        \
    (perm, buckets, L, n_hashes, n_buckets))                                                \
  X(void, lsh_pack_buckets,                                                                 \
    (int32_t* packed, const int32_t* buckets, int64_t n, int n_buckets),                    \
    (packed, buckets, n, n_buckets))                                                        \
  X(void, lsh_unpack_buckets, (int32_t* buckets, const int32_t* packed, int64_t n),         \
    (buckets, packed, n))                                                                   \
  X(void, lsh_decode_keys,                                                                  \
    (int32_t* keys, int32_t* sets, int32_t* history, const int32_t* buckets,                \
     int64_t bucket_stride, int units, int64_t capacity, int64_t pos),                      \
    (keys, sets, history, buckets, bucket_stride, units, capacity, pos))                    \
  /* sequence-parallel routing */                                                           \
  X(void, bucket_histogram,                                                                 \
    (int32_t* hist, const int32_t* buckets, int64_t L, int n_hashes, int n_buckets),        \
    (hist, buckets, L, n_hashes, n_buckets))                                                \
  X(void, sort_route,                                                                       \
    (int32_t* send, int32_t* back, const int32_t* order, const int32_t* buckets,            \
     const int32_t* delta, const SortRouteParams& p),                                       \
    (send, back, order, buckets, delta, p))                                                 \
  X(void, invert_index, (int32_t* dst, const int32_t* src, int64_t n), (dst, src, n))       \
  /* attention */                                                                           \
  X(void, chunked_attention_forward,                                                        \
    (T* out, T* out_r, T* lse, const T* qk, const T* v, const int32_t* perm,                \
     const AttentionParams& p),                                                             \
    (out, out_r, lse, qk, v, perm, p))                                                      \
  X(void, chunked_attention_backward,                                                       \
    (T* dqk, T* dv, const T* dout, const T* qk, const T* v, const int32_t* perm,            \
     const T* out, int64_t ld_out, const T* lse, const AttentionParams& p),                 \
    (dqk, dv, dout, qk, v, perm, out, ld_out, lse, p))                                      \
  X(void, combine_rounds,                                                                   \
    (T* out, T* w, const T* out_r, const T* lse, int n_rounds, int64_t L, int dh,           \
     int64_t ld),                                                                           \
    (out, w, out_r, lse, n_rounds, L, dh, ld))                                              \
  X(void, fold_round,                                                                       \
    (T* out, const T* out_r, const T* lse, int r, int64_t L, int dh, int64_t ld),           \
    (out, out_r, lse, r, L, dh, ld))                                                        \
  X(void, full_attention_forward,                                                           \
    (T* out, T* lse, const T* qk, const T* v, const AttentionParams& p),                    \
    (out, lse, qk, v, p))                                                                   \
  X(void, full_attention_backward,                                                          \
    (T* dqk, T* dv, const T* dout, const T* out, const T* qk, const T* v, const T* lse,     \
     const AttentionParams& p),                                                             \
    (dqk, dv, dout, out, qk, v, lse, p))                                                    \
  X(void, decode_attention,                                                                 \
    (T* out, const T* q, const T* k, const T* v, const int32_t* sets, const int32_t* keys,  \
     const DecodeAttentionParams& p),                                                       \
    (out, q, k, v, sets, keys, p))                                                          \
  X(void, lse_combine_forward,                                                              \
    (T* out, T* w, const T* parts, const T* lse, const LseCombineParams& p),                \
    (out, w, parts, lse, p))                                                                \
  X(void, lse_combine_backward,                                                             \
    (T* dparts, const T* dout, const T* w, const LseCombineParams& p),                      \
    (dparts, dout, w, p))                                                                   \
  /* loss */                                                                                \
  X(void, softmax_cross_entropy,                                                            \
    (T* loss, T* dlogits, const T* logits, const int32_t* targets, int64_t N, int V,        \
     T grad_scale),                                                                         \
    (loss, dlogits, logits, targets, N, V, grad_scale))                                     \
  X(void, argmax_rows, (int32_t* out, const T* logits, int64_t N, int V),                   \
    (out, logits, N, V))                                                                    \
  /* optimizers */                                                                          \
  X(void, adamw_update, (T* param, const T* grad, T* m, T* v, int64_t n,                    \
                         const AdamWParams& p),                                             \
    (param, grad, m, v, n, p))                                                              \
  X(void, adafactor_update,                                                                 \
    (T* param, const T* grad, T* m, T* vr, T* vc, int64_t rows, int64_t cols,               \
     const AdafactorParams& p),                                                             \
    (param, grad, m, vr, vc, rows, cols, p))

// Every op of the interface.
#define REFORMER_OPS(X) REFORMER_MEMORY_OPS(X) REFORMER_COMPUTE_OPS(X)

// In a backend class body (with T defined): `ret name(params) override;`.
#define REFORMER_DECLARE_OP_OVERRIDE(ret, name, params, args) ret name params override;

namespace reformer {

// One id per op, in list order, for Ops::supports() and per-op tables.
enum class OpId {
#define REFORMER_OP_ID(ret, name, params, args) name,
  REFORMER_OPS(REFORMER_OP_ID)
#undef REFORMER_OP_ID
  count
};

inline constexpr int kOpCount = int(OpId::count);

// The op's method name ("matmul_forward").
inline const char* op_name(OpId id) {
  static constexpr const char* names[] = {
#define REFORMER_OP_NAME(ret, name, params, args) #name,
      REFORMER_OPS(REFORMER_OP_NAME)
#undef REFORMER_OP_NAME
  };
  return names[int(id)];
}

}  // namespace reformer
