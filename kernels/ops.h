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
#include "kernels/op_list.h"

namespace reformer {

template <class T>
class Ops {
 public:
  virtual ~Ops() = default;
  virtual const char* name() const = 0;
  // Most bytes this Ops has held allocated at once; -1 where not tracked.
  virtual int64_t peak_bytes() const { return -1; }
  // False when this backend lacks the op: calling it then throws DeviceError,
  // and the conformance suite skips it on this backend.
  virtual bool supports(OpId) const { return true; }
  // Floats per row of the state ffn_forward leaves in h and in a for C
  // inputs and F hidden features (feed-forward block, below): F each here
  // (the pre-activation and the activation); CUDA where it keeps them in
  // bf16: F / 2 each, or for ReLU F / 2 in h and none in a
  // (kernels/common/gemm_staging.h, cuda_ffn_state_cols).
  virtual FfnStateCols ffn_state_cols(int /*C*/, int F, Activation /*act*/) const {
    return {F, F};
  }
  // Floats per row that layernorm_ffn_forward's `ln` state needs for C
  // inputs and F hidden features (below): C here, fewer where the backend
  // keeps the normalised rows in a narrower type (CUDA: C / 2 for bf16 rows,
  // kernels/common/gemm_staging.h, layernorm_ffn_ln_cols).
  virtual int64_t layernorm_ffn_ln_cols(int C, int /*F*/) const { return C; }
  // Elements of a stash of n values (stash, below): n here, fewer where the
  // backend stashes in a narrower type (CUDA: (n + 1) / 2, bf16 pairs).
  virtual int64_t stash_elems(int64_t n) const { return n; }
  // Whether attention calls at precision `prec` may write and read their
  // output in bf16 (AttentionParams::out_bf16), write their gradients dqk,
  // dv in bf16 (grad_bf16), and the products take them as Operands in bf16:
  // the same bits as fp32 ones, which this backend rounds to bf16 wherever
  // it reads them (CUDA at bf16; not here).
  virtual bool attention_output_bf16(AttentionPrecision /*prec*/) const { return false; }
  // Elements of AttentionParams::kept for a chunked attention call over L
  // positions of width dh at precision `prec`: 0 where the backend keeps
  // nothing (here; CUDA: attention_kept_bytes for bf16, kernels/common/
  // params.h).
  virtual int64_t attention_kept_elems(int64_t /*L*/, int /*dh*/,
                                       AttentionPrecision /*prec*/) const {
    return 0;
  }
  // Allocates the backend's op scratch now, at least `bytes` (exactly, where
  // it grows): the memory plan's estimate of the largest request of a step,
  // so that the step allocates nothing and no growth margin is held. A
  // larger request still grows it. No-op where ops take no scratch (the CPU).
  virtual void reserve_workspace(int64_t /*bytes*/) {}
  // The backend's stream (a cudaStream_t for CUDA; nullptr where every op has
  // completed when it returns, as on the CPU). Every op is issued on it in
  // call order. Other streams (collectives) order themselves after the
  // compute issued so far by waiting on an event recorded on it.
  //
  // Host synchronisation points: synchronize(), to_host, to_host_i32 and
  // sum_squares return only once all work issued before them is done, and
  // they are where errors detected on the device are reported (thrown); any
  // other op may return before its work is done. from_host may return before
  // the copy is done, but the host buffer may be reused at once.
  virtual void* stream() { return nullptr; }

