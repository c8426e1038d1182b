#include "framework/generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "framework/checkpoint.h"
#include "framework/model_tensors.h"
#include "kernels/common/philox.h"
#include "kernels/errors.h"

namespace reformer {

// Device buffers of one step of up to `rows` positions (one when decoding,
// a prompt chunk when prefilling) and the caches; sizes in elements.
template <class T>
struct Generator<T>::State {
  ModelTensors<T> P;                   // views of the borrowed parameters
  int64_t rows = 1;                    // positions a step holds
  Buffer<T> x1, x2, ln, branch, g;     // [rows, D]
  Buffer<T> stat_mean, stat_rstd;      // LayerNorm statistics [rows]
  Buffer<T> ao;                        // attention output [rows, H * dh]
  Buffer<T> fh, fa;                    // feed-forward hidden [rows, F]
  Buffer<T> cat, oln;                  // the last row's [2D]
  Buffer<T> logits;                    // [V]
  std::vector<Buffer<T>> k, v;         // per layer: the cache [cap, H * dh]
  std::vector<Buffer<T>> rot;          // per LSH layer: [H, n_hashes, dh, cols]; empty otherwise
  IntBuffer<T> iota;                   // [cap] 0, 1, ... (full and local key sets)
  // [rows * (1 + 4 H)]: the tokens, then per row the full layers' key sets
  // (begin, count per head), then per row the local layers'.
  IntBuffer<T> step_in;
  IntBuffer<T> sets;                   // [H * n_hashes, 2] (begin, count) of an LSH layer
  IntBuffer<T> keys;                   // [H * n_hashes * cap] gathered LSH key sets
  IntBuffer<T> bucket;                 // [H * n_hashes, rows] the step's buckets
  // Per LSH layer: every fed position's bucket per (head, round), [H * n_hashes, cap].
  std::vector<IntBuffer<T>> history;
  std::vector<int32_t> host_in;        // staging of step_in
  int nh = 1, nb = 2, f0 = 0, cols = 1;
};

template <class T>
Generator<T>::Generator(const Config& cfg, Ops<T>& ops, const T* params, int64_t capacity,
                        uint64_t rotation_step, int64_t prefill_rows)
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
  s.rows = std::max<int64_t>(1, std::min(prefill_rows, cap_));
  const int64_t R = s.rows;
  for (Buffer<T>* b : {&s.x1, &s.x2, &s.ln, &s.branch, &s.g}) *b = Buffer<T>(ops, R * D_);
  s.stat_mean = Buffer<T>(ops, R);
  s.stat_rstd = Buffer<T>(ops, R);
  s.ao = Buffer<T>(ops, R * HD);
  s.fh = Buffer<T>(ops, R * F_);
  s.fa = Buffer<T>(ops, R * F_);
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
  s.step_in = IntBuffer<T>(ops, s.rows * (1 + 4 * int64_t(H_)));
  s.host_in.resize(size_t(s.rows * (1 + 4 * int64_t(H_))));
  if (any_lsh) {
    const int units = H_ * s.nh;
    s.sets = IntBuffer<T>(ops, 2 * int64_t(units));
    s.keys = IntBuffer<T>(ops, int64_t(units) * cap_);
    s.bucket = IntBuffer<T>(ops, units * s.rows);
  }
}

template <class T>
Generator<T>::~Generator() = default;

// ao[i] = attention of position pos_ + i over layer l's cache (its rows up
// to pos_ + rows filled), i < rows, one query after another. Nothing here
// waits for the device: full and local layers read the key sets step()
// uploaded with the tokens, LSH layers build theirs on the device.
template <class T>
void Generator<T>::attend(int l, int64_t rows) {
  State& s = *s_;
  const int HD = H_ * dh_;
  const AttentionKind kind = kinds_[size_t(l)];
  DecodeAttentionParams p;
  p.heads = H_;
  p.dh = dh_;
  p.ld = HD;
  p.causal = true;
  if (kind == AttentionKind::lsh) {
    // Every round's bucket of the step's rows, [H * n_hashes, rows]: every
    // head in one call (head h's rotations at h * n_hashes * dh * cols).
    ops_.lsh_hash(s.bucket.data(), s.k[size_t(l)].data() + pos_ * HD, HD,
                  s.rot[size_t(l)].data(), rows, dh_, s.nh, s.nb, s.f0, H_);
    p.rounds = s.nh;
  }
  for (int64_t i = 0; i < rows; ++i) {
    p.q_pos = pos_ + i;
    const T* q = s.k[size_t(l)].data() + p.q_pos * HD;
    const int32_t* keys = s.iota.data();
    // Full: every cached position; local: this chunk and chunks_before before it.
    const int64_t row = i + (kind == AttentionKind::local ? s.rows : 0);
    const int32_t* sets = s.step_in.data() + s.rows + 2 * H_ * row;
    if (kind == AttentionKind::lsh) {
      // File the row's buckets, gather the same-bucket positions so far.
      ops_.lsh_decode_keys(s.keys.data(), s.sets.data(), s.history[size_t(l)].data(),
                           s.bucket.data() + i, rows, H_ * s.nh, cap_, p.q_pos);
      keys = s.keys.data();
      sets = s.sets.data();
    }
    ops_.decode_attention(s.ao.data() + i * HD, q, s.k[size_t(l)].data(), s.v[size_t(l)].data(),
                          sets, keys, p);
  }
}

