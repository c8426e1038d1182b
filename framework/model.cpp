#include "framework/model.h"

#include <algorithm>
#include <memory>
#include <numeric>
#include <tuple>

#include "framework/attention.h"
#include "framework/memory_plan.h"
#include "framework/sequence_parallel.h"
#include "framework/sorted_attention.h"
#include "kernels/errors.h"
#include "kernels/common/philox.h"

namespace reformer {

namespace {
// Dropout sites (part of the dropout RNG key).
constexpr int kSiteAttention = 0;
constexpr int kSiteFFN = 1;
}  // namespace

// Activation buffers for one rank's shard of a sequence, sized by the memory
// plan (framework/memory_plan.h). Only the residual streams and their
// gradients span [L, D]; the attention sublayer runs in passes of Hp heads
// per rank: qk .. dao are [Lfull, Hp * dh], a pass's heads over the whole
// sequence. Under sequence parallelism a pass projects every rank's pass
// heads (sp * Hp of them) on this rank's positions into lqk, lv
// [L, sp * Hp * dh] and exchanges them for this rank's. In pairs mode
// (g > 1 ranks per head, Hloc = Hp = 1) block r of lqk, lv is head r / g, the
// parts come back into lqk, their per-round log-sum-exps through lse_h into
// lse_seq, and comb [L, H * dh] holds the heads combined with the weights
// comb_w [H, L, g]. LayerNorm, the
// projections and the output projection run in position chunks of fc rows
// through the feed-forward chunk buffers (the two sublayers never overlap).
template <class T>
struct ReformerModel<T>::Scratch {
  IntBuffer<T> tokens, targets;          // [L]
  Buffer<T> x1, x2, dx1, dx2;            // residual streams and their gradients [L, D]
  Buffer<T> qk, v, ao, dqk, dv, dao;     // attention operands (see above)
  // sp > 1: sequence-shard projections / gradients [L, sp * Hp * dh]: the
  // memory of dqk and dv, which hold nothing while lqk and lv are in use
  // (the projections, the outputs and their gradient, pairs mode's parts,
  // all before the attention backward writes dqk and dv, whose results are
  // exchanged back in place), and the exchanges stage through an operand
  // buffer that holds nothing at the time (stage());
  // exchange_in_operands, framework/memory_plan.h. Otherwise own buffers
  // (lqk_own, lv_own) and the exchange's own staging.
  T* lqk = nullptr;
  T* lv = nullptr;
  Buffer<T> lqk_own, lv_own;
  bool in_operands = false;
  // The staging an exchange passes: `idle` where the exchange borrows one,
  // else null (its own).
  T* stage(Buffer<T>& idle) { return in_operands ? idle.data() : nullptr; }
  Buffer<T> lse_h, lse_seq, comb, comb_w;  // pairs mode (see above)
  Buffer<T> wq, wv, gwq, gwv;            // a pass of fewer than all local heads: its
                                         // columns of Wqk, Wv and their gradients
                                         // [D, sp * Hp * dh]
  Buffer<T> wo, gwo;                     // and under sp > 1 its rows of Wo [sp * Hp * dh, D]
  std::unique_ptr<HeadExchange<T>> exchange;  // sp > 1 (heads mode)
  std::unique_ptr<SortedAttention<T>> sorted;  // sp > 1, parallel.sp_mode: sort
  AttentionScratch<T> attn;
  std::vector<std::unique_ptr<AttentionKindImpl<T>>> kinds;  // per layer
  // A feed-forward chunk (fc rows; fh, fa) or projection chunk (pc rows).
  Buffer<T> fln, fmean, frstd, fh, fa, fg, dfln, dfg;
  Buffer<T> cat, oln, omean, orstd, logits, loss, dcat, doln;    // output chunk
  IntBuffer<T> pred;                     // output chunk argmax [oc]
  int64_t fc = 0, pc = 0, oc = 0;
  int64_t ln_cols = 0;  // floats per row of a kept layer's fln (Ops::layernorm_ffn_ln_cols)
  FfnStateCols ffn_cols;  // and of its fh and fa (the plan's kept_ffn_cols)
  // Kept layers keep no fa but the ops keep state there: their backward
  // rebuilds it from fh into the chunk's fa (model.kept_ffn: pre_activation).
  bool ffn_rebuilt = false;
  // Kept layers keep x1 (model.kept_x1), else their backward rebuilds it;
  // likewise their LayerNorm rows and statistics (model.kept_ln), else the
  // backward normalises again into the chunk's fln, fmean, frstd.
  bool x1_kept = true, ln_kept = true;
  // Kept layers (model.kept_layers, memory_plan.h): layer NL - kept.size()
  // + i keeps in kept[i] its inputs (x1 only where x1_kept), its
  // feed-forward state over all L rows (fa only where a holds state that is
  // not rebuilt) and, where attn_kept, its attention pass's ao, lse, the
  // heads' staged operands and, where attn_operands, qk and v (swapped with
  // the shared ones around its attention forward and backward, so those
  // run as for any layer; without attn_operands its qk and v go through
  // the shared ones, which its backward does not read).
  // Every pass's attention outputs (Ops::stash) and log-sum-exps, from a
  // layer's forward to its backward, which then reruns its projections but
  // not its attention.
  struct Stash {
    Buffer<T> ao, lse;
  };
  struct Kept {
    Buffer<T> x1, x2, fln, fmean, frstd, fa, fh;
    Buffer<T> qk, v, ao, lse;
    Buffer<T> staged;  // its heads' AttentionParams::kept (AttentionScratch::kept)
    Stash stash;       // attn_stashed
  };
  std::vector<Kept> kept;
  bool attn_kept = false;
  bool attn_operands = true;  // keeps_attention_operands
  // Kept layers keep a Stash instead (keeps_attention_outputs).
  bool attn_stashed = false;
  // Stashed layers (model.stashed_layers): layer NL - kept.size() -
  // stashed.size() + i keeps stashed[i].
  std::vector<Stash> stashed;
  int64_t ao_st_pass = 0;  // elements of one pass's stashed ao
  // The attention outputs (ao, kept ao) hold bf16 values, two to a T, as
  // written by the attention and read by the products (attention_output_bf16,
  // framework/memory_plan.h): the stash is then a copy.
  bool ao_bf16 = false;
  // The attention backward's gradients dqk, dv are bf16 values, side by
  // side in dqk (a row's 2 Hp dh values: dqk's, then dv's; no dv buffer),
  // as written by the attention and read by the projections' backward
  // (attention_gradients_bf16, framework/memory_plan.h).
  bool grad_bf16 = false;
  // The attention's operands qk, v are bf16 values, two to a T, as the
  // projections write them and the hash and the attention read them
  // (attention_operands_bf16, framework/memory_plan.h).
  bool qkv_bf16 = false;
  bool keeping = false;  // this forward keeps (a backward follows)
  // Layer l's kept state when this forward keeps it, else null.
  Kept* kept_of(int l, int n_layers) {
    const int i = l - (n_layers - int(kept.size()));
    return keeping && i >= 0 ? &kept[size_t(i)] : nullptr;
  }
  // Layer l's stash when this forward keeps one (a kept layer's under
  // attn_stashed, or a stashed layer's), else null.
  Stash* stash_of(int l, int n_layers) {
    if (Kept* k = kept_of(l, n_layers)) return attn_stashed ? &k->stash : nullptr;
    const int i = l - (n_layers - int(kept.size()) - int(stashed.size()));
    return keeping && i >= 0 && i < int(stashed.size()) ? &stashed[size_t(i)] : nullptr;
  }
  // Where a feed-forward chunk at row r0 keeps its state for the backward:
  // the shared chunk buffers, or layer k's rows from r0.
  struct FfnState {
    T *ln, *mean, *rstd, *h, *a;
  };
  FfnState ffn_state(Kept* k, int64_t r0) {
    if (!k) return {fln.data(), fmean.data(), frstd.data(), fh.data(), fa.data()};
    FfnState st{fln.data(), fmean.data(), frstd.data(), k->fh.data() + r0 * ffn_cols.h,
                k->fa.data() ? k->fa.data() + r0 * ffn_cols.a : fa.data()};
    if (ln_kept)
      std::tie(st.ln, st.mean, st.rstd) =
          std::tuple{k->fln.data() + r0 * ln_cols, k->fmean.data() + r0, k->frstd.data() + r0};
    return st;
  }
  void swap_attention(Kept& k) {
    if (attn_operands) { std::swap(qk, k.qk); std::swap(v, k.v); }
    std::swap(ao, k.ao);
    std::swap(attn.lse, k.lse); std::swap(attn.kept, k.staged);
  }
};

template <class T>
ReformerModel<T>::ReformerModel(const Config& cfg, Ops<T>& ops, const SequenceShard& shard)
    : cfg_(cfg), ops_(ops), shard_(shard) {
  const ModelConfig& m = cfg.model;
  REFORMER_REQUIRE(m.axial_shape.size() == 2 && m.axial_dims.size() == 2, ShapeError,
                   "axial shape and dims must be resolved (validate the config)");
  check_sequence_shard(cfg, shard.size, shard.comm != nullptr || shard.size == 1);
  Lfull_ = m.max_len;
  L_ = Lfull_ / shard.size;
  pos0_ = int64_t(shard.rank) * L_;
  D_ = m.d_model;
  H_ = m.n_heads;
  g_ = sp_ranks_per_head(cfg, shard.size);
  Hloc_ = g_ > 1 ? 1 : H_ / shard.size;
  dh_ = cfg.head_dim();
  F_ = m.d_ff;
  V_ = m.vocab_size;
  NL_ = m.n_layers;
  d1_ = m.axial_dims[0];
  a2_ = m.axial_shape[1];

  Hp_ = attention_heads_per_pass(cfg, shard.size, int(sizeof(T)));
  table_ = model_param_table(cfg);
  // Every allocation below is sized by the memory plan (framework/memory_plan.h).
  const MemoryPlan plan = plan_memory(cfg, shard.size, int(sizeof(T)));
  auto buf = [&](const char* name) { return Buffer<T>(ops, plan.count(name)); };
  auto ibuf = [&](const char* name) { return IntBuffer<T>(ops, plan.count(name)); };
  params_ = buf("params");
  grads_ = buf("grads");
  ops.fill(grads_.data(), T(0), table_.total());
  P_ = bind_tensors(table_, params_.data(), NL_);
  G_ = bind_tensors(table_, grads_.data(), NL_);

  s_ = new Scratch;
  Scratch& s = *s_;
  s.tokens = ibuf("tokens");
  s.targets = ibuf("targets");
  s.x1 = buf("x1"); s.x2 = buf("x2"); s.dx1 = buf("dx1"); s.dx2 = buf("dx2");
  s.qkv_bf16 = attention_operands_bf16(cfg, shard.size, int(sizeof(T)));
  s.qk = buf("qk"); s.v = buf("v"); s.ao = buf("ao");
  s.grad_bf16 = attention_gradients_bf16(cfg, shard.size, int(sizeof(T)));
  s.dqk = buf("dqk"); s.dao = buf("dao");
  if (!s.grad_bf16) s.dv = buf("dv");
  if (shard.size > 1 && cfg.parallel.sp_mode == SpMode::sort) {
    if (Hp_ < H_) { s.wq = buf("wq_h"); s.wv = buf("wv_h"); s.gwq = buf("gwq_h"); s.gwv = buf("gwv_h"); }
    s.sorted = std::make_unique<SortedAttention<T>>(cfg, ops, *shard.comm, plan);
  } else {
    if (Hp_ < Hloc_ || g_ > 1) {
      s.wq = buf("wq_h"); s.wv = buf("wv_h"); s.gwq = buf("gwq_h"); s.gwv = buf("gwv_h");
      if (shard.size > 1 && g_ == 1) { s.wo = buf("wo_h"); s.gwo = buf("gwo_h"); }
    }
    bool any_lsh = false;
    for (int l = 0; l < NL_; ++l) any_lsh |= uses_lsh(cfg, l, Lfull_);
    const int part_rounds = any_lsh ? cfg.attention.n_hashes / g_ : 1;  // lse rows of a part
    if (shard.size > 1) {
      s.in_operands = exchange_in_operands(cfg, shard.size, int(sizeof(T)));
      if (!s.in_operands) {
        s.lqk_own = buf("lqk");
        s.lv_own = buf("lv");
      }
      s.lqk = s.in_operands ? s.dqk.data() : s.lqk_own.data();
      s.lv = s.in_operands ? s.dv.data() : s.lv_own.data();
      // Operands and their gradients travel in bf16 where the attention
      // reads them so (framework/sequence_parallel.h, Wire).
      s.exchange = std::make_unique<HeadExchange<T>>(
          ops, *shard.comm, L_, Hp_ * dh_, g_ > 1 ? part_rounds : 0,
          cfg.attention.precision == AttentionPrecision::bf16, !s.in_operands);
    }
    if (g_ > 1) {
      s.lse_h = buf("lse_h"); s.lse_seq = buf("lse_seq"); s.comb = buf("comb");
      s.comb_w = buf("comb_w");
    }

    // Attention kinds and the scratch they share.
    const bool by_round = attention_by_round(cfg, shard.size, int(sizeof(T)));
    s.attn.lse = buf("lse");
    s.attn.slots = Hp_;
    s.attn.kept_slot = kept_attention_staged(cfg, int(sizeof(T)));
    s.attn.lse_slot = plan.count("lse") / s.attn.slots;
    const bool saved_buckets = lsh_saves_buckets(cfg, shard.size, int(sizeof(T)));
    if (any_lsh) {
      s.attn.rot = buf("rotations");
      s.attn.perm = ibuf("perm");
      if (saved_buckets) s.attn.order = ibuf("lsh order");
    }
    s.attn.identity = ibuf("identity");
    {
      std::vector<int32_t> id(static_cast<size_t>(Lfull_));
      std::iota(id.begin(), id.end(), 0);
      ops.from_host_i32(s.attn.identity.data(), id.data(), Lfull_);
    }
    s.ao_bf16 = attention_output_bf16(cfg, shard.size, int(sizeof(T)));
    if (s.ao_bf16 && !ops.attention_output_bf16(cfg.attention.precision))
      throw ConfigError(std::string("attention.precision: the ") + ops.name() +
                        " attention writes fp32 outputs, which the plan for training.device " +
                        to_string(cfg.training.device) +
                        " keeps in bf16 (use training.device: cpu)");
    for (auto [on, what] : {std::pair{s.grad_bf16, "writes fp32 gradients"},
                            std::pair{s.qkv_bf16, "reads fp32 operands"}})
      if (on && !ops.attention_output_bf16(cfg.attention.precision))
        throw ConfigError(std::string("attention.precision: the ") + ops.name() +
                          " attention " + what + ", which the plan for training.device " +
                          to_string(cfg.training.device) +
                          " keeps in bf16 (use training.device: cpu)");
    for (int l = 0; l < NL_; ++l) {
      AttentionShape shape{l, Lfull_, Hloc_, shard.rank / g_ * Hloc_, dh_, int64_t(Hp_) * dh_};
      shape.out_bf16 = s.ao_bf16;
      shape.grad_bf16 = s.grad_bf16;
      shape.in_bf16 = s.qkv_bf16;
      if (g_ > 1) {  // this rank's share of each head's hash rounds
        shape.rounds = cfg.attention.n_hashes / g_;
        shape.round0 = shard.rank % g_ * shape.rounds;
        shape.partial = true;
      }
      shape.by_round = by_round;
      shape.saved_buckets = saved_buckets;
      s.kinds.push_back(make_attention(cfg, shape, ops, s.attn));
    }
  }

  s.fc = m.ffn_chunk > 0 ? std::min<int64_t>(m.ffn_chunk, L_) : L_;
  s.pc = m.proj_chunk > 0 ? std::min<int64_t>(m.proj_chunk, L_) : s.fc;
  s.fln = buf("fln"); s.fg = buf("fg"); s.dfln = buf("dfln"); s.dfg = buf("dfg");
  s.fh = buf("fh"); s.fa = buf("fa");
  s.fmean = buf("fmean");
  s.frstd = buf("frstd");
  const int kept = kept_layer_count(cfg);
  s.attn_kept = kept > 0 && keeps_attention(cfg, shard.size, int(sizeof(T)));
  s.attn_operands = keeps_attention_operands(cfg, int(sizeof(T)));
  // The ops must keep what the plan counts on: their staged operands in the
  // planned slot, and where the plan keeps no qk and v, staged ones at all
  // (else their backward would read qk and v that are gone).
  if (s.attn_kept) {
    const int64_t need = ops.attention_kept_elems(Lfull_, dh_, cfg.attention.precision);
    if (need > s.attn.kept_slot || (need == 0 && !s.attn_operands))
      throw ConfigError(std::string("model.kept_layers: the ") + ops.name() +
                        " attention keeps other operands than the plan for training.device " +
                        to_string(cfg.training.device) + " holds (use training.device: cpu)");
  }
  // A kept layer's feed-forward state is as wide as the ops keep it (plan:
  // kept_ffn_cols, the ops: ffn_state_cols), else it would overrun; where
  // the plan keeps no fa, the backward rebuilds the ops' state there.
  s.ffn_cols = kept_ffn_cols(cfg, int(sizeof(T)));
  const FfnStateCols ops_ffn = ops.ffn_state_cols(D_, F_, m.activation);
  if (kept > 0 && (ops_ffn.h > s.ffn_cols.h || (s.ffn_cols.a > 0 && ops_ffn.a > s.ffn_cols.a)))
    throw ConfigError(std::string("model.kept_layers: the ") + ops.name() +
                      " feed-forward keeps a wider hidden state than the plan for "
                      "training.device " + to_string(cfg.training.device) +
                      " holds (use training.device: cpu)");
  s.ffn_rebuilt = kept > 0 && s.ffn_cols.a == 0 && ops_ffn.a > 0;
  s.x1_kept = keeps_x1(cfg);
  // A kept layer's LayerNorm rows hold what the ops keep there (plan:
  // kept_ln_cols, the ops: layernorm_ffn_ln_cols), else they would overrun.
  s.ln_cols = ops.layernorm_ffn_ln_cols(D_, F_);
  s.ln_kept = keeps_ln(cfg);
  if (kept > 0 && s.ln_kept && kept_ln_cols(cfg, int(sizeof(T))) < s.ln_cols)
    throw ConfigError(std::string("model.kept_layers: the ") + ops.name() +
                      " feed-forward keeps fp32 LayerNorm rows, which the plan for "
                      "training.device " + to_string(cfg.training.device) +
                      " keeps in bf16 (use training.device: cpu)");
  s.attn_stashed = kept > 0 && keeps_attention_outputs(cfg, shard.size, int(sizeof(T)));
  const int stashed = stashed_layer_count(cfg, shard.size, int(sizeof(T)));
  s.ao_st_pass = ops.stash_elems(L_ * int64_t(Hp_) * dh_);
  for (auto [on, name, key] : {std::tuple{s.attn_stashed, "kept ao stash", "model.kept_layers"},
                               std::tuple{stashed > 0, "stashed ao", "model.stashed_layers"}})
    if (on && plan.count(name) < (Hloc_ / Hp_) * s.ao_st_pass)
      throw ConfigError(std::string(key) + ": the " + ops.name() +
                        " stash of the attention outputs is wider than the plan for "
                        "training.device " + to_string(cfg.training.device) +
                        " holds (use training.device: cpu)");
  for (int k = 0; k < kept; ++k) {
    typename Scratch::Kept K;
    if (s.x1_kept) K.x1 = buf("kept x1");
    K.x2 = buf("kept x2");
    if (s.ln_kept) {
      K.fln = buf("kept fln"); K.fmean = buf("kept fmean"); K.frstd = buf("kept frstd");
    }
    K.fh = buf("kept fh");
    if (s.ffn_cols.a > 0) K.fa = buf("kept fa");
    if (s.attn_kept) {
      if (s.attn_operands) { K.qk = buf("kept qk"); K.v = buf("kept v"); }
      K.ao = buf("kept ao");
      K.lse = buf("kept lse");
      K.staged = buf("kept attention staging");
    }
    if (s.attn_stashed) K.stash = {buf("kept ao stash"), buf("kept lse all")};
    s.kept.push_back(std::move(K));
  }
  for (int i = 0; i < stashed; ++i) s.stashed.push_back({buf("stashed ao"), buf("stashed lse")});

  s.oc = m.loss_chunk > 0 ? std::min<int64_t>(m.loss_chunk, L_) : L_;
  s.cat = buf("cat"); s.oln = buf("oln"); s.dcat = buf("dcat"); s.doln = buf("doln");
  s.omean = buf("omean");
  s.orstd = buf("orstd");
  s.logits = buf("logits");
  s.loss = buf("loss");
  s.pred = ibuf("pred");
  // The op scratch, as large as the step's largest request is planned.
  ops.reserve_workspace(plan.count("op workspace (estimate)"));
}

template <class T>
ReformerModel<T>::~ReformerModel() {
  delete s_;
}

template <class T>
void ReformerModel<T>::init_params(uint64_t seed) {
  std::vector<T> host(size_t(table_.total()));
  const auto& ps = table_.params();
  for (size_t k = 0; k < ps.size(); ++k) {
    const ParamInfo& p = ps[k];
    T* dst = host.data() + p.offset;
    const RngKey key = make_key(seed, RngPurpose::init, k);
    for (int64_t i = 0; i < p.size; ++i) {
      switch (p.init) {
        case InitKind::normal: dst[i] = T(p.init_std * rng_normal(key, uint64_t(i))); break;
        case InitKind::ones: dst[i] = T(1); break;
        case InitKind::zeros: dst[i] = T(0); break;
      }
    }
  }
  ops_.from_host(params_.data(), host.data(), table_.total());
}

// A sequence-parallel model has one of the two (sort mode's SortedAttention
// or the head exchange), so one StreamSpans uses the clock.
template <class T>
void ReformerModel<T>::set_exchange_clock(StreamClock* clock) {
  if (s_->sorted) s_->sorted->set_clock(clock);
  else if (s_->exchange) s_->exchange->set_clock(clock);
}

template <class T>
double ReformerModel<T>::take_exchange_ms() {
  if (s_->sorted) return s_->sorted->take_ms();
  return s_->exchange ? s_->exchange->take_ms() : 0.0;
}

template <class T>
void ReformerModel<T>::zero_grads() {
  ops_.fill(grads_.data(), T(0), table_.total());
}

template <class T>
void ReformerModel<T>::embed(const int32_t* tokens) {
  Scratch& s = *s_;
  ops_.from_host_i32(s.tokens.data(), tokens, L_);
  ops_.embedding_forward(s.x1.data(), s.tokens.data(), P_.tokens, P_.axial1, P_.axial2, L_, D_,
                         d1_, a2_, pos0_);
  ops_.copy(s.x2.data(), s.x1.data(), L_ * D_);
}

// Calls f(r0, rows) for consecutive chunks of at most `chunk` rows covering [0, L).
template <class F>
void for_chunks(int64_t L, int64_t chunk, F&& f) {
  for (int64_t r0 = 0; r0 < L; r0 += chunk) f(r0, std::min(chunk, L - r0));
}

// The first column of Wqk, Wv (row of Wo) of the heads rank `rank` of the
// sequence-parallel group attends in pass `pass`: its local heads
// pass * Hp .. + Hp (pairs mode: head rank / g).
template <class T>
int64_t ReformerModel<T>::pass_col(int rank, int pass) const {
  return (int64_t(rank / g_) * Hloc_ + int64_t(pass) * Hp_) * dh_;
}

// Columns of the attention output a pass hands to Wo on this rank's
// positions: every rank's pass heads, or in pairs mode the H combined heads.
template <class T>
int ReformerModel<T>::out_cols() const {
  return g_ > 1 ? H_ * dh_ : shard_.size * Hp_ * dh_;
}

// Pairs mode: head h of this rank's positions combines parts h * g .. + g
// of lqk (each with `rounds` log-sum-exps in lse_seq) into comb.
template <class T>
LseCombineParams ReformerModel<T>::combine_params(int rounds) const {
  LseCombineParams p;
  p.N = L_;
  p.parts = g_;
  p.rounds = rounds;
  p.dh = dh_;
  p.ld_parts = int64_t(shard_.size) * dh_;
  p.ld_lse = int64_t(shard_.size) * rounds;
  p.ld_out = int64_t(H_) * dh_;
  return p;
}

// Pairs mode, after the parts came back into lqk: their per-round
// log-sum-exps follow the same way (the head side's [rounds, L] transposed
// into lse_h [L, rounds]) and every head is combined into comb. Returns comb.
template <class T>
const T* ReformerModel<T>::combine_parts(int l) {
  Scratch& s = *s_;
  const int R = s.kinds[size_t(l)]->lse_rows();
  for (int r = 0; r < R; ++r)
    ops_.copy_2d(s.lse_h.data() + r, R, s.attn.lse_of(0) + int64_t(r) * Lfull_, 1, Lfull_, 1);
  s.exchange->to_sequence(s.lse_h.data(), s.lse_seq.data(), R, s.stage(s.dao));
  const LseCombineParams p = combine_params(R);
  for (int h = 0; h < H_; ++h)
    ops_.lse_combine_forward(s.comb.data() + int64_t(h) * dh_, s.comb_w.data() + h * L_ * g_,
                             s.lqk + int64_t(h) * g_ * dh_,
                             s.lse_seq.data() + int64_t(h) * g_ * R, p);
  return s.comb.data();
}

// Pairs mode, from the gradient of comb in lqk: dao <- each part's share
// (w_k times the head's gradient) and ao <- the combined output, both on the
// head side, for the kind's backward (AttentionShape::partial). Both
// exchanges stage through dqk's memory: lqk's gradient rows are read first.
template <class T>
void ReformerModel<T>::parts_backward() {
  Scratch& s = *s_;
  const int sp = shard_.size;
  const LseCombineParams p = combine_params(1);
  ops_.fill(s.lv, T(0), L_ * sp * dh_);
  for (int h = 0; h < H_; ++h)
    ops_.lse_combine_backward(s.lv + int64_t(h) * g_ * dh_,
                              s.lqk + int64_t(h) * dh_, s.comb_w.data() + h * L_ * g_, p);
  s.exchange->to_heads(s.lv, s.dao.data(), Wire::operand, s.stage(s.dqk));
  for (int r = 0; r < sp; ++r)
    ops_.copy_2d(s.lv + int64_t(r) * dh_, int64_t(sp) * dh_,
                 s.comb.data() + int64_t(r / g_) * dh_, int64_t(H_) * dh_, L_, dh_);
  s.exchange->to_heads(s.lv, s.ao.data(), Wire::operand, s.stage(s.dqk));
}

// The columns of layer l's Wqk and Wv for attention pass `pass`, every
// rank's block side by side, into wq, wv [D, sp * Hp * dh], and under sp > 1
// the rows of Wo into wo [sp * Hp * dh, D] (only when a pass has fewer than
// all local heads; otherwise the weights are used in place).
template <class T>
void ReformerModel<T>::load_pass_weights(int l, int pass) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const int HD = H_ * dh_, n = Hp_ * dh_, N = shard_.size * n;
  for (int r = 0; r < shard_.size; ++r) {
    const int64_t c = pass_col(r, pass);
    ops_.copy_2d(s.wq.data() + int64_t(r) * n, N, P.wqk + c, HD, D_, n);
    ops_.copy_2d(s.wv.data() + int64_t(r) * n, N, P.wv + c, HD, D_, n);
    if (s.wo.data()) ops_.copy(s.wo.data() + int64_t(r) * n * D_, P.wo + c * D_, int64_t(n) * D_);
  }
}

