#include "framework/model.h"

#include <algorithm>
#include <memory>
#include <numeric>

#include "framework/attention.h"
#include "framework/sequence_parallel.h"
#include "kernels/errors.h"
#include "kernels/common/philox.h"

namespace reformer {

namespace {
// Dropout sites (part of the dropout RNG key).
constexpr int kSiteAttention = 0;
constexpr int kSiteFFN = 1;
}  // namespace

// Activation buffers for one rank's shard of a sequence; sizes in elements.
// Under sequence parallelism attention runs over the whole sequence for the
// heads this rank owns: the h* buffers hold those [Lfull, Hloc * dh] views
// (they alias the [L, H * dh] ones when one rank holds everything).
template <class T>
struct ReformerModel<T>::Scratch {
  IntBuffer<T> tokens, targets;          // [L]
  Buffer<T> x1, x2, dx1, dx2;            // residual streams and their gradients [L, D]
  Buffer<T> ln, ln_mean, ln_rstd;        // LN_a output [L, D], stats [L]
  Buffer<T> dln;                         // [L, D]
  Buffer<T> branch, dbranch;             // attention branch output and its gradient [L, D]
  Buffer<T> qk, v, ao, dqk, dv, dao;     // [L, H * dh]
  Buffer<T> hbuf;                        // head-sharded twins, 6 x [Lfull, Hloc * dh] (sp > 1)
  T *hqk, *hv, *hao, *hdqk, *hdv, *hdao;
  std::unique_ptr<HeadExchange<T>> exchange;  // sp > 1
  AttentionScratch<T> attn;
  std::vector<std::unique_ptr<AttentionKindImpl<T>>> kinds;  // per layer
  Buffer<T> fln, fmean, frstd, fh, fa, fg, dfln, dfh, dfa, dfg;  // feed-forward chunk
  Buffer<T> cat, oln, omean, orstd, logits, loss, dcat, doln;    // output chunk
  IntBuffer<T> pred;                     // output chunk argmax [oc]
  int64_t fc = 0, oc = 0;
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
  Hloc_ = H_ / shard.size;
  dh_ = cfg.head_dim();
  F_ = m.d_ff;
  V_ = m.vocab_size;
  NL_ = m.n_layers;
  d1_ = m.axial_dims[0];
  a2_ = m.axial_shape[1];
  const int HD = H_ * dh_;

  table_ = model_param_table(cfg);
  params_ = Buffer<T>(ops, table_.total());
  grads_ = Buffer<T>(ops, table_.total());
  ops.fill(grads_.data(), T(0), table_.total());
  P_ = bind_tensors(table_, params_.data(), NL_);
  G_ = bind_tensors(table_, grads_.data(), NL_);

  s_ = new Scratch;
  Scratch& s = *s_;
  const int64_t LD = L_ * D_, LHD = L_ * HD;
  s.tokens = IntBuffer<T>(ops, L_);
  s.targets = IntBuffer<T>(ops, L_);
  for (Buffer<T>* b : {&s.x1, &s.x2, &s.dx1, &s.dx2, &s.ln, &s.dln, &s.branch, &s.dbranch})
    *b = Buffer<T>(ops, LD);
  s.ln_mean = Buffer<T>(ops, L_);
  s.ln_rstd = Buffer<T>(ops, L_);
  for (Buffer<T>* b : {&s.qk, &s.v, &s.ao, &s.dqk, &s.dv, &s.dao}) *b = Buffer<T>(ops, LHD);
  T** heads[] = {&s.hqk, &s.hv, &s.hao, &s.hdqk, &s.hdv, &s.hdao};
  if (shard.size > 1) {
    const int64_t n = Lfull_ * Hloc_ * dh_;
    s.hbuf = Buffer<T>(ops, 6 * n);
    for (int i = 0; i < 6; ++i) *heads[i] = s.hbuf.data() + i * n;
    s.exchange = std::make_unique<HeadExchange<T>>(ops, *shard.comm, L_, H_, dh_);
  } else {
    Buffer<T>* local[] = {&s.qk, &s.v, &s.ao, &s.dqk, &s.dv, &s.dao};
    for (int i = 0; i < 6; ++i) *heads[i] = local[i]->data();
  }