// One reversible layer at positions pos_ .. pos_ + rows:
// x1 += Attn(LN_a(x2)); x2 += FFN(LN_f(x1)).
template <class T>
void Generator<T>::layer(int l, int64_t rows) {
  State& s = *s_;
  const LayerTensors<T>& P = s.P.layers[size_t(l)];
  const int HD = H_ * dh_;
  const float eps = float(cfg_.model.layernorm_eps);
  ops_.layernorm_forward(s.ln.data(), s.stat_mean.data(), s.stat_rstd.data(), s.x2.data(),
                         P.ln_a_w, P.ln_a_b, rows, D_, eps);
  T* qk = s.k[size_t(l)].data() + pos_ * HD;
  T* v = s.v[size_t(l)].data() + pos_ * HD;
  ops_.matmul_forward(qk, s.ln.data(), P.wqk, nullptr, rows, D_, HD);
  ops_.matmul_forward(v, s.ln.data(), P.wv, nullptr, rows, D_, HD);
  attend(l, rows);
  ops_.matmul_forward(s.branch.data(), s.ao.data(), P.wo, nullptr, rows, HD, D_);
  ops_.add(s.x1.data(), s.x1.data(), s.branch.data(), rows * D_);
  if (trace) {  // the step's last row
    for (auto* t : {&trace->qk, &trace->v, &trace->ao}) t->resize(size_t(NL_));
    const int64_t last = (rows - 1) * HD;
    const std::pair<std::vector<T>*, const T*> out[] = {{&trace->qk[size_t(l)], qk + last},
                                                        {&trace->v[size_t(l)], v + last},
                                                        {&trace->ao[size_t(l)], s.ao.data() + last}};
    for (const auto& [dst, src] : out) {
      dst->resize(size_t(HD));
      ops_.to_host(dst->data(), src, HD);
    }
  }
  ops_.layernorm_forward(s.ln.data(), s.stat_mean.data(), s.stat_rstd.data(), s.x1.data(),
                         P.ln_f_w, P.ln_f_b, rows, D_, eps);
  ops_.matmul_forward(s.fh.data(), s.ln.data(), P.w1, P.b1, rows, D_, F_);
  ops_.activation_forward(s.fa.data(), s.fh.data(), rows * F_, cfg_.model.activation);
  ops_.matmul_forward(s.g.data(), s.fa.data(), P.w2, P.b2, rows, F_, D_);
  ops_.add(s.x2.data(), s.x2.data(), s.g.data(), rows * D_);
}

// Feeds tokens[0 .. rows) (rows <= s.rows) at positions pos_ .. and leaves
// the logits after the last in logits_.
template <class T>
void Generator<T>::step(const int32_t* tokens, int64_t rows) {
  State& s = *s_;
  for (int64_t i = 0; i < rows; ++i)
    REFORMER_REQUIRE(tokens[i] >= 0 && tokens[i] < V_, DataError,
                     "token " + std::to_string(tokens[i]) + " is outside the vocabulary [0, " +
                         std::to_string(V_) + ")");
  REFORMER_REQUIRE(pos_ + rows <= cap_, ShapeError,
                   "generator is full: capacity " + std::to_string(cap_) + " positions");
  // One upload per step: the tokens, then per row and head the key set
  // (begin, count) of full layers (every position so far) and of local
  // layers (this chunk and chunks_before before it).
  const int64_t chunk = cfg_.attention.bucket_size;
  int32_t* in = s.host_in.data();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t pos = pos_ + i;
    const int64_t first = std::max<int64_t>(0, (pos / chunk - cfg_.attention.chunks_before) * chunk);
    in[i] = tokens[i];
    for (int h = 0; h < H_; ++h) {
      int32_t* full = in + s.rows + 2 * (H_ * i + h);
      int32_t* local = in + s.rows + 2 * (H_ * (s.rows + i) + h);
      full[0] = 0;
      full[1] = int32_t(pos + 1);
      local[0] = int32_t(first);
      local[1] = int32_t(pos + 1 - first);
    }
  }
  ops_.from_host_i32(s.step_in.data(), in, int64_t(s.host_in.size()));
  ops_.embedding_forward(s.x1.data(), s.step_in.data(), s.P.tokens, s.P.axial1, s.P.axial2, rows,
                         D_, cfg_.model.axial_dims[0], cfg_.model.axial_shape[1], pos_);
  ops_.copy(s.x2.data(), s.x1.data(), rows * D_);
  for (int l = 0; l < NL_; ++l) layer(l, rows);
  // logits = head(LN_out(concat(y1, y2))) of the last row.
  const int64_t last = (rows - 1) * D_;
  ops_.copy(s.cat.data(), s.x1.data() + last, D_);
  ops_.copy(s.cat.data() + D_, s.x2.data() + last, D_);
  ops_.layernorm_forward(s.oln.data(), s.stat_mean.data(), s.stat_rstd.data(), s.cat.data(),
                         s.P.ln_out_w, s.P.ln_out_b, 1, 2 * D_,
                         float(cfg_.model.layernorm_eps));
  ops_.matmul_forward(s.logits.data(), s.oln.data(), s.P.head_w, s.P.head_b, 1, 2 * D_, V_);
  ops_.to_host(logits_.data(), s.logits.data(), V_);
  pos_ += rows;
}

template <class T>
const std::vector<T>& Generator<T>::feed(int32_t token) {
  step(&token, 1);
  return logits_;
}

template <class T>
const std::vector<T>& Generator<T>::prefill(const int32_t* tokens, int64_t n) {
  REFORMER_REQUIRE(n >= 1, ShapeError, "prefill needs at least one token");
  REFORMER_REQUIRE(pos_ + n <= cap_, ShapeError,
                   "generator is full: " + std::to_string(n) + " tokens at position " +
                       std::to_string(pos_) + " pass the capacity " + std::to_string(cap_));
  for (int64_t done = 0; done < n; done += s_->rows)
    step(tokens + done, std::min(s_->rows, n - done));
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