// G.wqk, G.wv (and under sp > 1 G.wo) += the pass gradients gwq, gwv (gwo),
// block by block as load_pass_weights gathered them.
template <class T>
void ReformerModel<T>::add_pass_gradients(int l, int pass) {
  Scratch& s = *s_;
  const LayerTensors<T>& G = G_.layers[size_t(l)];
  const int HD = H_ * dh_, n = Hp_ * dh_, N = shard_.size * n;
  for (int r = 0; r < shard_.size; ++r) {
    const int64_t c = pass_col(r, pass), nd = int64_t(n) * D_;
    ops_.add_2d(G.wqk + c, HD, s.gwq.data() + int64_t(r) * n, N, D_, n);
    ops_.add_2d(G.wv + c, HD, s.gwv.data() + int64_t(r) * n, N, D_, n);
    if (s.gwo.data()) ops_.add(G.wo + c * D_, G.wo + c * D_, s.gwo.data() + r * nd, nd);
  }
}

// qk[L, n] = LN_a(x2) wq, v[L, n] = LN_a(x2) wv (wq, wv [D, n]), chunk by chunk.
template <class T>
void ReformerModel<T>::project(int l, const T* wq, const T* wv, int n, T* qk, T* v) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  for_chunks(L_, s.pc, [&](int64_t r0, int64_t rows) {
    ops_.layernorm_project_forward(qkv_at(qk, r0 * n), qkv_at(v, r0 * n), s.fln.data(),
                                   s.fmean.data(), s.frstd.data(), s.x2.data() + r0 * D_,
                                   P.ln_a_w, P.ln_a_b, wq, wv, rows, D_, n,
                                   float(cfg_.model.layernorm_eps), s.qkv_bf16);
  });
}

