// LSH attention (shared QK): per owned head, hash every position into
// n_buckets in each of n_hashes rounds, sort each round by (bucket, position),
// attend within chunks of the sorted order and their look-back, combine the
// rounds by log-sum-exp. The sorted orders are kept from the hashing forward
// pass, so the rebuild and the backward attend over the same chunks without
// sorting again (a sort is about 4% of a 64K step); with
// shape.saved_buckets the bucket ids are kept instead, 16 bits each, and
// sorted again into the scratch's order in every call that attends with
// them (half the memory). With shape.by_round the attention calls fold
// their rounds (AttentionParams::fold_rounds): the rounds go one at a time,
// forward and backward, so an op's scratch holds one round instead of all.
#include "framework/attention.h"

#include "kernels/common/lsh_checks.h"

namespace reformer {

namespace {

template <class T>
class LshAttention final : public AttentionKindImpl<T> {
 public:
  LshAttention(const Config& cfg, const AttentionShape& shape, Ops<T>& ops,
               AttentionScratch<T>& scratch)
      : cfg_(cfg), shape_(shape), ops_(ops), s_(scratch),
        nh_(shape.rounds > 0 ? shape.rounds : cfg.attention.n_hashes), nb_(cfg.buckets()),
        f0_(cfg.bucket_factor0()),
        head_elems_(shape.saved_buckets ? lsh_packed_elems(int64_t(nh_) * shape.L)
                                        : int64_t(nh_) * shape.L),
        saved_(ops, int64_t(shape.heads) * head_elems_) {
    ap_ = attention_params(cfg, shape);
    ap_.n_rounds = nh_;
    ap_.wrap = true;
  }
  const char* name() const override { return "lsh"; }
  int lse_rows() const override { return nh_; }

  void forward(int h, const T* qk, const T* v, T* ao, uint64_t step, bool rehash) override {
    const int64_t L = shape_.L;
    int32_t* saved = saved_.data() + int64_t(h) * head_elems_;
    int32_t* perm = shape_.saved_buckets ? s_.order.data() : saved;
    if (rehash) {
      // The bucket ids are needed only until sorted: they go in the scratch.
      int32_t* buckets = s_.perm.data();
      hash(h, qk, step, buckets);
      if (shape_.saved_buckets) ops_.lsh_pack_buckets(saved, buckets, int64_t(nh_) * L, nb_);
      ops_.lsh_sort(perm, buckets, L, nh_, nb_);
    } else {
      perm = sorted_orders(h);
    }
    // By round, each round is folded into ao as it comes, so the op holds
    // one round's output at a time (kernels/ops.h, fold_rounds).
    AttentionParams ap = ap_;
    ap.fold_rounds = shape_.by_round;
    ap.kept = s_.kept_of(h);
    ops_.chunked_attention_forward(ao, nullptr, s_.lse_of(h), qk, v, perm, ap);
  }

  // The heads' bucket ids into the scratch ([heads, rounds, L]), by one
  // lsh_hash of all of them (their rotations side by side) where this rank
  // hashes every round of its heads (not pairs mode), then one sort of all
  // their rounds into their saved orders (heads h0 .. are consecutive
  // there). The calls cost little more than one head's: at 16K tokens a
  // sort of 64K keys took 35 us, one of 512K 46 us (bench/RESULTS.md,
  // 2026-12-02 (seventeenth)).
  bool hash_pass(int h0, int heads, const T* qk, uint64_t step) override {
    if (shape_.saved_buckets) return false;
    if (nh_ == cfg_.attention.n_hashes) {
      const int64_t per_head = int64_t(nh_) * shape_.dh * rotation_cols(nb_, f0_);
      for (int j = 0; j < heads; ++j)
        ops_.lsh_rotations(s_.rot.data() + j * per_head, cfg_.training.seed, step, shape_.layer,
                           shape_.head0 + h0 + j, nh_, shape_.dh, nb_, f0_);
      ops_.lsh_hash(s_.perm.data(), {qk, shape_.in_bf16}, shape_.ld, s_.rot.data(), shape_.L,
                    shape_.dh, nh_, nb_, f0_, heads);
    } else {
      const int64_t n = int64_t(nh_) * shape_.L;
      for (int j = 0; j < heads; ++j)
        hash(h0 + j, qk + int64_t(j) * shape_.dh / (shape_.in_bf16 ? 2 : 1), step,
             s_.perm.data() + j * n);
    }
    ops_.lsh_sort(saved_.data() + int64_t(h0) * head_elems_, s_.perm.data(), shape_.L,
                  heads * nh_, nb_);
    return true;
  }

  void backward(int h, const T* qk, const T* v, T* ao, const T* dao, T* dqk, T* dv,
                bool accumulate) override {
    AttentionParams ap = ap_;
    ap.accumulate = accumulate;
    // By round, each round's share is added in turn, so the op holds one
    // round's per-round state (kernels/ops.h, fold_rounds).
    ap.fold_rounds = shape_.by_round;
    ap.kept = s_.kept_of(h);
    ops_.chunked_attention_backward(dqk, dv, dao, qk, v, sorted_orders(h), ao, shape_.ld,
                                    s_.lse_of(h), ap);
  }

 private:
  // Owned head h's bucket ids [rounds, L] for this step's qk: every round's
  // rotations, as one process draws them; this kind hashes with those of
  // its rounds.
  void hash(int h, const T* qk, uint64_t step, int32_t* buckets) {
    ops_.lsh_rotations(s_.rot.data(), cfg_.training.seed, step, shape_.layer, shape_.head0 + h,
                       cfg_.attention.n_hashes, shape_.dh, nb_, f0_);
    const T* rot = s_.rot.data() + int64_t(shape_.round0) * shape_.dh * rotation_cols(nb_, f0_);
    ops_.lsh_hash(buckets, {qk, shape_.in_bf16}, shape_.ld, rot, shape_.L, shape_.dh, nh_, nb_,
                  f0_, 1);
  }

  // Head h's sorted orders from what its forward saved: the orders
  // themselves, or its bucket ids sorted again into the scratch's order
  // (the same orders: lsh_sort is a function of the ids).
  int32_t* sorted_orders(int h) {
    int32_t* saved = saved_.data() + int64_t(h) * head_elems_;
    if (!shape_.saved_buckets) return saved;
    const int64_t L = shape_.L;
    ops_.lsh_unpack_buckets(s_.perm.data(), saved, int64_t(nh_) * L);
    ops_.lsh_sort(s_.order.data(), s_.perm.data(), L, nh_, nb_);
    return s_.order.data();
  }

  const Config& cfg_;
  AttentionShape shape_;
  Ops<T>& ops_;
  AttentionScratch<T>& s_;
  int nh_, nb_, f0_;
  int64_t head_elems_;  // int32 elements of one head's saved state
  // [heads, rounds, L] sorted orders, or [heads, packed rounds * L] bucket
  // ids (shape.saved_buckets), kept from forward to backward.
  IntBuffer<T> saved_;
  AttentionParams ap_;
};

}  // namespace

template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_lsh_attention(const Config& cfg,
                                                         const AttentionShape& shape, Ops<T>& ops,
                                                         AttentionScratch<T>& scratch) {
  return std::make_unique<LshAttention<T>>(cfg, shape, ops, scratch);
}

template std::unique_ptr<AttentionKindImpl<float>> make_lsh_attention(
    const Config&, const AttentionShape&, Ops<float>&, AttentionScratch<float>&);
template std::unique_ptr<AttentionKindImpl<double>> make_lsh_attention(
    const Config&, const AttentionShape&, Ops<double>&, AttentionScratch<double>&);

}  // namespace reformer