  // Attention kinds and the scratch they share.
  bool any_lsh = false;
  for (int l = 0; l < NL_; ++l) any_lsh |= uses_lsh(cfg, l, Lfull_);
  const int nh = cfg.attention.n_hashes;
  s.attn.rounds = any_lsh ? nh : 1;
  s.attn.out_r = Buffer<T>(ops, int64_t(Hloc_) * s.attn.rounds * Lfull_ * dh_);
  s.attn.lse = Buffer<T>(ops, int64_t(Hloc_) * s.attn.rounds * Lfull_);
  if (any_lsh) {
    s.attn.rot = Buffer<T>(ops, int64_t(nh) * dh_ *
                                    rotation_cols(cfg.buckets(), cfg.bucket_factor0()));
    s.attn.perm = IntBuffer<T>(ops, int64_t(nh) * Lfull_);
  }
  s.attn.identity = IntBuffer<T>(ops, Lfull_);
  {
    std::vector<int32_t> id(static_cast<size_t>(Lfull_));
    std::iota(id.begin(), id.end(), 0);
    ops.from_host_i32(s.attn.identity.data(), id.data(), Lfull_);
  }
  for (int l = 0; l < NL_; ++l) {
    const AttentionShape shape{l, Lfull_, Hloc_, shard.rank * Hloc_, dh_, int64_t(Hloc_) * dh_};
    s.kinds.push_back(make_attention(cfg, shape, ops, s.attn));
  }

  s.fc = m.ffn_chunk > 0 ? std::min<int64_t>(m.ffn_chunk, L_) : L_;
  for (Buffer<T>* b : {&s.fln, &s.fg, &s.dfln, &s.dfg}) *b = Buffer<T>(ops, s.fc * D_);
  for (Buffer<T>* b : {&s.fh, &s.fa, &s.dfh, &s.dfa}) *b = Buffer<T>(ops, s.fc * F_);
  s.fmean = Buffer<T>(ops, s.fc);
  s.frstd = Buffer<T>(ops, s.fc);

  s.oc = m.loss_chunk > 0 ? std::min<int64_t>(m.loss_chunk, L_) : L_;
  for (Buffer<T>* b : {&s.cat, &s.oln, &s.dcat, &s.doln}) *b = Buffer<T>(ops, s.oc * 2 * D_);
  s.omean = Buffer<T>(ops, s.oc);
  s.orstd = Buffer<T>(ops, s.oc);
  s.logits = Buffer<T>(ops, s.oc * V_);
  s.loss = Buffer<T>(ops, s.oc);
  s.pred = IntBuffer<T>(ops, s.oc);
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

// Residual-branch dropout of layer l's attention output [L, D], keyed by
// global element offsets so every layout draws the same mask.
template <class T>
void ReformerModel<T>::branch_dropout(T* x, int l, uint64_t step, bool train) {
  if (train && cfg_.model.dropout > 0)
    ops_.dropout(x, L_ * D_, float(cfg_.model.dropout), cfg_.training.seed, step, l,
                 kSiteAttention, pos0_ * D_);
}

// out[L, D] = Attn(x) for layer l; x is LN_a's output. When `rehash`, the
// bucket ids of LSH layers are computed from this x and saved; otherwise the
// saved ones are reused (the backward recompute). Leaves the projections and
// the kind's saved state in scratch for attention_backward. Under sequence
// parallelism the projections are exchanged for this rank's heads over the
// whole sequence, attended, and exchanged back.
template <class T>
void ReformerModel<T>::attention_forward(int l, const T* x, T* out, uint64_t step, bool rehash) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const int HD = H_ * dh_;
  ops_.matmul_forward(s.qk.data(), x, P.wqk, nullptr, L_, D_, HD);
  ops_.matmul_forward(s.v.data(), x, P.wv, nullptr, L_, D_, HD);
  if (s.exchange) {
    s.exchange->to_heads(s.qk.data(), s.hqk);
    s.exchange->to_heads(s.v.data(), s.hv);
  }
  s.kinds[size_t(l)]->forward(s.hqk, s.hv, s.hao, step, rehash);
  if (s.exchange) s.exchange->to_sequence(s.hao, s.ao.data());
  ops_.matmul_forward(out, s.ao.data(), P.wo, nullptr, L_, HD, D_);
}

// dx += d Attn(x) / dx applied to dout; parameter gradients accumulate.
// Expects the scratch state of attention_forward(l, x, ...) just before.
template <class T>
void ReformerModel<T>::attention_backward(int l, const T* x, const T* dout, T* dx) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const LayerTensors<T>& G = G_.layers[size_t(l)];
  const int HD = H_ * dh_;
  const int64_t LHD = L_ * HD, hn = Lfull_ * Hloc_ * dh_;
  ops_.fill(s.dao.data(), T(0), LHD);
  ops_.matmul_backward(s.dao.data(), G.wo, nullptr, dout, s.ao.data(), P.wo, L_, HD, D_);
  if (s.exchange) s.exchange->to_heads(s.dao.data(), s.hdao);
  ops_.fill(s.hdqk, T(0), hn);
  ops_.fill(s.hdv, T(0), hn);
  s.kinds[size_t(l)]->backward(s.hqk, s.hv, s.hao, s.hdao, s.hdqk, s.hdv);
  if (s.exchange) {
    s.exchange->to_sequence(s.hdqk, s.dqk.data());
    s.exchange->to_sequence(s.hdv, s.dv.data());
  }
  ops_.matmul_backward(dx, G.wqk, nullptr, s.dqk.data(), x, P.wqk, L_, D_, HD);
  ops_.matmul_backward(dx, G.wv, nullptr, s.dv.data(), x, P.wv, L_, D_, HD);
}