// The backward of project: dx2 += LN_a'(x2)^T (dqk wq^T + dv wv^T); gwq, gwv
// and LN_a's parameter gradients accumulate. LayerNorm's backward is linear
// in its incoming gradient, so heads may add their parts one at a time.
template <class T>
void ReformerModel<T>::project_backward(int l, const T* dqk, const T* dv, const T* wq,
                                        const T* wv, T* gwq, T* gwv, int n) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const LayerTensors<T>& G = G_.layers[size_t(l)];
  // bf16 gradients: rows of 2 n values (grad_bf16), r0 n floats a block.
  const int64_t ld = s.grad_bf16 ? 2 * int64_t(n) : 0;
  for_chunks(L_, s.pc, [&](int64_t r0, int64_t rows) {
    const Operand<T> d1{dqk + r0 * n, s.grad_bf16, ld}, d2{dv + r0 * n, s.grad_bf16, ld};
    ops_.layernorm_project_backward(s.dx2.data() + r0 * D_, G.ln_a_w, G.ln_a_b, gwq, gwv, d1,
                                    d2, s.fln.data(), s.dfln.data(),
                                    s.fmean.data(), s.frstd.data(), s.x2.data() + r0 * D_,
                                    P.ln_a_w, P.ln_a_b, wq, wv, rows, D_, n,
                                    float(cfg_.model.layernorm_eps));
  });
}

