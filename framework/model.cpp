#include "framework/model.h"

#include <algorithm>
#include <numeric>

#include "kernels/errors.h"
#include "kernels/common/philox.h"

namespace reformer {

namespace {
enum class Kind { lsh, full, local };
Kind parse_kind(const std::string& s) {
  if (s == "lsh") return Kind::lsh;
  if (s == "full") return Kind::full;
  return Kind::local;
}
// The attention kind layer l runs (one chunk makes any kind exact
// attention) and the chunk geometry shared by its kinds.
AttentionParams attention_setup(const Config& cfg, int l, int64_t L, int dh, int HD, Kind* kind) {
  const AttentionConfig& ac = cfg.attention;
  *kind = parse_kind(to_string(cfg.attention_kind(l)));
  if (*kind != Kind::full && L <= ac.bucket_size) *kind = Kind::full;
  AttentionParams ap;
  ap.L = L;
  ap.dh = dh;
  ap.ld = HD;
  ap.chunk = ac.bucket_size;
  ap.chunks_before = ac.chunks_before;
  ap.chunks_after = ac.chunks_after;
  ap.causal = ac.causal;
  return ap;
}
// Dropout sites (part of the dropout RNG key).
constexpr int kSiteAttention = 0;
constexpr int kSiteFFN = 1;
}  // namespace

template <class T>
struct ReformerModel<T>::Layer {
  T *ln_a_w, *ln_a_b, *wqk, *wv, *wo, *ln_f_w, *ln_f_b, *w1, *b1, *w2, *b2;
};

// Activation buffers for one sequence; sizes in elements.
template <class T>
struct ReformerModel<T>::Scratch {
  IntBuffer<T> tokens, targets;          // [L]
  Buffer<T> x1, x2, dx1, dx2;            // residual streams and their gradients [L, D]
  Buffer<T> ln, ln_mean, ln_rstd;        // LN_a output [L, D], stats [L]
  Buffer<T> dln;                         // [L, D]
  Buffer<T> branch, dbranch;             // attention branch output and its gradient [L, D]
  Buffer<T> qk, v, ao, dqk, dv, dao;     // [L, H * dh]
  Buffer<T> out_r, lse;                  // per head [H, rounds, L, dh], [H, rounds, L]
  Buffer<T> rot;                         // rotations of one head [n_hashes, dh, nb / 2]
  IntBuffer<T> perm, identity;           // [n_hashes, L], [L]
  std::vector<IntBuffer<T>> buckets;     // per layer [H, n_hashes, L] (LSH layers)
  Buffer<T> fln, fmean, frstd, fh, fa, fg, dfln, dfh, dfa, dfg;  // feed-forward chunk
  Buffer<T> cat, oln, omean, orstd, logits, loss, dcat, doln;    // output chunk
  IntBuffer<T> pred;                     // output chunk argmax [oc]
  int64_t fc = 0, oc = 0, rounds = 1;
};

template <class T>
ReformerModel<T>::ReformerModel(const Config& cfg, Ops<T>& ops) : cfg_(cfg), ops_(ops) {
  const ModelConfig& m = cfg.model;
  L_ = m.max_len;
  D_ = m.d_model;
  H_ = m.n_heads;
  dh_ = cfg.head_dim();
  F_ = m.d_ff;
  V_ = m.vocab_size;
  NL_ = m.n_layers;
  REFORMER_REQUIRE(m.axial_shape.size() == 2 && m.axial_dims.size() == 2, ShapeError,
                   "axial shape and dims must be resolved (validate the config)");
  d1_ = m.axial_dims[0];
  a2_ = m.axial_shape[1];
  nb_ = cfg.buckets();
  f0_ = cfg.bucket_factor0();
  const int HD = H_ * dh_;

  // Parameter layout; names are the checkpoint's dataset names.
  const double sd = m.init_std;
  table_.add("embed.tokens", {V_, D_}, InitKind::normal, sd, false);
  table_.add("embed.axial1", {m.axial_shape[0], d1_}, InitKind::normal, m.axial_init_std, false);
  table_.add("embed.axial2", {a2_, D_ - d1_}, InitKind::normal, m.axial_init_std, false);
  for (int l = 0; l < NL_; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    table_.add(p + "ln_a.weight", {D_}, InitKind::ones, 0, false);
    table_.add(p + "ln_a.bias", {D_}, InitKind::zeros, 0, false);
    table_.add(p + "attn.wqk", {D_, HD}, InitKind::normal, sd, true);
    table_.add(p + "attn.wv", {D_, HD}, InitKind::normal, sd, true);
    table_.add(p + "attn.wo", {HD, D_}, InitKind::normal, sd, true);
    table_.add(p + "ln_f.weight", {D_}, InitKind::ones, 0, false);
    table_.add(p + "ln_f.bias", {D_}, InitKind::zeros, 0, false);
    table_.add(p + "ffn.w1", {D_, F_}, InitKind::normal, sd, true);
    table_.add(p + "ffn.b1", {F_}, InitKind::zeros, 0, false);
    table_.add(p + "ffn.w2", {F_, D_}, InitKind::normal, sd, true);
    table_.add(p + "ffn.b2", {D_}, InitKind::zeros, 0, false);
  }
  table_.add("ln_out.weight", {2 * D_}, InitKind::ones, 0, false);
  table_.add("ln_out.bias", {2 * D_}, InitKind::zeros, 0, false);
  table_.add("head.weight", {2 * D_, V_}, InitKind::normal, sd, true);
  table_.add("head.bias", {V_}, InitKind::zeros, 0, false);
  params_ = Buffer<T>(ops, table_.total());
  grads_ = Buffer<T>(ops, table_.total());
  ops.fill(grads_.data(), T(0), table_.total());

  s_ = new Scratch;
  Scratch& s = *s_;
  const int64_t LD = L_ * D_, LHD = L_ * HD;
  bool any_lsh = false;
  for (int l = 0; l < NL_; ++l) any_lsh |= parse_kind(to_string(cfg.attention_kind(l))) == Kind::lsh;
  const int nh = cfg.attention.n_hashes;
  s.rounds = any_lsh ? nh : 1;
  s.tokens = IntBuffer<T>(ops, L_);
  s.targets = IntBuffer<T>(ops, L_);
  for (Buffer<T>* b : {&s.x1, &s.x2, &s.dx1, &s.dx2, &s.ln, &s.dln, &s.branch, &s.dbranch})
    *b = Buffer<T>(ops, LD);
  s.ln_mean = Buffer<T>(ops, L_);
  s.ln_rstd = Buffer<T>(ops, L_);
  for (Buffer<T>* b : {&s.qk, &s.v, &s.ao, &s.dqk, &s.dv, &s.dao}) *b = Buffer<T>(ops, LHD);
  s.out_r = Buffer<T>(ops, int64_t(H_) * s.rounds * L_ * dh_);
  s.lse = Buffer<T>(ops, int64_t(H_) * s.rounds * L_);
  s.rot = Buffer<T>(ops, int64_t(nh) * dh_ * rotation_cols(nb_, f0_));
  s.perm = IntBuffer<T>(ops, int64_t(nh) * L_);
  s.identity = IntBuffer<T>(ops, L_);
  {
    std::vector<int32_t> id(static_cast<size_t>(L_));
    std::iota(id.begin(), id.end(), 0);
    ops.from_host_i32(s.identity.data(), id.data(), L_);
  }
  s.buckets.resize(size_t(NL_));
  for (int l = 0; l < NL_; ++l)
    if (parse_kind(to_string(cfg.attention_kind(l))) == Kind::lsh)
      s.buckets[size_t(l)] = IntBuffer<T>(ops, int64_t(H_) * nh * L_);

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
typename ReformerModel<T>::Layer ReformerModel<T>::layer_params(T* base, int l) const {
  // Offsets follow the declaration order in the constructor: 3 embedding
  // tables, then 11 tensors per layer.
  const auto& ps = table_.params();
  const size_t i = 3 + size_t(l) * 11;
  auto at = [&](size_t k) { return base + ps[i + k].offset; };
  return Layer{at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7), at(8), at(9), at(10)};
}

template <class T>
void ReformerModel<T>::init_params(uint64_t seed) {
  std::vector<T> host(size_t(table_.total()));
  const auto& ps = table_.params();
  for (size_t k = 0; k < ps.size(); ++k) {
    const ParamInfo& p = ps[k];
    T* dst = host.data() + p.offset;
    const RngKey key = make_key(seed, /*purpose: init*/ 2, k);
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
  const auto& ps = table_.params();
  ops_.embedding_forward(s.x1.data(), s.tokens.data(), params_.data() + ps[0].offset,
                         params_.data() + ps[1].offset, params_.data() + ps[2].offset, L_, D_,
                         d1_, a2_, /*pos_offset*/ 0);
  ops_.copy(s.x2.data(), s.x1.data(), L_ * D_);
}

// out[L, D] = Attn(x) for layer l; x is LN_a's output. When `rehash`, the
// bucket ids of LSH layers are computed from this x and saved; otherwise the
// saved ones are reused (the backward recompute). Leaves qk, v, ao, out_r and
// lse in scratch for attention_backward.
template <class T>
void ReformerModel<T>::attention_forward(int l, const T* x, T* out, uint64_t step, bool rehash) {
  Scratch& s = *s_;
  const Layer P = layer_params(params_.data(), l);
  const int HD = H_ * dh_;
  const AttentionConfig& ac = cfg_.attention;
  ops_.matmul_forward(s.qk.data(), x, P.wqk, nullptr, L_, D_, HD);
  ops_.matmul_forward(s.v.data(), x, P.wv, nullptr, L_, D_, HD);
  Kind kind;
  AttentionParams ap = attention_setup(cfg_, l, L_, dh_, HD, &kind);
  const int nh = ac.n_hashes;
  for (int h = 0; h < H_; ++h) {
    T* out_r = s.out_r.data() + int64_t(h) * s.rounds * L_ * dh_;
    T* lse = s.lse.data() + int64_t(h) * s.rounds * L_;
    const T* qk = s.qk.data() + h * dh_;
    const T* v = s.v.data() + h * dh_;
    T* ao = s.ao.data() + h * dh_;
    if (kind == Kind::full) {
      ops_.full_attention_forward(ao, lse, qk, v, ap);
    } else if (kind == Kind::local) {
      ap.n_rounds = 1;
      ap.wrap = false;
      ops_.chunked_attention_forward(ao, out_r, lse, qk, v, s.identity.data(), ap);
    } else {
      int32_t* buckets = s.buckets[size_t(l)].data() + int64_t(h) * nh * L_;
      if (rehash) {
        ops_.lsh_rotations(s.rot.data(), cfg_.training.seed, step, l, h, nh, dh_, nb_, f0_);
        ops_.lsh_hash(buckets, qk, HD, s.rot.data(), L_, dh_, nh, nb_, f0_);
      }
      ops_.lsh_sort(s.perm.data(), buckets, L_, nh, nb_);
      ap.n_rounds = nh;
      ap.wrap = true;
      ops_.chunked_attention_forward(ao, out_r, lse, qk, v, s.perm.data(), ap);
    }
  }
  ops_.matmul_forward(out, s.ao.data(), P.wo, nullptr, L_, HD, D_);
}

// dx += d Attn(x) / dx applied to dout; parameter gradients accumulate.
// Expects the scratch state of attention_forward(l, x, ...) just before.
template <class T>
void ReformerModel<T>::attention_backward(int l, const T* x, const T* dout, T* dx) {
  Scratch& s = *s_;
  const Layer P = layer_params(params_.data(), l);
  const Layer G = layer_params(grads_.data(), l);
  const int HD = H_ * dh_;
  const int64_t LHD = L_ * HD;
  const AttentionConfig& ac = cfg_.attention;
  ops_.fill(s.dao.data(), T(0), LHD);
  ops_.matmul_backward(s.dao.data(), G.wo, nullptr, dout, s.ao.data(), P.wo, L_, HD, D_);
  ops_.fill(s.dqk.data(), T(0), LHD);
  ops_.fill(s.dv.data(), T(0), LHD);
  Kind kind;
  AttentionParams ap = attention_setup(cfg_, l, L_, dh_, HD, &kind);
  const int nh = ac.n_hashes;
  for (int h = 0; h < H_; ++h) {
    const T* out_r = s.out_r.data() + int64_t(h) * s.rounds * L_ * dh_;
    const T* lse = s.lse.data() + int64_t(h) * s.rounds * L_;
    const int64_t c = h * dh_;
    if (kind == Kind::full) {
      ops_.full_attention_backward(s.dqk.data() + c, s.dv.data() + c, s.dao.data() + c,
                                   s.ao.data() + c, s.qk.data() + c, s.v.data() + c, lse, ap);
    } else {
      const int32_t* perm = s.identity.data();
      ap.n_rounds = 1;
      ap.wrap = false;
      if (kind == Kind::lsh) {
        ops_.lsh_sort(s.perm.data(), s.buckets[size_t(l)].data() + int64_t(h) * nh * L_, L_, nh,
                      nb_);
        perm = s.perm.data();
        ap.n_rounds = nh;
        ap.wrap = true;
      }
      ops_.chunked_attention_backward(s.dqk.data() + c, s.dv.data() + c, s.dao.data() + c,
                                      s.qk.data() + c, s.v.data() + c, perm, out_r, lse, ap);
    }
  }
  ops_.matmul_backward(dx, G.wqk, nullptr, s.dqk.data(), x, P.wqk, L_, D_, HD);
  ops_.matmul_backward(dx, G.wv, nullptr, s.dv.data(), x, P.wv, L_, D_, HD);
}

// g[rows, D] = FFN(LN_f(y1)) for the `rows` positions starting at row0
// (y1 points at row0). Leaves fln, fh, fa for ffn_chunk_backward.
template <class T>
void ReformerModel<T>::ffn_chunk(int l, const T* y1, T* g, int64_t rows, int64_t row0,
                                 uint64_t step, bool train) {
  Scratch& s = *s_;
  const Layer P = layer_params(params_.data(), l);
  const Activation act = cfg_.model.activation;
  ops_.layernorm_forward(s.fln.data(), s.fmean.data(), s.frstd.data(), y1, P.ln_f_w, P.ln_f_b,
                         rows, D_, float(cfg_.model.layernorm_eps));
  ops_.matmul_forward(s.fh.data(), s.fln.data(), P.w1, P.b1, rows, D_, F_);
  ops_.activation_forward(s.fa.data(), s.fh.data(), rows * F_, act);
  ops_.matmul_forward(g, s.fa.data(), P.w2, P.b2, rows, F_, D_);
  if (train && cfg_.model.dropout > 0)
    ops_.dropout(g, rows * D_, float(cfg_.model.dropout), cfg_.training.seed, step, l, kSiteFFN,
                 row0 * D_);
}

// dy1 += d FFN(LN_f(y1)) / dy1 applied to dg (the gradient of the chunk's
// output after dropout); parameter gradients accumulate. Expects the scratch
// state of ffn_chunk on the same chunk just before. dg is consumed.
template <class T>
void ReformerModel<T>::ffn_chunk_backward(int l, const T* y1, const T* dg, T* dy1, int64_t rows,
                                          int64_t row0, uint64_t step, bool train) {
  Scratch& s = *s_;
  const Layer P = layer_params(params_.data(), l);
  const Layer G = layer_params(grads_.data(), l);
  const Activation act = cfg_.model.activation;
  T* dgd = s.dfg.data();
  ops_.copy(dgd, dg, rows * D_);
  if (train && cfg_.model.dropout > 0)
    ops_.dropout(dgd, rows * D_, float(cfg_.model.dropout), cfg_.training.seed, step, l, kSiteFFN,
                 row0 * D_);
  ops_.fill(s.dfa.data(), T(0), rows * F_);
  ops_.matmul_backward(s.dfa.data(), G.w2, G.b2, dgd, s.fa.data(), P.w2, rows, F_, D_);
  ops_.fill(s.dfh.data(), T(0), rows * F_);
  ops_.activation_backward(s.dfh.data(), s.dfa.data(), s.fh.data(), rows * F_, act);
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
  const auto& ps = table_.params();
  const size_t k = 3 + size_t(NL_) * 11;
  const T* lnw = params_.data() + ps[k].offset;
  const T* lnb = params_.data() + ps[k + 1].offset;
  const T* hw = params_.data() + ps[k + 2].offset;
  const T* hb = params_.data() + ps[k + 3].offset;
  T* glnw = grads_.data() + ps[k].offset;
  T* glnb = grads_.data() + ps[k + 1].offset;
  T* ghw = grads_.data() + ps[k + 2].offset;
  T* ghb = grads_.data() + ps[k + 3].offset;
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
  const float p = float(cfg_.model.dropout);
  for (int l = NL_ - 1; l >= 0; --l) {
    const Layer P = layer_params(params_.data(), l);
    const Layer G = layer_params(grads_.data(), l);
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
    if (train && p > 0)
      ops_.dropout(s.branch.data(), LD, p, cfg_.training.seed, step, l, kSiteAttention, 0);
    ops_.sub(s.x1.data(), s.x1.data(), s.branch.data(), LD);
    if (trace) {
      trace->rebuilt_x1[size_t(l)].resize(size_t(LD));
      trace->rebuilt_x2[size_t(l)].resize(size_t(LD));
      ops_.to_host(trace->rebuilt_x1[size_t(l)].data(), s.x1.data(), LD);
      ops_.to_host(trace->rebuilt_x2[size_t(l)].data(), s.x2.data(), LD);
    }
    ops_.copy(s.dbranch.data(), s.dx1.data(), LD);
    if (train && p > 0)
      ops_.dropout(s.dbranch.data(), LD, p, cfg_.training.seed, step, l, kSiteAttention, 0);
    ops_.fill(s.dln.data(), T(0), LD);
    attention_backward(l, s.ln.data(), s.dbranch.data(), s.dln.data());
    ops_.layernorm_backward(s.dx2.data(), G.ln_a_w, G.ln_a_b, s.dln.data(), s.x2.data(), P.ln_a_w,
                            s.ln_mean.data(), s.ln_rstd.data(), L_, D_);
  }
  // x1 = x2 = embed(tokens): its gradient is dx1 + dx2.
  ops_.add(s.dx1.data(), s.dx1.data(), s.dx2.data(), LD);
  const auto& ps = table_.params();
  ops_.embedding_backward(grads_.data() + ps[0].offset, grads_.data() + ps[1].offset,
                          grads_.data() + ps[2].offset, s.dx1.data(), s.tokens.data(), L_, D_, d1_,
                          a2_, /*pos_offset*/ 0);
}

// Embeds the tokens and runs every layer forward; leaves (y1, y2) of the
// last layer in x1, x2 and each LSH layer's bucket ids in scratch.
template <class T>
void ReformerModel<T>::stack_forward(const int32_t* tokens, uint64_t step, bool train) {
  Scratch& s = *s_;
  const int64_t LD = L_ * D_;
  const float p = float(cfg_.model.dropout);
  embed(tokens);
  if (trace) {
    for (auto* v : {&trace->forward_x1, &trace->forward_x2, &trace->rebuilt_x1, &trace->rebuilt_x2})
      v->assign(size_t(NL_), {});
  }
  for (int l = 0; l < NL_; ++l) {
    const Layer P = layer_params(params_.data(), l);
    if (trace) {
      trace->forward_x1[size_t(l)].resize(size_t(LD));
      trace->forward_x2[size_t(l)].resize(size_t(LD));
      ops_.to_host(trace->forward_x1[size_t(l)].data(), s.x1.data(), LD);
      ops_.to_host(trace->forward_x2[size_t(l)].data(), s.x2.data(), LD);
    }
    ops_.layernorm_forward(s.ln.data(), s.ln_mean.data(), s.ln_rstd.data(), s.x2.data(), P.ln_a_w,
                           P.ln_a_b, L_, D_, float(cfg_.model.layernorm_eps));
    attention_forward(l, s.ln.data(), s.branch.data(), step, /*rehash*/ true);
    if (train && p > 0)
      ops_.dropout(s.branch.data(), LD, p, cfg_.training.seed, step, l, kSiteAttention, 0);
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
  if (backward) stack_backward(step, train);
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
