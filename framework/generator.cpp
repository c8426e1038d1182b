#include "framework/generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "framework/checkpoint.h"
#include "framework/model_tensors.h"
#include "kernels/common/philox.h"
#include "kernels/errors.h"

namespace reformer {

// Device buffers of one decoding step and the caches; sizes in elements.
template <class T>
struct Generator<T>::State {
  ModelTensors<T> P;                   // views of the borrowed parameters
  IntBuffer<T> token;                  // [1]
  Buffer<T> x1, x2, ln, branch, g;     // [D]
  Buffer<T> stat_mean, stat_rstd;      // LayerNorm statistics [1]
  Buffer<T> ao;                        // attention output [H * dh]
  Buffer<T> fh, fa;                    // feed-forward hidden [F]
  Buffer<T> cat, oln;                  // [2D]
  Buffer<T> logits;                    // [V]
  std::vector<Buffer<T>> k, v;         // per layer: the cache [cap, H * dh]
  std::vector<Buffer<T>> rot;          // per LSH layer: [H, n_hashes, dh, cols]; empty otherwise
  IntBuffer<T> iota;                   // [cap] 0, 1, ... (full and local key sets)
  IntBuffer<T> step_in;                // [1 + 4 H]: the token, then the full and local sets
  IntBuffer<T> sets;                   // [H * n_hashes, 2] (begin, count) of an LSH layer
  IntBuffer<T> keys;                   // [H * n_hashes * cap] gathered LSH key sets
  IntBuffer<T> bucket;                 // [H * n_hashes] the new position's buckets
  // Per LSH layer: every fed position's bucket per (head, round), [H * n_hashes, cap].
  std::vector<IntBuffer<T>> history;
  std::vector<int32_t> host_in;        // staging of step_in
  int nh = 1, nb = 2, f0 = 0, cols = 1;
};

template <class T>
Generator<T>::Generator(const Config& cfg, Ops<T>& ops, const T* params, int64_t capacity,
                        uint64_t rotation_step)
    : cfg_(cfg), ops_(ops), cap_(capacity) {
  const ModelConfig& m = cfg.model;
  REFORMER_REQUIRE(cfg.attention.causal, ConfigError,
                   "generation decodes left to right and needs attention.causal: true");
  REFORMER_REQUIRE(capacity >= 1 && capacity <= m.max_len, ConfigError,
                   "generation capacity " + std::to_string(capacity) +
                       " must lie in [1, model.max_len = " + std::to_string(m.max_len) + "]");
  D_ = m.d_model;
  H_ = m.n_heads;
  dh_ = cfg.head_dim();
  F_ = m.d_ff;
  V_ = m.vocab_size;
  NL_ = m.n_layers;
  const int HD = H_ * dh_;
  s_ = std::make_unique<State>();
  State& s = *s_;
  const ParamTable table = model_param_table(cfg);
  s.P = bind_tensors(table, const_cast<T*>(params), NL_);
  for (Buffer<T>* b : {&s.x1, &s.x2, &s.ln, &s.branch, &s.g}) *b = Buffer<T>(ops, D_);
  s.stat_mean = Buffer<T>(ops, 1);
  s.stat_rstd = Buffer<T>(ops, 1);
  s.ao = Buffer<T>(ops, HD);
  s.fh = Buffer<T>(ops, F_);
  s.fa = Buffer<T>(ops, F_);
  s.cat = Buffer<T>(ops, 2 * D_);
  s.oln = Buffer<T>(ops, 2 * D_);
  s.logits = Buffer<T>(ops, V_);
  logits_.resize(size_t(V_));

  s.nh = cfg.attention.n_hashes;
  s.nb = cfg.buckets();
  s.f0 = cfg.bucket_factor0();
  s.cols = rotation_cols(s.nb, s.f0);
  bool any_lsh = false;
  for (int l = 0; l < NL_; ++l) {
    // As make_attention: a sequence of at most one chunk runs full attention.
    kinds_.push_back(m.max_len <= cfg.attention.bucket_size ? AttentionKind::full
                                                             : cfg.attention_kind(l));
    s.k.emplace_back(ops, cap_ * HD);
    s.v.emplace_back(ops, cap_ * HD);
    s.rot.emplace_back();
    s.history.emplace_back();
    if (kinds_.back() != AttentionKind::lsh) continue;
    any_lsh = true;
    const int64_t per_head = int64_t(s.nh) * dh_ * s.cols;
    s.rot.back() = Buffer<T>(ops, H_ * per_head);
    for (int h = 0; h < H_; ++h)
      ops.lsh_rotations(s.rot.back().data() + h * per_head, cfg.training.seed, rotation_step, l,
                        h, s.nh, dh_, s.nb, s.f0);
    s.history.back() = IntBuffer<T>(ops, int64_t(H_) * s.nh * cap_);
  }
  s.iota = IntBuffer<T>(ops, cap_);
  std::vector<int32_t> id(static_cast<size_t>(cap_));
  std::iota(id.begin(), id.end(), 0);
  ops.from_host_i32(s.iota.data(), id.data(), cap_);
  s.step_in = IntBuffer<T>(ops, 1 + 4 * int64_t(H_));
  s.host_in.resize(size_t(1 + 4 * H_));
  if (any_lsh) {
    const int units = H_ * s.nh;
    s.sets = IntBuffer<T>(ops, 2 * int64_t(units));
    s.keys = IntBuffer<T>(ops, int64_t(units) * cap_);
    s.bucket = IntBuffer<T>(ops, units);
  }
}

template <class T>
Generator<T>::~Generator() = default;

// ao = attention of position pos_ over layer l's cache (its row pos_ filled).
// Nothing here waits for the device: full and local layers read the key sets
// feed() uploaded with the token, LSH layers build theirs on the device.
template <class T>
void Generator<T>::attend(int l) {
  State& s = *s_;
  const int HD = H_ * dh_;
  const T* qk = s.k[size_t(l)].data() + pos_ * HD;
  DecodeAttentionParams p;
  p.heads = H_;
  p.dh = dh_;
  p.ld = HD;
  p.q_pos = pos_;
  p.causal = true;
  const int32_t* keys = s.iota.data();
  const int32_t* sets = s.step_in.data() + 1;  // full: every cached position
  if (kinds_[size_t(l)] == AttentionKind::local) {
    sets += 2 * H_;  // this chunk and chunks_before before it
  } else if (kinds_[size_t(l)] == AttentionKind::lsh) {
    // Hash the new key in every round, file its buckets, gather the same-bucket positions.
    const int64_t per_head = int64_t(s.nh) * dh_ * s.cols;
    for (int h = 0; h < H_; ++h)
      ops_.lsh_hash(s.bucket.data() + h * s.nh, qk + h * dh_, HD,
                    s.rot[size_t(l)].data() + h * per_head, 1, dh_, s.nh, s.nb, s.f0);
    ops_.lsh_decode_keys(s.keys.data(), s.sets.data(), s.history[size_t(l)].data(),
                         s.bucket.data(), H_ * s.nh, cap_, pos_);
    keys = s.keys.data();
    sets = s.sets.data();
    p.rounds = s.nh;
  }
  ops_.decode_attention(s.ao.data(), qk, s.k[size_t(l)].data(), s.v[size_t(l)].data(), sets,
                        keys, p);
}

// One reversible layer at position pos_: x1 += Attn(LN_a(x2)); x2 += FFN(LN_f(x1)).
template <class T>
void Generator<T>::layer(int l) {
  State& s = *s_;
  const LayerTensors<T>& P = s.P.layers[size_t(l)];
  const int HD = H_ * dh_;
  const float eps = float(cfg_.model.layernorm_eps);
  ops_.layernorm_forward(s.ln.data(), s.stat_mean.data(), s.stat_rstd.data(), s.x2.data(),
                         P.ln_a_w, P.ln_a_b, 1, D_, eps);
  T* qk = s.k[size_t(l)].data() + pos_ * HD;
  T* v = s.v[size_t(l)].data() + pos_ * HD;
  ops_.matmul_forward(qk, s.ln.data(), P.wqk, nullptr, 1, D_, HD);
  ops_.matmul_forward(v, s.ln.data(), P.wv, nullptr, 1, D_, HD);
  attend(l);
  ops_.matmul_forward(s.branch.data(), s.ao.data(), P.wo, nullptr, 1, HD, D_);
  ops_.add(s.x1.data(), s.x1.data(), s.branch.data(), D_);
  if (trace) {
    for (auto* t : {&trace->qk, &trace->v, &trace->ao}) t->resize(size_t(NL_));
    const std::pair<std::vector<T>*, const T*> rows[] = {
        {&trace->qk[size_t(l)], qk}, {&trace->v[size_t(l)], v}, {&trace->ao[size_t(l)], s.ao.data()}};
    for (const auto& [dst, src] : rows) {
      dst->resize(size_t(HD));
      ops_.to_host(dst->data(), src, HD);
    }
  }
  ops_.layernorm_forward(s.ln.data(), s.stat_mean.data(), s.stat_rstd.data(), s.x1.data(),
                         P.ln_f_w, P.ln_f_b, 1, D_, eps);
  ops_.matmul_forward(s.fh.data(), s.ln.data(), P.w1, P.b1, 1, D_, F_);
  ops_.activation_forward(s.fa.data(), s.fh.data(), F_, cfg_.model.activation);
  ops_.matmul_forward(s.g.data(), s.fa.data(), P.w2, P.b2, 1, F_, D_);
  ops_.add(s.x2.data(), s.x2.data(), s.g.data(), D_);
}

template <class T>
const std::vector<T>& Generator<T>::feed(int32_t token) {
  State& s = *s_;
  REFORMER_REQUIRE(token >= 0 && token < V_, DataError,
                   "token " + std::to_string(token) + " is outside the vocabulary [0, " +
                       std::to_string(V_) + ")");
  REFORMER_REQUIRE(pos_ < cap_, ShapeError,
                   "generator is full: capacity " + std::to_string(cap_) + " positions");
  // One upload per step: the token, then per head the key set (begin,
  // count) of full layers (every position so far) and of local layers (this
  // chunk and chunks_before before it).
  const int64_t chunk = cfg_.attention.bucket_size;
  const int64_t first = std::max<int64_t>(0, (pos_ / chunk - cfg_.attention.chunks_before) * chunk);
  s.host_in[0] = token;
  for (int h = 0; h < H_; ++h) {
    int32_t* full = &s.host_in[size_t(1 + 2 * h)];
    int32_t* local = &s.host_in[size_t(1 + 2 * H_ + 2 * h)];
    full[0] = 0;
    full[1] = int32_t(pos_ + 1);
    local[0] = int32_t(first);
    local[1] = int32_t(pos_ + 1 - first);
  }
  ops_.from_host_i32(s.step_in.data(), s.host_in.data(), int64_t(s.host_in.size()));
  ops_.embedding_forward(s.x1.data(), s.step_in.data(), s.P.tokens, s.P.axial1, s.P.axial2, 1, D_,
                         cfg_.model.axial_dims[0], cfg_.model.axial_shape[1], pos_);
  ops_.copy(s.x2.data(), s.x1.data(), D_);
  for (int l = 0; l < NL_; ++l) layer(l);
  // logits = head(LN_out(concat(y1, y2))).
  ops_.copy(s.cat.data(), s.x1.data(), D_);
  ops_.copy(s.cat.data() + D_, s.x2.data(), D_);
  ops_.layernorm_forward(s.oln.data(), s.stat_mean.data(), s.stat_rstd.data(), s.cat.data(),
                         s.P.ln_out_w, s.P.ln_out_b, 1, 2 * D_,
                         float(cfg_.model.layernorm_eps));
  ops_.matmul_forward(s.logits.data(), s.oln.data(), s.P.head_w, s.P.head_b, 1, 2 * D_, V_);
  ops_.to_host(logits_.data(), s.logits.data(), V_);
  ++pos_;
  return logits_;
}

template <class T>
int32_t sample_token(const T* logits, int V, const SamplingOptions& o, int64_t position) {
  if (o.temperature <= 0) {
    int32_t best = 0;
    for (int i = 1; i < V; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  // Tokens by decreasing logit (ties by index), cut by top_k, then top_p.
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = o.top_k > 0 ? std::min<size_t>(size_t(o.top_k), order.size()) : order.size();
  const double top = double(logits[order[0]]);
  std::vector<double> w(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) {
    w[i] = std::exp((double(logits[order[i]]) - top) / o.temperature);
    total += w[i];
  }
  if (o.top_p < 1.0) {
    double mass = 0;
    size_t n = 0;
    while (n < keep && mass < o.top_p * total) mass += w[n++];
    keep = std::max<size_t>(n, 1);
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += w[i];
  }
  // A uniform in [0, 1) with 53 random bits.
  const Philox4 b = rng_block(make_key(o.seed, RngPurpose::sampling, uint64_t(position)), 0);
  const double u = double((uint64_t(b.v[0]) << 21) ^ (b.v[1] >> 11)) / 9007199254740992.0;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += w[i];
    if (u * total < acc) return order[i];
  }
  return order[keep - 1];
}

GenerationModel read_generation_model(const std::string& path,
                                      const std::vector<std::string>& overrides) {
  CheckpointState st = read_checkpoint(path);
  GenerationModel g;
  g.cfg = parse_config(st.config_text, path + " (stored config)", overrides);
  g.step = st.step;
  const ParamTable table = model_param_table(g.cfg);
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected;
  for (const ParamInfo& p : table.params()) expected.emplace_back(p.name, p.shape);
  check_matches(st, expected);
  g.params.resize(size_t(table.total()));
  for (size_t k = 0; k < table.params().size(); ++k)
    std::copy(st.model[k].data.begin(), st.model[k].data.end(),
              g.params.begin() + table.params()[k].offset);
  return g;
}

template int32_t sample_token<float>(const float*, int, const SamplingOptions&, int64_t);
template int32_t sample_token<double>(const double*, int, const SamplingOptions&, int64_t);
template class Generator<float>;
template class Generator<double>;

}  // namespace reformer