namespace {
// Element i of a buffer of T values, or of bf16 values two to a T (i even).
template <class T>
T* element_at(T* p, int64_t i, bool bf16) {
  return bf16 ? p + i / 2 : p + i;
}
}  // namespace

template <class T>
T* ReformerModel<T>::ao_at(T* ao, int64_t i) const {
  return element_at(ao, i, s_->ao_bf16);
}

template <class T>
T* ReformerModel<T>::qkv_at(T* x, int64_t i) const {
  return element_at(x, i, s_->qkv_bf16);
}

// x1 += dropout(ao wo) (ao [L, n], wo [n, D]), or -= when `subtract`, chunk
// by chunk; with res, x1 = res + dropout(ao wo) (res [L, D]: a kept layer's
// input, stack_forward). The residual-branch dropout mask is keyed by global
// element offsets, so every head and every layout draws the same mask, and
// the sum of the heads' dropped-out parts is the dropped-out sum.
template <class T>
void ReformerModel<T>::add_output(int l, const T* ao, const T* wo, int n, bool subtract,
                                  uint64_t step, bool train, const T* res) {
  Scratch& s = *s_;
  for_chunks(L_, s.pc, [&](int64_t r0, int64_t rows) {
    T* x1 = s.x1.data() + r0 * D_;
    const T* base = res ? res + r0 * D_ : nullptr;
    const Operand<T> a{ao_at(ao, r0 * n), s.ao_bf16};
    if (!(train && cfg_.model.dropout > 0)) {
      ops_.matmul_accumulate(x1, a, wo, nullptr, rows, n, D_, subtract ? -1.0f : 1.0f, base);
      return;
    }
    ops_.matmul_forward(s.fg.data(), a, wo, nullptr, rows, n, D_);
    ops_.dropout(x1, s.fg.data(), rows * D_, float(cfg_.model.dropout), cfg_.training.seed, step,
                 l, kSiteAttention, (pos0_ + r0) * D_, subtract ? -1.0f : 1.0f,
                 /*accumulate=*/true, base);
  });
}