  // Every op of kernels/op_list.h, in list order. Contracts by family:
  //
  // memory: alloc(n) returns n uninitialised elements; release(nullptr) is a
  //   no-op and never throws; to_host / from_host (and the _i32 twins) copy
  //   n elements between host memory and this Ops' memory.
  // elementwise: out = a + b, out = a - b (may alias); axpy y += a * x;
  //   scale x *= s; sum_squares sums x^2 in double; copy has memmove
  //   semantics. stash keeps n values of src in dst (stash_elems(n)
  //   elements) in the backend's storage precision (the CPU: exactly;
  //   CUDA: bf16, rounded to nearest even), unstash writes them back into
  //   n values of dst; dst and src do not overlap. stash_2d keeps src[r,
  //   :cols] (row stride ld_src) for r < rows as stash keeps the rows * cols
  //   values of a contiguous [rows, cols] array (stash_elems(rows * cols)
  //   elements of dst); unstash_2d writes such a stash back into dst[r,
  //   :cols] (row stride ld_dst). copy_2d: dst[r, :cols] =
  //   src[r, :cols] for r < rows with row strides ld_dst, ld_src; add_2d
  //   the same with +=.
  //   dropout: out[i] (+= when accumulate) = alpha * (keep_i ? x[i] / (1 - p)
  //   : 0), keep_i = dropout_uniform(key, offset + i) >= p for the counter RNG
  //   stream key = make_key(seed, RngPurpose::dropout, step, layer, site)
  //   (kernels/common/philox.h); out may be x when !accumulate. Applying it
  //   to a gradient with the same key is its backward; with accumulate it is
  //   the residual update x += +-dropout(g) in one pass.
  // res (dropout, matmul_accumulate, ffn_forward): with accumulate, the
  //   residual the branch is added to: out = res + branch instead of out +=
  //   branch (null: out itself; res may equal out), so a kept input stays
  //   where it is while the output goes elsewhere. Null without accumulate.
  // gather_rows: for r < rows, dst[r * ld_dst + c] (+= when accumulate) =
  //   src[idx[r] * ld_src + c], c < cols; a row with idx[r] < 0 is set to 0
  //   (left as it is when accumulate).
  // embedding: out[L, D] = wte[tokens[i]] + concat(pos1[p / a2], pos2[p % a2]),
  //   p = pos_offset + i; wte [V, D], pos1 [a1, d1], pos2 [a2, D - d1].
  // layernorm: out[N, C] = (inp - mean) * rstd * w + b, rstd = 1 / sqrt(var +
  //   eps); mean[N], rstd[N] are saved for the backward.
  // linear: out[N, OC] = inp[N, C] @ w[C, OC] (+ bias[OC] when non-null);
  //   inp is an Operand: T values, or bf16 values where the backend keeps
  //   attention outputs so (attention_output_bf16; ShapeError elsewhere);
  //   backward: dinp += dout @ w^T (dinp = when !add_dinp: a buffer the
  //   product fills needs no zeroing first); dw += inp^T @ dout; dbias +=
  //   column sums.
  //   matmul_accumulate: out[N, OC] (res) += alpha * (inp @ w (+ bias)), a residual
  //   branch added (alpha 1) or taken away (alpha -1) without a buffer for
  //   it; on the CPU exactly matmul_forward into a buffer, then add / sub.
  // activation: out = act(inp); backward: dinp = dout * act'(inp) (written,
  //   not added).
  // LayerNorm and projections: layernorm_project_forward writes mean, rstd
  //   (as layernorm_forward) and out1 [N, OC] = LN(inp) @ w1, out2 = LN(inp)
  //   @ w2 (skipped when w2 is null); ln [N, C] is scratch (the CPU leaves
  //   LN(inp) there); with out_bf16 out1 and out2 hold bf16 values, two to
  //   a T (rounded to nearest even; a backend that keeps the attention's
  //   operands so, Ops::attention_output_bf16; ShapeError elsewhere).
  //   layernorm_project_backward recomputes LN(inp) (mean,
  //   rstd, ln rewritten), then: dw1 += LN^T dout1, dw2 += LN^T dout2 (w2,
  //   dout2, dw2 may be null together), and with dln = dout1 w1^T + dout2
  //   w2^T (dln [N, C] is scratch, left holding it) layernorm_backward's
  //   dinp, dln_w, dln_b +=. Both equal layernorm_forward and the linear ops
  //   in sequence, up to the backend's rounding. dout1, dout2 are Operands:
  //   T rows, or bf16 rows where the backend keeps the attention's
  //   gradients so (AttentionParams::grad_bf16), of row stride ld (0: OC).
  // feed-forward block: ffn_forward computes g = act(inp [N, C] @ w1 [C, F] +
  //   b1) @ w2 [F, C] + b2 and writes out = alpha g (accumulate false) or
  //   adds out (res) += alpha g (true). h and a receive what ffn_backward
  //   needs, in a layout of the backend's own, ffn_state_cols(C, F, act)
  //   floats a row each (the CPU: the pre-activation in h, the activation
  //   in a; CUDA: in bf16, GELU's pre-activation in h and activation in a,
  //   ReLU's activation in h); a buffer whose cols are 0 holds no state and
  //   must still be [N, F] (scratch to both calls); a caller that keeps
  //   nothing passes [N, F] for both. Only ffn_backward and
  //   ffn_rebuild read them. ffn_rebuild(a, h, N, C, F, act) writes a's
  //   state from h's (the CPU: a = act(h)), so that h alone may be kept
  //   from the forward to the backward. ffn_backward, given the h and a of
  //   ffn_forward on the same inp and weights, and dout = dL/dg: dinp =
  //   dL/dinp (written, not added), dw1, db1, dw2, db2 += their gradients;
  //   it consumes h and a (they hold scratch afterwards). Both equal
  //   matmul_forward, activation_forward, matmul_accumulate and their
  //   backwards in sequence, up to the backend's rounding.
  // LayerNorm and the feed-forward block: layernorm_ffn_forward writes mean,
  //   rstd (as layernorm_forward) and out as ffn_forward on LN(inp) (alpha,
  //   accumulate and res as there); ln, h and a receive what
  //   layernorm_ffn_backward needs, in the backend's own layout (the CPU:
  //   LN(inp) in ln and ffn_forward's h, a; CUDA: LN(inp) in bf16 in ln),
  //   read by nothing else; ln is N rows of layernorm_ffn_ln_cols(C, F)
  //   floats ([N, C] on the CPU; [N, C / 2] where CUDA keeps bf16 rows).
  //   layernorm_ffn_backward, given that state and dout = dL/dout: dw1,
  //   db1, dw2, db2 += as ffn_backward, and with dln [N, C] (scratch, left
  //   holding dL/dLN) layernorm_backward's dinp, dln_w, dln_b +=; it
  //   consumes h and a. Both equal layernorm_forward and ffn_forward (then
  //   ffn_backward and layernorm_backward) in sequence, up to the
  //   backend's rounding. layernorm_ffn_rows writes ln, mean and rstd as
  //   layernorm_ffn_forward does, without the block, so that a layer need
  //   not keep them from its forward to its backward.
  // LSH: factor0 == 0 hashes into n_buckets with one rotation block per
  //   round; otherwise n_buckets = factor0 * factor1 (both even) with one
  //   block per factor (kernels/common/params.h, rotation_cols); cols is
  //   rotation_cols(n_buckets, factor0).
  //   lsh_rotations: R [n_hashes, dh, cols] ~ N(0, 1) from the stream make_key(seed,
  //   RngPurpose::rotations, step, layer, head); round r uses R + r * dh * cols.
  //   lsh_hash: y = x_i R_r, x_i = qk[i * ld .. + dh]. factor0 == 0:
  //   buckets[r, i] = argmax(concat(y, -y)); otherwise b0 + factor0 * b1 with
  //   b0 = argmax(concat(y0, -y0)), y0 = y[0, factor0/2), b1 likewise over the
  //   rest of y. Ties go to the lowest index. Every id is in [0, n_buckets).
  //   With heads > 1, `heads` heads side by side in one call: head j hashes
  //   x_i = qk[i * ld + j * dh ..] with R + j * n_hashes * dh * cols into
  //   buckets + j * n_hashes * L, as a call of its own would. qk is an
  //   Operand: T values, or bf16 where the backend keeps them so (ld then
  //   counts bf16 values).
  //   lsh_sort: perm[r, s] = position at slot s when round r is sorted by
  //   (bucket, position). Requires buckets in [0, n_buckets) (lsh_hash's
  //   output always is); an id outside throws ShapeError - on the CPU at
  //   once, on a device at the next host synchronisation point (see
  //   stream()), perm being unspecified meanwhile.
  //   lsh_pack_buckets: the n bucket ids of buckets (each in [0, n_buckets),
  //   n_buckets <= kMaxPackedBuckets, kernels/common/lsh_checks.h) as 16-bit
  //   values, id k in bits 16 (k % 2) .. + 15 of packed[k / 2]
  //   (lsh_packed_elems(n) elements; an odd n leaves the last one's high
  //   half 0); an id outside throws ShapeError as lsh_sort's does.
  //   lsh_unpack_buckets writes them back as int32. An LSH layer keeps its
  //   bucket ids so from its forward to its backward (model.lsh_saved).
  //   lsh_decode_keys (one decoding step of an LSH layer): history [units,
  //   capacity] holds each unit's (head, round's) bucket of every position
  //   fed so far; with b_u = buckets[u * bucket_stride] the new position's
  //   bucket in unit u, sets history[u, pos] = b_u, then writes into
  //   keys[u * capacity ..] the positions j <= pos with history[u, j] ==
  //   b_u, increasing, and sets[u] = (u * capacity, their count), the
  //   key sets decode_attention takes. keys past a set's count are left as
  //   they were.
  // sequence-parallel routing (the distributed bucket sort,
  //   framework/sorted_attention.h; one hash round, SortRouteParams):
  //   bucket_histogram: hist[r, b] = the number of i < L with buckets[r, i]
  //   == b (buckets [n_hashes, L], hist [n_hashes, n_buckets]).
  //   sort_route: order[j] is the position at this rank's sorted slot j (by
  //   bucket, then position: lsh_sort's output for the round; the identity
  //   when null) and buckets[i] position i's bucket (0 when null). Position
  //   i = order[j] takes the global slot g = delta[buckets[i]] + j, owned by
  //   rank o = g / L at its local slot left(o) + q, q = g % L. It also goes
  //   to one neighbour: to o - 1 (mod sp) at local slot left(o - 1) + L + q
  //   when q < right_rows and (wrap or o > 0); otherwise to o + 1 (mod sp) at
  //   local slot q - (L - left_rows) when q >= L - left_rows and (wrap or o <
  //   sp - 1). These entries, ordered by destination rank and within one by
  //   position, fill send [3, capacity]: send[e] the position,
  //   send[capacity + e] the local slot at the destination, send[2 capacity
  //   + e] the position for an owner entry and -1 for a halo copy; back
  //   [2, L]: back[i] is position i's owner entry, back[L + i] its halo
  //   entry or -1. invert_index: dst[src[k]] = k for k < n.
  //   Bucket ids outside [0, n_buckets), global slots outside [0, sp L),
  //   more entries than capacity and an src that is not a permutation of
  //   [0, n) throw ShapeError - on the CPU at once, on a device at the next
  //   host synchronisation point, the outputs being unspecified meanwhile.
  // attention: chunked attention over permuted positions (LSH, and local with
  //   the identity permutation). qk, v, out: [L, ld] slices of one head. Keys
  //   are qk rows normalised to unit length; logits q . k_hat, masked per
  //   AttentionParams. Writes out (when non-null), lse [n_rounds, L] (by
  //   position) and, when non-null, the rounds' outputs out_r [n_rounds, L,
  //   dh] (at least one of out and out_r; without out_r a device keeps them
  //   in its workspace, in its own precision). Rounds combine by their
  //   log-sum-exp.
  //   The backwards add into dqk and dv, or write them when
  //   AttentionParams::accumulate is false (no zeroing pass before them).
  //   chunked_attention_backward takes lse and the combined output out [L,
  //   ld_out] (the forward's out, o_i = sum_r w_r,i out_r,i), read only in
  //   the term D_i = dout_i . o_i of the score gradient: when these rounds are
  //   one part of a larger combination (lse_combine_forward) with weight w_i
  //   and combined output out_i, passing out_i and w_i dout_i gives the
  //   gradients of the larger combination (full_attention_backward takes its
  //   output the same way). combine_rounds: the rounds' combination the chunked forward
  //   makes, for rounds attended by separate calls: with m_i = max_r lse[r,
  //   i], z_i = sum_r exp(lse[r, i] - m_i) and the weights w[r, i] =
  //   exp(lse[r, i] - m_i) / z_i (written when w is non-null), out[i * ld +
  //   d] = sum_r w[r, i] out_r[r, i, d] (written when out is non-null). By
  //   the rule above, a one-round backward given the combined output and
  //   w[r, i] dout_i adds round r's share of the gradients, so rounds can be
  //   differentiated one at a time. fold_round: the same combination built
  //   one round at a time, so that one round's output is held at once: with
  //   lse [r + 1, L] (rounds 0..r), out [L, ld] holding the combination of
  //   rounds 0..r-1 (not read when r = 0) and out_r [L, dh] round r's output,
  //   m_i = max_{k<=r} lse[k, i], a_i = sum_{k<r} exp(lse[k, i] - m_i) and
  //   b_i = exp(lse[r, i] - m_i): out_i = (a_i out_i + b_i out_r_i) / (a_i +
  //   b_i), the combination of rounds 0..r (equal to combine_rounds' after the
  //   last round up to rounding). chunked_attention_forward's out may be null
  //   (the rounds' outputs only in out_r). With p.fold_rounds it does both
  //   in one call, bit for bit as the sequence of one-round calls (n_rounds
  //   1, perm + r L, lse + r L, into out_r [L, dh]) each followed by
  //   fold_round(out, out_r, lse, r, L, dh, ld), for r = 0 .. n_rounds - 1:
  //   out is required, out_r is left holding the last round's output (a
  //   device stages the operands once for all the rounds). A null out_r
  //   leaves the round's output to the op: a device attending in bf16 keeps
  //   it in its workspace in bf16, as an all-rounds call keeps its rounds
  //   (so equal to the above up to that rounding), the CPU and fp32 ones
  //   in fp32 (the same bits).
  //   chunked_attention_backward with p.fold_rounds gives the gradients of
  //   the n_rounds call, up to rounding, adding each round's share into dqk
  //   and dv before the next round's (round 0's written when
  //   !p.accumulate): an op then holds one round's per-round state, and a
  //   device stages the operands once for all the rounds. Each share is the
  //   one-round call's given w[r] dout (the rule above) without forming
  //   w[r] dout: the probabilities are taken over all the rounds' lse.
  //   full_attention_*: exact attention with the same
  //   scoring and masks (p.n_rounds, p.chunk and the chunk fields are
  //   ignored); lse [L] saved for the backward.
  //   decode_attention: one query per head against sets of cached keys
  //   (DecodeAttentionParams): q, out [heads * dh]; k, v [positions, ld]
  //   caches; sets [heads * rounds, 2] (begin, count) into keys, keys the
  //   positions of each set. Scoring and masks as above with q_pos as the
  //   query's position; each set is one softmax (an empty set weighs 0),
  //   sets of a head combine by their log-sum-exp; out = 0 for a head whose
  //   sets are all empty.
  //   lse_combine_forward: per row n (LseCombineParams), with m the largest
  //   and z = sum exp(lse - m) over all parts' rounds, w[n, k] = sum over
  //   part k's rounds of exp(lse - m) / z (w [N, parts], dense) and
  //   out[n, :dh] = sum_k w[n, k] parts[n, k * dh ..]. lse_combine_backward:
  //   dparts[n, k * dh ..] += w[n, k] dout[n, :dh] (= when !p.accumulate; the
  //   other columns of dparts' rows are not touched), the gradient at fixed
  //   weights; the weights' own part, w_k (out_k - out) . dout through lse,
  //   is left to the attention backward (see above).
  // loss: softmax_cross_entropy: loss[n] = logsumexp(logits[n, :]) -
  //   logits[n, targets[n]], 0 where targets[n] < 0. When dlogits is non-null
  //   it is OVERWRITTEN with (softmax(logits[n]) - onehot(targets[n])) *
  //   grad_scale (0 rows where targets[n] < 0); dlogits may alias logits.
  //   argmax_rows: out[n] = argmax_v logits[n, v] (lowest index on ties).
  // optimizers: adamw_update on n elements. adafactor_update: one tensor
  //   viewed as [rows, cols]; factored (vr [rows], vc [cols]) when rows > 1
  //   and cols > 1, otherwise vr holds the full second moment [n] and vc is
  //   unused; m [rows * cols] is used only when p.beta1 > 0.
#define REFORMER_DECLARE_OP_PURE(ret, name, params, args) virtual ret name params = 0;
  REFORMER_OPS(REFORMER_DECLARE_OP_PURE)
#undef REFORMER_DECLARE_OP_PURE
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
