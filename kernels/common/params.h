// Parameter structs shared by the CPU and CUDA twins of each op.
#pragma once

#include <cstdint>

#ifndef REFORMER_HD  // as in kernels/common/philox.h
#if defined(__CUDACC__)
#define REFORMER_HD __host__ __device__ __forceinline__
#else
#define REFORMER_HD inline
#endif
#endif

namespace reformer {

enum class Activation { gelu, relu };

// Floats per row of the feed-forward block's state between ffn_forward and
// ffn_backward (Ops::ffn_state_cols, kernels/ops.h): in h, what the
// activation is rebuilt from (Ops::ffn_rebuild); in a, the activation. 0:
// that buffer holds no state (scratch of F floats a row to each call).
struct FfnStateCols {
  int64_t h = 0, a = 0;
};

// Masked scores are set (not added) to these values, as in trax and HF.
constexpr double kCausalMaskValue = -1e9;  // key position > query position
constexpr double kSelfMaskValue = -1e5;    // a query's own position
// Keys are k / sqrt(|k|^2 + kKeyNormEps): a zero key stays finite.
constexpr double kKeyNormEps = 1e-12;

// LSH rotation columns per hash round. factor0 == 0: one block of
// n_buckets/2 columns, bucket = argmax(concat(y, -y)). Otherwise the buckets
// factor as n_buckets = factor0 * factor1 (HF / trax): two blocks of
// factor0/2 and factor1/2 columns, factor 0's first; bucket = b0 + factor0 * b1
// with b_i = argmax(concat(y_i, -y_i)) over block i.
REFORMER_HD int rotation_cols(int n_buckets, int factor0) {
  return factor0 == 0 ? n_buckets / 2 : factor0 / 2 + (n_buckets / factor0) / 2;
}

// The hash's operands: the rotations (as drawn) and the hashed vectors (as
// hashed) are rounded to bf16, round to nearest even, on every device, and
// y = x R sums the exact products in the op's type. The CUDA hash then runs
// one bf16 tensor-core product per 16 columns (fp32 sums, in another order,
// so only exact near-ties can differ) instead of TF32's two, and the bucket
// of a vector does not change under rounding that bf16 does not see. LSH
// only needs a random projection: rounding the rotations draws another one
// from nearly the same distribution. NaN and infinities pass unchanged.
REFORMER_HD float lsh_round(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
#endif
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float r;
  __builtin_memcpy(&r, &u, sizeof r);
  return r;
#endif
}

// Arithmetic of the CUDA attention kernels. fp32: scores, softmax and sums
// in fp32 on CUDA cores. bf16: q, k_hat, v, dout and the probabilities are
// rounded to bf16 for tensor-core products with fp32 accumulation; softmax,
// lse and every saved or returned tensor stay fp32. The CPU ops ignore it
// (they compute in their own type T and are the reference).
enum class AttentionPrecision { fp32, bf16 };

// One attention call over one head of one sequence.
// Positions are first permuted by `perm` (one order per round), cut into
// chunks of `chunk` sorted slots; each chunk attends to itself,
// `chunks_before` previous and `chunks_after` following chunks of the same
// round (wrapping around the round when `wrap`), then masks apply by the
// original positions.
struct AttentionParams {
  int64_t L = 0;          // positions in the sequence
  int dh = 0;             // head width
  int64_t ld = 0;         // row stride (elements) of qk, v, out and their gradients; >= dh
  int n_rounds = 1;       // hash rounds; each has its own order in perm
  int chunk = 0;          // sorted slots per chunk; L % chunk == 0
  int chunks_before = 1;  // previous chunks each chunk also sees
  int chunks_after = 0;   // following chunks each chunk also sees
  bool wrap = true;       // look-back of chunk 0 wraps to the round's last chunk(s)
  bool causal = true;     // mask keys whose position is after the query's
  AttentionPrecision precision = AttentionPrecision::bf16;  // CUDA arithmetic (see above)
  // Backward: add the gradients into dqk, dv (the ops' contract), or, when
  // false, write them (the [L, dh] slices' old values are not read).
  bool accumulate = true;
  // Several rounds held one at a time (kernels/ops.h): the forward's out_r
  // is one round's [L, dh], each round folded into out (fold_round) as it
  // comes; the backward adds each round's share of the gradients in turn.
  bool fold_rounds = false;
  // A chunked call's operands as the backend stages them, kept from a
  // forward to the backward of the same head (Ops::attention_kept_elems
  // elements; null: none). A forward that is given it leaves its staged
  // q, k_hat, v there, and the backward given the same buffer reads them
  // instead of staging them again (the same values, so the same results)
  // and reads neither qk nor v: they need not be kept, and may hold
  // anything by then. Ignored where the backend keeps nothing (the CPU,
  // fp32 attention; the backward then reads the forward's qk and v) and
  // with fold_rounds.
  void* kept = nullptr;
  // The output `out` in bf16 (round to nearest even), two values to a
  // float of its buffer, row i's at bf16 element i * ld (a backward's
  // i * ld_out): a forward writes it so, a backward reads it so (Operand
  // for the products that read it next). For a backend that attends in
  // bf16 and rounds `out` to bf16 wherever it reads it
  // (Ops::attention_output_bf16), so that the results are the same bits as
  // with fp32 `out`. Chunked calls that keep their rounds themselves only
  // (no out_r, no fold_rounds); elsewhere ShapeError.
  bool out_bf16 = false;
  // A backward's gradients dqk and dv in bf16 (round to nearest even), two
  // values to a float of their buffers, row i's at bf16 element
  // i * ld_grad of each: written so (accumulate false) for the products
  // that read them next (Operand with that row stride), as the same bits
  // as fp32 gradients which the products round to bf16. For a backend that
  // attends in bf16 (Ops::attention_output_bf16) and sums a call's rounds
  // itself: chunked calls of several rounds, no fold_rounds; elsewhere
  // ShapeError.
  bool grad_bf16 = false;
  int64_t ld_grad = 0;
  // The inputs qk and v in bf16, two values to a float of their buffers,
  // row i's at bf16 element i * ld (layernorm_project_forward's out_bf16
  // rows): read so, as the same values as fp32 inputs that this backend
  // rounds to bf16 before any arithmetic. For a backend that attends in
  // bf16 (Ops::attention_output_bf16): chunked calls, no fold_rounds, and
  // backward calls of several rounds; elsewhere ShapeError.
  bool in_bf16 = false;
};

// An input of a product that may be held in bf16 (AttentionParams::
// out_bf16's outputs, grad_bf16's gradients): p points at bf16 values, two
// to a T, where bf16 is set (only a backend with
// Ops::attention_output_bf16 takes them; the others throw ShapeError),
// else at T values. ld: its row stride in its own values (bf16 or T), 0
// for rows as wide as the product's input (only the products that say so
// take another). Built from a plain pointer.
template <class T>
struct Operand {
  const T* p = nullptr;
  bool bf16 = false;
  int64_t ld = 0;
  Operand(const T* values) : p(values) {}  // NOLINT: implicit, as the plain pointer it replaces
  Operand(const T* values, bool in_bf16, int64_t row_stride = 0)
      : p(values), bf16(in_bf16), ld(row_stride) {}
  // Whether its rows are dense at width C (ld 0 or C).
  bool dense(int64_t C) const { return ld == 0 || ld == C; }
};

// Bytes of AttentionParams::kept for the CUDA tensor-core attention over L
// positions of width dh: q, k_hat and v staged in bf16 [3, L, DH] (DH = dh
// padded to 32, 64 or 128) and |k| [L] in fp32 (kernels/cuda/
// attention_common.cuh, kept_norm).
inline int64_t attention_kept_bytes(int64_t L, int dh) {
  const int64_t DH = dh <= 32 ? 32 : dh <= 64 ? 64 : 128;
  return 3 * L * DH * 2 + 4 * L;
}

// One decoding step of attention (kernels/ops.h, decode_attention): per head,
// one query against `rounds` sets of earlier positions gathered from a
// key/value cache, each set a softmax of its own, the sets combined by their
// log-sum-exp. Set u = h * rounds + r of head h is
// keys[sets[2u] .. sets[2u] + sets[2u + 1]), positions (cache rows).
struct DecodeAttentionParams {
  int heads = 0;       // heads of the query; q and out are [heads * dh]
  int rounds = 1;      // key sets per head (hash rounds; 1 for full and local)
  int dh = 0;          // head width
  int64_t ld = 0;      // row stride (elements) of the k and v caches: head h
                       // of position j at j * ld + h * dh; ld >= heads * dh
  int64_t q_pos = 0;   // the query's position (self and causal masks)
  bool causal = true;  // mask keys whose position is after q_pos
};

// Outputs of one head computed in parts (hash rounds on different ranks),
// combined row by row by their log-sum-exps (kernels/ops.h, lse_combine_*).
// Row n holds `parts` outputs of width dh side by side in `parts` and, per
// part, `rounds` log-sum-exps side by side in `lse` (part k's at columns
// k * rounds ..); a part's weight is the sum of exp(lse - logsumexp) over its
// rounds.
struct LseCombineParams {
  int64_t N = 0;         // rows
  int parts = 1;         // outputs combined per row
  int rounds = 1;        // log-sum-exps per part
  int dh = 0;            // width of a part and of the combined output
  int64_t ld_parts = 0;  // row stride of parts and dparts (part k at column k * dh)
  int64_t ld_lse = 0;    // row stride of lse; >= parts * rounds
  int64_t ld_out = 0;    // row stride of out and dout; >= dh
  bool accumulate = true;  // lse_combine_backward: dparts += (true) or = (false)
};

// One hash round of the distributed bucket sort (framework/sorted_attention.h,
// kernels/ops.h sort_route): a sequence of sp * L positions is split over sp
// ranks of L consecutive positions each; in the sorted order (by bucket,
// then position) rank k owns global slots [k L, k L + L) and also sees
// `left_rows` slots before them and `right_rows` after them (its halos; none
// past the ends when !wrap). A rank's local slot order is [left halo | own
// slots | right halo].
struct SortRouteParams {
  int64_t L = 0;           // positions per rank
  int sp = 2;              // ranks; >= 2
  int me = 0;              // this rank
  int64_t left_rows = 0;   // look-back halo (chunks_before * chunk)
  int64_t right_rows = 0;  // look-ahead halo (chunks_after * chunk)
  bool wrap = true;        // the halos of the first and last rank wrap around
  int64_t capacity = 0;    // entries the send arrays hold
  // Halo rows rank k holds on each side.
  REFORMER_HD int64_t left(int k) const { return wrap || k > 0 ? left_rows : 0; }
  REFORMER_HD int64_t right(int k) const { return wrap || k < sp - 1 ? right_rows : 0; }
};

// Decoupled-weight-decay Adam (Loshchilov & Hutter).
struct AdamWParams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // multiplies lr * param, decoupled from the moments
  int64_t step = 1;           // 1-based step, for bias correction
};

// Adafactor (Shazeer & Stern, 2018) with factored second moments for
// matrices, update clipping, optional first moment and decoupled decay.
struct AdafactorParams {
  float lr = 1e-3f;
  float beta1 = 0.0f;           // 0 disables the first moment (m unused)
  float decay_rate = 0.8f;      // beta2_t = 1 - step^(-decay_rate)
  float eps1 = 1e-30f;          // added to grad^2
  float clip_threshold = 1.0f;  // update RMS is clipped to this
  float weight_decay = 0.0f;    // multiplies lr * param
  int64_t step = 1;             // 1-based
};

}  // namespace reformer