// The backward of add_output for the gradient dx1 of y1: dao [L, n] =
// dropout(dx1) wo^T (written), gwo [n, D] += ao^T dropout(dx1).
template <class T>
void ReformerModel<T>::output_backward(int l, const T* ao, const T* wo, T* gwo, int n, T* dao,
                                       uint64_t step, bool train) {
  Scratch& s = *s_;
  for_chunks(L_, s.pc, [&](int64_t r0, int64_t rows) {
    const T* d = s.dx1.data() + r0 * D_;
    if (train && cfg_.model.dropout > 0) {
      ops_.dropout(s.dfg.data(), d, rows * D_, float(cfg_.model.dropout), cfg_.training.seed,
                   step, l, kSiteAttention, (pos0_ + r0) * D_, 1.0f, /*accumulate=*/false,
                   nullptr);
      d = s.dfg.data();
    }
    ops_.matmul_backward(dao + r0 * n, gwo, nullptr, d, Operand<T>{ao_at(ao, r0 * n), s.ao_bf16},
                         wo, rows, n, D_, /*add_dinp=*/false);
  });
}

// The weights of attention pass `pass` of layer l: the layer's own when a
// pass holds all local heads, else the ones load_pass_weights gathers (the
// Wo rows of a pass at sp 1 are one contiguous block, used in place).
template <class T>
typename ReformerModel<T>::PassWeights ReformerModel<T>::pass_weights(int l, int pass) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const LayerTensors<T>& G = G_.layers[size_t(l)];
  // Pairs mode gathers each head's Wqk, Wv columns once per rank of the
  // head and uses the whole Wo in place.
  const bool all = Hp_ == Hloc_ && g_ == 1, in_place_wo = all || !s.exchange || g_ > 1;
  const int64_t c0 = pass_col(0, pass);
  return {all, in_place_wo, all ? P.wqk : s.wq.data(), all ? P.wv : s.wv.data(),
          in_place_wo ? P.wo + c0 * D_ : s.wo.data(),
          in_place_wo ? G.wo + c0 * D_ : s.gwo.data()};
}

// Sort mode, attention pass `pass` of layer l (heads pass * Hp .. + Hp): qk,
// v [L, Hp dh] <- LN_a(x2) projected on the pass heads' columns of Wqk, Wv
// (gathered into wq, wv unless a pass holds every head), and ao [L, Hp dh]
// <- their attention (framework/sorted_attention.h), head j's state in
// slot j. Returns the pass heads' rows of Wo.
template <class T>
const T* ReformerModel<T>::attend_sorted(int l, int pass, uint64_t step, bool rehash) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const int HD = H_ * dh_, n = Hp_ * dh_;
  const int64_t c0 = int64_t(pass) * n;
  const T* wq = P.wqk;
  const T* wv = P.wv;
  if (Hp_ < H_) {
    ops_.copy_2d(s.wq.data(), n, P.wqk + c0, HD, D_, n);
    ops_.copy_2d(s.wv.data(), n, P.wv + c0, HD, D_, n);
    wq = s.wq.data();
    wv = s.wv.data();
  }
  project(l, wq, wv, n, s.qk.data(), s.v.data());
  for (int j = 0; j < Hp_; ++j) {
    const int64_t c = int64_t(j) * dh_;
    s.sorted->forward_head(l, pass * Hp_ + j, j, s.qk.data() + c, s.v.data() + c, n,
                           s.ao.data() + c, step, rehash);
  }
  return P.wo + c0 * D_;
}