// g[rows, D] = FFN(LN_f(y1)) for the `rows` positions starting at local row
// row0 (y1 points at row0). Leaves fln, fh, fa for ffn_chunk_backward.
template <class T>
void ReformerModel<T>::ffn_chunk(int l, const T* y1, T* g, int64_t rows, int64_t row0,
                                 uint64_t step, bool train) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  ops_.layernorm_forward(s.fln.data(), s.fmean.data(), s.frstd.data(), y1, P.ln_f_w, P.ln_f_b,
                         rows, D_, float(cfg_.model.layernorm_eps));
  ops_.matmul_forward(s.fh.data(), s.fln.data(), P.w1, P.b1, rows, D_, F_);
  ops_.activation_forward(s.fa.data(), s.fh.data(), rows * F_, cfg_.model.activation);
  ops_.matmul_forward(g, s.fa.data(), P.w2, P.b2, rows, F_, D_);
  if (train && cfg_.model.dropout > 0)
    ops_.dropout(g, rows * D_, float(cfg_.model.dropout), cfg_.training.seed, step, l, kSiteFFN,
                 (pos0_ + row0) * D_);
}

// dy1 += d FFN(LN_f(y1)) / dy1 applied to dg (the gradient of the chunk's
// output after dropout); parameter gradients accumulate. Expects the scratch
// state of ffn_chunk on the same chunk just before. dg is consumed.
template <class T>
void ReformerModel<T>::ffn_chunk_backward(int l, const T* y1, const T* dg, T* dy1, int64_t rows,
                                          int64_t row0, uint64_t step, bool train) {
  Scratch& s = *s_;
  const LayerTensors<T>& P = P_.layers[size_t(l)];
  const LayerTensors<T>& G = G_.layers[size_t(l)];
  T* dgd = s.dfg.data();
  ops_.copy(dgd, dg, rows * D_);
  if (train && cfg_.model.dropout > 0)
    ops_.dropout(dgd, rows * D_, float(cfg_.model.dropout), cfg_.training.seed, step, l, kSiteFFN,
                 (pos0_ + row0) * D_);
  ops_.fill(s.dfa.data(), T(0), rows * F_);
  ops_.matmul_backward(s.dfa.data(), G.w2, G.b2, dgd, s.fa.data(), P.w2, rows, F_, D_);
  ops_.fill(s.dfh.data(), T(0), rows * F_);
  ops_.activation_backward(s.dfh.data(), s.dfa.data(), s.fh.data(), rows * F_, cfg_.model.activation);
  ops_.fill(s.dfln.data(), T(0), rows * D_);
  ops_.matmul_backward(s.dfln.data(), G.w1, G.b1, s.dfh.data(), s.fln.data(), P.w1, rows, D_, F_);
  ops_.layernorm_backward(dy1, G.ln_f_w, G.ln_f_b, s.dfln.data(), y1, P.ln_f_w, s.fmean.data(),
                          s.frstd.data(), rows, D_);
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
  if (backward) {
    ops_.fill(s.dx1.data(), T(0), L_ * D_);
    ops_.fill(s.dx2.data(), T(0), L_ * D_);
  }
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
      ops_.fill(s.doln.data(), T(0), rows * D2);
      ops_.matmul_backward(s.doln.data(), ghw, ghb, s.logits.data(), s.oln.data(), hw, rows, D2,
                           V_);
      ops_.fill(s.dcat.data(), T(0), rows * D2);
      ops_.layernorm_backward(s.dcat.data(), glnw, glnb, s.doln.data(), s.cat.data(), lnw,
                              s.omean.data(), s.orstd.data(), rows, D2);
      ops_.add_2d(s.dx1.data() + r0 * D_, D_, s.dcat.data(), D2, rows, D_);
      ops_.add_2d(s.dx2.data() + r0 * D_, D_, s.dcat.data() + D_, D2, rows, D_);
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
    const LayerTensors<T>& P = P_.layers[size_t(l)];
    const LayerTensors<T>& G = G_.layers[size_t(l)];
    // y2 = x2 + FFN(LN_f(y1)): rebuild x2, then dy1 += FFN'(y1)^T dy2.
    for (int64_t r0 = 0; r0 < L_; r0 += s.fc) {
      const int64_t rows = std::min<int64_t>(s.fc, L_ - r0);
      ffn_chunk(l, s.x1.data() + r0 * D_, s.fg.data(), rows, r0, step, train);
      ops_.sub(s.x2.data() + r0 * D_, s.x2.data() + r0 * D_, s.fg.data(), rows * D_);
      ffn_chunk_backward(l, s.x1.data() + r0 * D_, s.dx2.data() + r0 * D_, s.dx1.data() + r0 * D_,
                         rows, r0, step, train);
    }
    // y1 = x1 + Attn(LN_a(x2)): rebuild x1, then dx2 += Attn'(x2)^T dy1.
    ops_.layernorm_forward(s.ln.data(), s.ln_mean.data(), s.ln_rstd.data(), s.x2.data(), P.ln_a_w,
                           P.ln_a_b, L_, D_, float(cfg_.model.layernorm_eps));
    attention_forward(l, s.ln.data(), s.branch.data(), step, /*rehash*/ false);
    branch_dropout(s.branch.data(), l, step, train);
    ops_.sub(s.x1.data(), s.x1.data(), s.branch.data(), LD);
    if (trace) {
      trace->rebuilt_x1[size_t(l)].resize(size_t(LD));
      trace->rebuilt_x2[size_t(l)].resize(size_t(LD));
      ops_.to_host(trace->rebuilt_x1[size_t(l)].data(), s.x1.data(), LD);
      ops_.to_host(trace->rebuilt_x2[size_t(l)].data(), s.x2.data(), LD);
    }
    ops_.copy(s.dbranch.data(), s.dx1.data(), LD);
    branch_dropout(s.dbranch.data(), l, step, train);
    ops_.fill(s.dln.data(), T(0), LD);
    attention_backward(l, s.ln.data(), s.dbranch.data(), s.dln.data());
    ops_.layernorm_backward(s.dx2.data(), G.ln_a_w, G.ln_a_b, s.dln.data(), s.x2.data(), P.ln_a_w,
                            s.ln_mean.data(), s.ln_rstd.data(), L_, D_);
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
    const LayerTensors<T>& P = P_.layers[size_t(l)];
    if (trace) {
      trace->forward_x1[size_t(l)].resize(size_t(LD));
      trace->forward_x2[size_t(l)].resize(size_t(LD));
      ops_.to_host(trace->forward_x1[size_t(l)].data(), s.x1.data(), LD);
      ops_.to_host(trace->forward_x2[size_t(l)].data(), s.x2.data(), LD);
    }
    ops_.layernorm_forward(s.ln.data(), s.ln_mean.data(), s.ln_rstd.data(), s.x2.data(), P.ln_a_w,
                           P.ln_a_b, L_, D_, float(cfg_.model.layernorm_eps));
    attention_forward(l, s.ln.data(), s.branch.data(), step, /*rehash*/ true);
    branch_dropout(s.branch.data(), l, step, train);
    ops_.add(s.x1.data(), s.x1.data(), s.branch.data(), LD);
    for (int64_t r0 = 0; r0 < L_; r0 += s.fc) {
      const int64_t rows = std::min<int64_t>(s.fc, L_ - r0);
      ffn_chunk(l, s.x1.data() + r0 * D_, s.fg.data(), rows, r0, step, train);
      ops_.add(s.x2.data() + r0 * D_, s.x2.data() + r0 * D_, s.fg.data(), rows * D_);
    }
  }
}

template <class T>
LossStats ReformerModel<T>::forward_backward(const int32_t* tokens, const int32_t* targets,
                                             uint64_t step, bool backward, bool train,
                                             T grad_scale) {
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
  stack_forward(tokens, step, /*train*/ false);
  head(no_targets.data(), false, T(0), logits);
}

template class ReformerModel<float>;
template class ReformerModel<double>;

}  // namespace reformer
