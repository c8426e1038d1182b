// Attention kinds as small strategies, chosen per layer at construction.
//
// A kind sees the heads it owns over the whole sequence, one head per call:
// qk, v and ao point at that head's columns, [L, dh] with row stride ld.
// Under sequence parallelism the model first exchanges its sequence shard for
// a head shard, so the kinds never know about ranks; head0 is the global
// index of the first owned head (it keys the LSH rotations, so every layout
// hashes alike).
//
// Adding a kind: a file with its class and a factory, and one case in
// make_attention (attention.cpp).
#pragma once

#include <cstdint>
#include <memory>

#include "framework/config.h"
#include "kernels/ops.h"

namespace reformer {

struct AttentionShape {
  int layer = 0;    // keys rotations and error messages
  int64_t L = 0;    // positions the kind attends over (the whole sequence)
  int heads = 0;    // heads owned
  int head0 = 0;    // global index of head 0 of this call
  int dh = 0;       // head width
  int64_t ld = 0;   // row stride of qk, v, ao and their gradients
  // Sequence-parallel pairs (framework/sequence_parallel.h): this kind computes
  // one part of each head - LSH: hash rounds round0 .. round0 + rounds of
  // attention.n_hashes; local and full: a replica - whose output the model
  // combines with the other parts' by their log-sum-exps. backward() then
  // takes the combined output as ao and the gradient already weighted by
  // this part's share as dao. rounds = 0: every round, one part.
  int round0 = 0;
  int rounds = 0;
  bool partial = false;
  // LSH: attend and differentiate the rounds one call at a time
  // (attention_by_round, framework/memory_plan.h).
  bool by_round = false;
  // LSH: keep each head's bucket ids from the forward (16 bits each) and
  // sort them again where used, instead of keeping its sorted orders
  // (lsh_saves_buckets, framework/memory_plan.h).
  bool saved_buckets = false;
  // ao in bf16 (AttentionParams::out_bf16; attention_output_bf16,
  // framework/memory_plan.h): its column offsets count bf16 values.
  bool out_bf16 = false;
  // dqk and dv in bf16 (AttentionParams::grad_bf16; attention_gradients_bf16,
  // framework/memory_plan.h): rows of 2 ld bf16 values, their column
  // offsets counting bf16 values.
  bool grad_bf16 = false;
  // qk and v in bf16 (AttentionParams::in_bf16, Operand for the hash;
  // attention_operands_bf16): their column offsets count bf16 values.
  bool in_bf16 = false;
};

// Transient buffers the kinds share across heads and layers, sized by the
// model (framework/memory_plan.cpp) for the largest kind it holds. lse
// carries a head's state from forward() to backward() in one of `slots`
// slots (head h uses slot h % slots), so the backward of a head must follow
// its forward before `slots` other heads' forwards. The attention op keeps
// the rounds' outputs itself; the backward takes the combined output, ao.
template <class T>
struct AttentionScratch {
  Buffer<T> lse;           // [slots, rounds, L]: each round's log-sum-exp
  int slots = 1;
  int64_t lse_slot = 0;    // elements of one slot of lse (rounds * L)
  T* lse_of(int h) { return lse.data() + int64_t(h % slots) * lse_slot; }
  Buffer<T> rot;           // rotations of one head [n_hashes, dh, rotation_cols]
                           // ([heads_per_pass, ...] where hash_pass hashes a pass)
  IntBuffer<T> perm;       // [n_hashes, L]: one head's LSH bucket ids until sorted
                           // ([heads_per_pass, n_hashes, L] where hash_pass sorts a pass)
  IntBuffer<T> order;      // [n_hashes, L]: one head's sorted orders (shape.saved_buckets)
  IntBuffer<T> identity;   // [L] 0, 1, ..., L-1 (local attention's order)
  // A kept layer's AttentionParams::kept for each head of its pass, slots
  // of kept_slot elements (Ops::attention_kept_elems), swapped in around
  // the layer's attention forward and backward; empty otherwise.
  Buffer<T> kept;
  int64_t kept_slot = 0;
  void* kept_of(int h) {
    return kept.size() > 0 ? static_cast<void*>(kept.data() + int64_t(h % slots) * kept_slot)
                           : nullptr;
  }
};

template <class T>
class AttentionKindImpl {
 public:
  virtual ~AttentionKindImpl() = default;
  virtual const char* name() const = 0;
  // Log-sum-exps a head's forward saves per position in its lse slot
  // ([lse_rows, L]): the hash rounds it attends (LSH) or 1.
  virtual int lse_rows() const { return 1; }
  // ao = attention(qk, v) for owned head h (0 <= h < heads). `rehash` (LSH):
  // compute the head's bucket ids from this qk and save its sorted orders
  // (or, shape.saved_buckets, the ids); otherwise reuse the saved ones (the
  // backward recompute must see the forward's buckets).
  // Leaves in the scratch what backward needs.
  virtual void forward(int h, const T* qk, const T* v, T* ao, uint64_t step, bool rehash) = 0;
  // Before the forwards of owned heads h0 .. h0 + heads - 1 (a pass; head
  // h0 + j's qk at qk + j * dh, row stride shape.ld): where the kind keeps
  // its sorted orders (LSH without shape.saved_buckets), computes and saves
  // them for all these heads at once (every head's rounds in one lsh_sort)
  // and returns true, so that their forwards take rehash = false. Otherwise
  // (and for kinds without hashing) does nothing and returns false.
  virtual bool hash_pass(int /*h0*/, int /*heads*/, const T* /*qk*/, uint64_t /*step*/) {
    return false;
  }
  // dqk, dv += gradients for dao of head h (= when !accumulate), right
  // after forward() of the same head on the same inputs. ao: the head's
  // output (under shape.partial the combined one; see AttentionShape); the
  // kind may use it as scratch, so it is unspecified afterwards.
  virtual void backward(int h, const T* qk, const T* v, T* ao, const T* dao, T* dqk, T* dv,
                        bool accumulate) = 0;
};

// The kind layer `shape.layer` runs: attention.kinds cycled over layers,
// except that a sequence of at most one chunk always runs full attention
// (one chunk makes every kind exact). Allocates what the kind keeps between
// steps (LSH: bucket ids) through ops; `scratch` must outlive the kind.
template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_attention(const Config& cfg, const AttentionShape& shape,
                                                     Ops<T>& ops, AttentionScratch<T>& scratch);
// True when layer `layer` runs LSH attention over a sequence of L positions.
bool uses_lsh(const Config& cfg, int layer, int64_t L);

// Chunk geometry and masks shared by the kinds.
AttentionParams attention_params(const Config& cfg, const AttentionShape& shape);

// The factories behind make_attention, one per kind's file.
template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_lsh_attention(const Config&, const AttentionShape&,
                                                         Ops<T>&, AttentionScratch<T>&);
template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_local_attention(const Config&, const AttentionShape&,
                                                           Ops<T>&, AttentionScratch<T>&);
template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_full_attention(const Config&, const AttentionShape&,
                                                          Ops<T>&, AttentionScratch<T>&);

}  // namespace reformer