// x1 += Attn(LN_a(x2)) for layer l (with x1_in: x1 = x1_in + Attn(...)),
// saving each LSH head's bucket ids, in passes of Hp heads per rank.
template <class T>
void ReformerModel<T>::attention_layer_forward(int l, uint64_t step, bool train,
                                               const T* x1_in) {
  Scratch& s = *s_;
  if (s.sorted) {  // sort mode, in passes of Hp heads
    for (int pass = 0; pass < H_ / Hp_; ++pass) {
      const T* wo = attend_sorted(l, pass, step, /*rehash*/ true);
      add_output(l, s.ao.data(), wo, Hp_ * dh_, false, step, train, pass == 0 ? x1_in : nullptr);
    }
    return;
  }
  typename Scratch::Stash* k = s.stash_of(l, NL_);
  for (int pass = 0; pass < Hloc_ / Hp_; ++pass) {
    const T* ao = attend_pass(l, pass, step, /*rehash*/ true);
    if (k) {  // what the backward reads from this pass's attention
      const int64_t nl = s.attn.lse.size();
      T* st = k->ao.data() + pass * s.ao_st_pass;
      if (s.ao_bf16)  // already the stash's bf16 values
        ops_.copy(st, ao, s.ao_st_pass);
      else
        ops_.stash(st, ao, L_ * out_cols());
      ops_.copy(k->lse.data() + pass * nl, s.attn.lse.data(), nl);
    }
    add_output(l, ao, pass_weights(l, pass).wo, out_cols(), false, step, train,
               pass == 0 ? x1_in : nullptr);
  }
}

// Attention pass `pass` of layer l: loads its weights, projects LN_a(x2) on
// the pass heads' columns, attends each of this rank's Hp pass heads over
// the whole sequence (under sp > 1 exchanging the projections of every
// rank's pass heads for this rank's and the outputs back) and returns the
// outputs before Wo for this rank's positions, [L, out_cols()] (s.ao at
// sp 1, s.lqk under sp, s.comb in pairs mode). Each head's forward state
// stays in its scratch slot.
template <class T>
const T* ReformerModel<T>::attend_pass(int l, int pass, uint64_t step, bool rehash) {
  Scratch& s = *s_;
  project_pass(l, pass);
  // LSH heads that keep their sorted orders are hashed and sorted for the
  // whole pass first, in one sort.
  const bool hashed = rehash && s.kinds[size_t(l)]->hash_pass(pass * Hp_, Hp_, s.qk.data(), step);
  for (int j = 0; j < Hp_; ++j) {
    const int64_t c = int64_t(j) * dh_;
    s.kinds[size_t(l)]->forward(pass * Hp_ + j, qkv_at(s.qk.data(), c), qkv_at(s.v.data(), c),
                                ao_at(s.ao.data(), c), step, rehash && !hashed);
  }
  if (!s.exchange) return s.ao.data();
  // Pairs mode's parts combine in fp32 (combine_parts): they travel exact.
  s.exchange->to_sequence(s.ao.data(), s.lqk, g_ > 1 ? Wire::exact : Wire::operand,
                          s.stage(s.dao));
  return g_ > 1 ? combine_parts(l) : s.lqk;
}

// The projections of attention pass `pass` of layer l (attend_pass's
// first half): qk, v of the pass heads over the whole sequence.
template <class T>
void ReformerModel<T>::project_pass(int l, int pass) {
  Scratch& s = *s_;
  const PassWeights pw = pass_weights(l, pass);
  if (!pw.all) load_pass_weights(l, pass);
  const int N = shard_.size * Hp_ * dh_;
  if (!s.exchange) {
    project(l, pw.wq, pw.wv, N, s.qk.data(), s.v.data());
    return;
  }
  project(l, pw.wq, pw.wv, N, s.lqk, s.lv);
  s.exchange->to_heads(s.lqk, s.qk.data(), Wire::operand, s.stage(s.dao));
  s.exchange->to_heads(s.lv, s.v.data(), Wire::operand, s.stage(s.dao));
}

// From y1 in x1, the rebuilt x2 and the gradients dx1 (of y1) and dx2 (of
// y2, with the feed-forward part added): rebuilds x1 = y1 - Attn(LN_a(x2))
// with the saved bucket ids and adds Attn's part to dx2, pass by pass
// (LayerNorm's backward is linear in its incoming gradient); layer l's
// attention and LN_a gradients accumulate.
template <class T>
void ReformerModel<T>::attention_layer_backward(int l, uint64_t step, bool train, bool attend,
                                                bool rebuild_x1) {
  Scratch& s = *s_;
  const LayerTensors<T>& G = G_.layers[size_t(l)];
  if (s.sorted) {  // sort mode, pass by pass: rebuild its part of x1, then its backward
    const int HD = H_ * dh_, n = Hp_ * dh_;
    const int64_t w = int64_t(D_) * n;
    for (int pass = 0; pass < H_ / Hp_; ++pass) {
      const int64_t c0 = int64_t(pass) * n;
      const T* wo = attend_sorted(l, pass, step, /*rehash*/ false);
      if (rebuild_x1) add_output(l, s.ao.data(), wo, n, true, step, train);
      output_backward(l, s.ao.data(), wo, G.wo + c0 * D_, n, s.dao.data(), step, train);
      for (int j = 0; j < Hp_; ++j) {
        const int64_t c = int64_t(j) * dh_;
        s.sorted->backward_head(l, pass * Hp_ + j, j, s.qk.data() + c, s.v.data() + c, n,
                                s.ao.data() + c, s.dao.data() + c, s.dqk.data() + c,
                                s.dv.data() + c);
      }
      const T* wq = Hp_ < H_ ? s.wq.data() : P_.layers[size_t(l)].wqk;
      const T* wv = Hp_ < H_ ? s.wv.data() : P_.layers[size_t(l)].wv;
      if (Hp_ == H_) {  // the gradients accumulate in place
        project_backward(l, s.dqk.data(), s.dv.data(), wq, wv, G.wqk, G.wv, n);
        continue;
      }
      ops_.fill(s.gwq.data(), T(0), w);
      ops_.fill(s.gwv.data(), T(0), w);
      project_backward(l, s.dqk.data(), s.dv.data(), wq, wv, s.gwq.data(), s.gwv.data(), n);
      ops_.add_2d(G.wqk + c0, HD, s.gwq.data(), n, D_, n);
      ops_.add_2d(G.wv + c0, HD, s.gwv.data(), n, D_, n);
    }
    return;
  }
  AttentionKindImpl<T>& kind = *s.kinds[size_t(l)];
  const int n = Hp_ * dh_, N = shard_.size * n, No = out_cols();
  const int64_t w = int64_t(D_) * N;
  typename Scratch::Stash* k = s.stash_of(l, NL_);
  for (int pass = 0; pass < Hloc_ / Hp_; ++pass) {
    // Kept attention state: one pass at sp 1, its outputs in ao; or every
    // pass's outputs and log-sum-exps (a kept layer's under attn_stashed, a
    // stashed layer's), back into ao and the heads' slots after the
    // projections.
    const T* ao = s.ao.data();
    if (k) {
      const int64_t nl = s.attn.lse.size();
      project_pass(l, pass);
      const T* st = k->ao.data() + pass * s.ao_st_pass;
      if (s.ao_bf16)
        ops_.copy(s.ao.data(), st, s.ao_st_pass);
      else
        ops_.unstash(s.ao.data(), st, L_ * out_cols());
      ops_.copy(s.attn.lse.data(), k->lse.data() + pass * nl, nl);
    } else if (attend) {
      ao = attend_pass(l, pass, step, /*rehash*/ false);
    }
    const PassWeights pw = pass_weights(l, pass);
    if (rebuild_x1) add_output(l, ao, pw.wo, No, true, step, train);
    // dao of this rank's positions (lv under sp, exchanged into dao; in
    // pairs mode the combined heads' in lqk, split into parts).
    T* dao = !s.exchange ? s.dao.data() : g_ > 1 ? s.lqk : s.lv;
    if (!pw.wo_in_place) ops_.fill(pw.gwo, T(0), w);
    output_backward(l, ao, pw.wo, pw.gwo, No, dao, step, train);
    if (g_ > 1) parts_backward();
    else if (s.exchange)  // lqk's output rows were output_backward's last use of them
      s.exchange->to_heads(s.lv, s.dao.data(), Wire::operand, s.stage(s.dqk));
    // Each head of the pass kept its forward state in its own slot; the
    // heads' column slices cover dqk and dv, so they write them (no zeroing).
    // With bf16 gradients a row holds the pass's n dqk values, then its n
    // dv values (grad_bf16): bf16 element c of dqk is float c / 2.
    T* dv_all = s.grad_bf16 ? s.dqk.data() + n / 2 : s.dv.data();
    for (int j = 0; j < Hp_; ++j) {
      const int64_t c = int64_t(j) * dh_;
      kind.backward(pass * Hp_ + j, qkv_at(s.qk.data(), c), qkv_at(s.v.data(), c),
                    ao_at(s.ao.data(), c), s.dao.data() + c,
                    element_at(s.dqk.data(), c, s.grad_bf16), element_at(dv_all, c, s.grad_bf16),
                    /*accumulate*/ false);
    }
    const T *dqk = s.dqk.data(), *dv = dv_all;
    if (s.exchange) {
      s.exchange->to_sequence(s.dqk.data(), s.lqk, Wire::operand, s.stage(s.dao));
      s.exchange->to_sequence(s.dv.data(), s.lv, Wire::operand, s.stage(s.dao));
      dqk = s.lqk;
      dv = s.lv;
    }
    if (pw.all) {  // the gradients accumulate in place
      project_backward(l, dqk, dv, pw.wq, pw.wv, G.wqk, G.wv, N);
      continue;
    }
    ops_.fill(s.gwq.data(), T(0), w);
    ops_.fill(s.gwv.data(), T(0), w);
    project_backward(l, dqk, dv, pw.wq, pw.wv, s.gwq.data(), s.gwv.data(), N);
    add_pass_gradients(l, pass);
  }
}

// x2 += FFN(LN_f(y1)), or -= when `subtract`, for the `rows` positions
// starting at local row row0 (y1 and x2 point at row0). Leaves fln, fh, fa
// for ffn_chunk_backward.
template <class T>
void ReformerModel<T>::ffn_chunk(int l, const T* y1, T* x2, bool subtract, int64_t rows,
                                 int64_t row0, uint64_t step, bool train, const T* x2_in) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const typename Scratch::FfnState st = s.ffn_state(s.kept_of(l, NL_), row0);
  const Activation act = cfg_.model.activation;
  const float eps = float(cfg_.model.layernorm_eps);
  if (!(train && cfg_.model.dropout > 0)) {
    ops_.layernorm_ffn_forward(x2, st.h, st.a, st.ln, st.mean, st.rstd, y1, P.ln_f_w, P.ln_f_b,
                               P.w1, P.b1, P.w2, P.b2, rows, D_, F_, act, eps,
                               subtract ? -1.0f : 1.0f, /*accumulate=*/true, x2_in);
    return;
  }
  T* g = s.fg.data();
  ops_.layernorm_ffn_forward(g, st.h, st.a, st.ln, st.mean, st.rstd, y1, P.ln_f_w, P.ln_f_b,
                             P.w1, P.b1, P.w2, P.b2, rows, D_, F_, act, eps, 1.0f,
                             /*accumulate=*/false, nullptr);
  ops_.dropout(x2, g, rows * D_, float(cfg_.model.dropout), cfg_.training.seed, step, l, kSiteFFN,
               (pos0_ + row0) * D_, subtract ? -1.0f : 1.0f, /*accumulate=*/true, x2_in);
}

// dy1 += d FFN(LN_f(y1)) / dy1 applied to dg (the gradient of the chunk's
// output after dropout); parameter gradients accumulate. Expects the state
// ffn_chunk left for the same chunk: just before, or kept since the forward
// (a kept layer). dg is only read (dropped out into scratch under dropout).
template <class T>
void ReformerModel<T>::ffn_chunk_backward(int l, const T* y1, const T* dg, T* dy1, int64_t rows,
                                          int64_t row0, uint64_t step, bool train) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const LayerTensors<T>& G = G_.layers[size_t(l)];
  const T* dgd = dg;
  if (train && cfg_.model.dropout > 0) {
    ops_.dropout(s.dfg.data(), dg, rows * D_, float(cfg_.model.dropout), cfg_.training.seed,
                 step, l, kSiteFFN, (pos0_ + row0) * D_, 1.0f, /*accumulate=*/false, nullptr);
    dgd = s.dfg.data();
  }
  // dfln is written, not added to: no zeroing first. fh and fa are consumed.
  typename Scratch::Kept* k = s.kept_of(l, NL_);
  const typename Scratch::FfnState st = s.ffn_state(k, row0);
  if (k && !s.ln_kept)
    ops_.layernorm_ffn_rows(st.ln, st.mean, st.rstd, y1, P.ln_f_w, P.ln_f_b, rows, D_, F_,
                            float(cfg_.model.layernorm_eps));
  if (k && s.ffn_rebuilt) ops_.ffn_rebuild(st.a, st.h, rows, D_, F_, cfg_.model.activation);
  ops_.layernorm_ffn_backward(dy1, G.ln_f_w, G.ln_f_b, G.w1, G.b1, G.w2, G.b2, dgd, st.ln,
                              s.dfln.data(), st.h, st.a, y1, P.ln_f_w, st.mean, st.rstd, P.w1,
                              P.w2, rows, D_, F_, cfg_.model.activation);
}

// Output LayerNorm over concat(y1, y2), head and loss, in position chunks.
// With `backward`, writes dx1 / dx2 (the gradients of y1 / y2) and
// accumulates the head's parameter gradients.
template <class T>
LossStats ReformerModel<T>::head(const int32_t* targets, bool backward, T grad_scale,
                                 std::vector<T>* logits_out) {
  Scratch& s = *s_;
  const T *lnw = P_.ln_out_w, *lnb = P_.ln_out_b, *hw = P_.head_w, *hb = P_.head_b;
  T *glnw = G_.ln_out_w, *glnb = G_.ln_out_b, *ghw = G_.head_w, *ghb = G_.head_b;
  const int D2 = 2 * D_;
  ops_.from_host_i32(s.targets.data(), targets, L_);
  if (logits_out) logits_out->assign(size_t(L_ * V_), T(0));
  LossStats st;
  std::vector<T> loss(size_t(s.oc));
  std::vector<int32_t> pred(size_t(s.oc));
  for (int64_t r0 = 0; r0 < L_; r0 += s.oc) {
    const int64_t rows = std::min<int64_t>(s.oc, L_ - r0);
    ops_.copy_2d(s.cat.data(), D2, s.x1.data() + r0 * D_, D_, rows, D_);
    ops_.copy_2d(s.cat.data() + D_, D2, s.x2.data() + r0 * D_, D_, rows, D_);
    ops_.layernorm_forward(s.oln.data(), s.omean.data(), s.orstd.data(), s.cat.data(), lnw, lnb,
                           rows, D2, float(cfg_.model.layernorm_eps));
    ops_.matmul_forward(s.logits.data(), s.oln.data(), hw, hb, rows, D2, V_);
    if (logits_out) ops_.to_host(logits_out->data() + r0 * V_, s.logits.data(), rows * V_);
    ops_.argmax_rows(s.pred.data(), s.logits.data(), rows, V_);
    ops_.softmax_cross_entropy(s.loss.data(), backward ? s.logits.data() : nullptr,
                               s.logits.data(), s.targets.data() + r0, rows, V_, grad_scale);
    ops_.to_host(loss.data(), s.loss.data(), rows);
    ops_.to_host_i32(pred.data(), s.pred.data(), rows);
    for (int64_t i = 0; i < rows; ++i) {
      const int32_t t = targets[r0 + i];
      if (t < 0) continue;
      st.loss_sum += double(loss[size_t(i)]);
      st.count += 1;
      st.correct += pred[size_t(i)] == t ? 1 : 0;
    }
    if (backward) {
      ops_.matmul_backward(s.doln.data(), ghw, ghb, s.logits.data(), s.oln.data(), hw, rows, D2,
                           V_, /*add_dinp=*/false);
      ops_.fill(s.dcat.data(), T(0), rows * D2);
      ops_.layernorm_backward(s.dcat.data(), glnw, glnb, s.doln.data(), s.cat.data(), lnw,
                              s.omean.data(), s.orstd.data(), rows, D2);
      // The chunks' rows cover [0, L) once: dx1 and dx2 are written, not added to.
      ops_.copy_2d(s.dx1.data() + r0 * D_, D_, s.dcat.data(), D2, rows, D_);
      ops_.copy_2d(s.dx2.data() + r0 * D_, D_, s.dcat.data() + D_, D2, rows, D_);
    }
  }
  return st;
}

// From the top activations (x1, x2 = y1, y2 of the last layer) and their
// gradients (dx1, dx2), walks the layers down, rebuilding each layer's inputs
// in place and accumulating parameter gradients; ends with the embedding.
template <class T>
void ReformerModel<T>::stack_backward(uint64_t step, bool train) {
  Scratch& s = *s_;
  const int64_t LD = L_ * D_;
  for (int l = NL_ - 1; l >= 0; --l) {
    // y2 = x2 + FFN(LN_f(y1)): rebuild x2, then dy1 += FFN'(y1)^T dy2. A
    // kept layer has the feed-forward state and its inputs: x2, x1 swapped in.
    typename Scratch::Kept* k = s.kept_of(l, NL_);
    for (int64_t r0 = 0; r0 < L_; r0 += s.fc) {
      const int64_t rows = std::min<int64_t>(s.fc, L_ - r0);
      if (!k)
        ffn_chunk(l, s.x1.data() + r0 * D_, s.x2.data() + r0 * D_, /*subtract*/ true, rows, r0,
                  step, train);
      ffn_chunk_backward(l, s.x1.data() + r0 * D_, s.dx2.data() + r0 * D_, s.dx1.data() + r0 * D_,
                         rows, r0, step, train);
    }
    if (k) std::swap(s.x2, k->x2);
    // y1 = x1 + Attn(LN_a(x2)): rebuild x1 (unless kept), then dx2 +=
    // Attn'(x2)^T dy1.
    const bool x1_kept = k && s.x1_kept;
    if (k && s.attn_kept) s.swap_attention(*k);
    attention_layer_backward(l, step, train, /*attend*/ !(k && s.attn_kept),
                             /*rebuild_x1*/ !x1_kept);
    if (k && s.attn_kept) s.swap_attention(*k);
    if (x1_kept) std::swap(s.x1, k->x1);
    if (trace) {
      trace->rebuilt_x1[size_t(l)].resize(size_t(LD));
      trace->rebuilt_x2[size_t(l)].resize(size_t(LD));
      ops_.to_host(trace->rebuilt_x1[size_t(l)].data(), s.x1.data(), LD);
      ops_.to_host(trace->rebuilt_x2[size_t(l)].data(), s.x2.data(), LD);
    }
    grads_ready(layer_range(table_, l));
  }
  // x1 = x2 = embed(tokens): its gradient is dx1 + dx2.
  ops_.add(s.dx1.data(), s.dx1.data(), s.dx2.data(), LD);
  ops_.embedding_backward(G_.tokens, G_.axial1, G_.axial2, s.dx1.data(), s.tokens.data(), L_, D_,
                          d1_, a2_, pos0_);
  grads_ready(embedding_range(table_));
}

// Embeds the tokens and runs every layer forward; leaves (y1, y2) of the
// last layer in x1, x2 and each LSH layer's bucket ids in scratch.
template <class T>
void ReformerModel<T>::stack_forward(const int32_t* tokens, uint64_t step, bool train) {
  Scratch& s = *s_;
  const int64_t LD = L_ * D_;
  embed(tokens);
  if (trace) {
    for (auto* v : {&trace->forward_x1, &trace->forward_x2, &trace->rebuilt_x1, &trace->rebuilt_x2})
      v->assign(size_t(NL_), {});
  }
  for (int l = 0; l < NL_; ++l) {
    if (trace) {
      trace->forward_x1[size_t(l)].resize(size_t(LD));
      trace->forward_x2[size_t(l)].resize(size_t(LD));
      ops_.to_host(trace->forward_x1[size_t(l)].data(), s.x1.data(), LD);
      ops_.to_host(trace->forward_x2[size_t(l)].data(), s.x2.data(), LD);
    }
    // A kept layer's inputs stay where they are: x1 (then x2) trades its
    // buffer with the kept one, and the layer writes y1 = x1 + Attn, y2 = x2
    // + FFN into the traded-in buffers from the kept inputs (no copies);
    // without kept x1 (model.kept_x1: rebuilt) y1 is written over x1.
    typename Scratch::Kept* k = s.kept_of(l, NL_);
    const bool x1_kept = k && s.x1_kept;
    if (x1_kept) std::swap(s.x1, k->x1);
    if (k && s.attn_kept) s.swap_attention(*k);
    attention_layer_forward(l, step, train, x1_kept ? k->x1.data() : nullptr);
    if (k && s.attn_kept) s.swap_attention(*k);
    if (k) std::swap(s.x2, k->x2);
    for (int64_t r0 = 0; r0 < L_; r0 += s.fc) {
      const int64_t rows = std::min<int64_t>(s.fc, L_ - r0);
      ffn_chunk(l, s.x1.data() + r0 * D_, s.x2.data() + r0 * D_, /*subtract*/ false, rows, r0,
                step, train, k ? k->x2.data() + r0 * D_ : nullptr);
    }
  }
}

template <class T>
LossStats ReformerModel<T>::forward_backward(const int32_t* tokens, const int32_t* targets,
                                             uint64_t step, bool backward, bool train,
                                             T grad_scale) {
  s_->keeping = backward;
  stack_forward(tokens, step, train);
  const LossStats st = head(targets, backward, grad_scale, nullptr);
  if (backward) {
    grads_ready(head_range(table_));
    stack_backward(step, train);
  }
  return st;
}

template <class T>
void ReformerModel<T>::forward_logits(const int32_t* tokens, uint64_t step,
                                      std::vector<T>* logits) {
  std::vector<int32_t> no_targets(size_t(L_), -1);
  s_->keeping = false;
  stack_forward(tokens, step, /*train*/ false);
  head(no_targets.data(), false, T(0), logits);
}

template class ReformerModel<float>;
template class ReformerModel<double>;

}  // namespace reformer
