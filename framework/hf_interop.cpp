#include "framework/hf_interop.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include "framework/checkpoint.h"
#include "framework/device.h"
#include "framework/generator.h"
#include "framework/logging.h"
#include "framework/model_tensors.h"
#include "framework/optimizer.h"
#include "kernels/errors.h"

namespace fs = std::filesystem;

namespace reformer {

namespace {

// One parameter in both namings. Ours is `rows x cols` row-major; when
// `transpose`, HF holds its transpose (torch Linear weights are [out, in]).
struct Link {
  std::string hf;                 // e.g. "reformer.encoder.layers.0.attention.output.dense.weight"
  std::string ours;               // e.g. "layers.0.attn.wo"
  std::vector<int64_t> hf_shape;  // the shape HF's module holds
  bool transpose = false;
};

// The head bias: transformers 4.x held one Parameter under both names (a
// saved state dict may hold either or both); 5.x has lm_head.bias only.
// Export writes lm_head.bias alone.
constexpr const char* kHeadBias = "lm_head.bias";
constexpr const char* kHeadBiasAlias = "lm_head.decoder.bias";

std::vector<Link> links(const Config& cfg) {
  const ModelConfig& m = cfg.model;
  const int64_t D = m.d_model, HD = int64_t(m.n_heads) * cfg.head_dim(), F = m.d_ff,
                V = m.vocab_size, d1 = m.axial_dims[0], d2 = D - d1;
  std::vector<Link> out = {
      {"reformer.embeddings.word_embeddings.weight", "embed.tokens", {V, D}, false},
      {"reformer.embeddings.position_embeddings.weights.0", "embed.axial1", {m.axial_shape[0], 1, d1}, false},
      {"reformer.embeddings.position_embeddings.weights.1", "embed.axial2", {1, m.axial_shape[1], d2}, false},
  };
  for (int l = 0; l < m.n_layers; ++l) {
    const std::string hf = "reformer.encoder.layers." + std::to_string(l) + ".";
    const std::string us = "layers." + std::to_string(l) + ".";
    const std::vector<Link> layer = {
        {hf + "attention.layer_norm.weight", us + "ln_a.weight", {D}, false},
        {hf + "attention.layer_norm.bias", us + "ln_a.bias", {D}, false},
        {hf + "attention.self_attention.query_key.weight", us + "attn.wqk", {HD, D}, true},
        {hf + "attention.self_attention.value.weight", us + "attn.wv", {HD, D}, true},
        {hf + "attention.output.dense.weight", us + "attn.wo", {D, HD}, true},
        {hf + "feed_forward.layer_norm.weight", us + "ln_f.weight", {D}, false},
        {hf + "feed_forward.layer_norm.bias", us + "ln_f.bias", {D}, false},
        {hf + "feed_forward.dense.dense.weight", us + "ffn.w1", {F, D}, true},
        {hf + "feed_forward.dense.dense.bias", us + "ffn.b1", {F}, false},
        {hf + "feed_forward.output.dense.weight", us + "ffn.w2", {D, F}, true},
        {hf + "feed_forward.output.dense.bias", us + "ffn.b2", {D}, false},
    };
    out.insert(out.end(), layer.begin(), layer.end());
  }
  out.push_back({"reformer.encoder.layer_norm.weight", "ln_out.weight", {2 * D}, false});
  out.push_back({"reformer.encoder.layer_norm.bias", "ln_out.bias", {2 * D}, false});
  out.push_back({"lm_head.decoder.weight", "head.weight", {V, 2 * D}, true});
  out.push_back({kHeadBias, "head.bias", {V}, false});
  return out;
}

// `src` (rows x cols, row-major) transposed into `dst` (cols x rows).
void transpose_into(const float* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

// Cholesky factor of the symmetric n x n matrix `a` (row-major, overwritten
// by L in its lower triangle). False when a pivot is not above
// n * 2^-52 * max_i a_ii: the matrix is singular to double precision.
bool cholesky(std::vector<double>& a, int64_t n) {
  double top = 0;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, a[size_t(i * n + i)]);
  const double floor = double(n) * std::ldexp(1.0, -52) * top;
  for (int64_t j = 0; j < n; ++j) {
    double d = a[size_t(j * n + j)];
    for (int64_t k = 0; k < j; ++k) d -= a[size_t(j * n + k)] * a[size_t(j * n + k)];
    if (!(d > floor)) return false;
    const double ljj = std::sqrt(d);
    a[size_t(j * n + j)] = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      double s = a[size_t(i * n + j)];
      for (int64_t k = 0; k < j; ++k) s -= a[size_t(i * n + k)] * a[size_t(j * n + k)];
      a[size_t(i * n + j)] = s / ljj;
    }
  }
  return true;
}

// x = (L L^T)^-1 r for the factor `l` of cholesky().
std::vector<double> cholesky_solve(const std::vector<double>& l, int64_t n, std::vector<double> x) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < i; ++k) x[size_t(i)] -= l[size_t(i * n + k)] * x[size_t(k)];
    x[size_t(i)] /= l[size_t(i * n + i)];
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    for (int64_t k = i + 1; k < n; ++k) x[size_t(i)] -= l[size_t(k * n + i)] * x[size_t(k)];
    x[size_t(i)] /= l[size_t(i * n + i)];
  }
  return x;
}

// HF's attn_layers for `cfg` and the LSH chunk length to write. Throws
// ConfigError naming the key HF cannot express.
std::vector<std::string> hf_attn_layers(const Config& cfg, int* chunk) {
  const AttentionConfig& a = cfg.attention;
  if (!a.causal)
    throw ConfigError("attention.causal is false: HF's ReformerModelWithLMHead is a causal decoder");
  const int L = cfg.model.max_len;
  bool all_exact = true;  // every layer runs exact attention over the whole sequence
  for (int l = 0; l < cfg.model.n_layers; ++l)
    all_exact = all_exact && (cfg.attention_kind(l) == AttentionKind::full || L <= a.bucket_size);
  *chunk = all_exact ? std::max(a.bucket_size, L) : a.bucket_size;
  for (int l = 0; l < cfg.model.n_layers && !all_exact; ++l)
    if (cfg.attention_kind(l) != AttentionKind::lsh)
      throw ConfigError(
          "attention.kinds: layer " + std::to_string(l) + " is '" + to_string(cfg.attention_kind(l)) +
          "' over " + std::to_string(L) + " positions (more than attention.bucket_size " +
          std::to_string(a.bucket_size) +
          "); HF has no full attention, and its local attention scores separate query and key "
          "projections without key normalisation or self mask, so only lsh layers (or models whose "
          "every layer is exact at model.max_len) export");
  return std::vector<std::string>(size_t(cfg.model.n_layers), "lsh");
}

std::string num(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest exact text
  std::string s(buf, r.ptr);
  if (s.find_first_of(".eE") == std::string::npos && s.find_first_of("ni") == std::string::npos)
    s += ".0";
  return s;
}

std::string int_list(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// ---------------------------------------------------------------- reading config.json

// Typed access to config.json with HF's defaults for absent keys; errors
// name the file and the key.
struct HfJson {
  YAML::Node root;
  std::string source;

  [[noreturn]] void fail(const std::string& key, const std::string& why) const {
    throw ConfigError(source + ": " + key + ": " + why);
  }
  // The value of `key`; false when absent or null (HF then uses its default).
  bool get(const std::string& key, YAML::Node* out) const {
    const YAML::Node n = root[key];
    if (!n || n.IsNull()) return false;
    *out = n;
    return true;
  }
  template <class V>
  V scalar(const std::string& key, V def) const {
    YAML::Node n;
    if (!get(key, &n)) return def;
    try {
      if (!n.IsScalar()) throw YAML::Exception(YAML::Mark(), "not a scalar");
      return n.as<V>();
    } catch (const YAML::Exception&) {
      fail(key, "'" + YAML::Dump(n) + "' is not a value of the expected type");
    }
  }
  std::vector<int64_t> ints(const std::string& key, std::vector<int64_t> def) const {
    YAML::Node n;
    if (!get(key, &n)) return def;
    std::vector<int64_t> out;
    try {
      if (!n.IsSequence()) throw YAML::Exception(YAML::Mark(), "not a list");
      for (const YAML::Node& e : n) out.push_back(e.as<int64_t>());
    } catch (const YAML::Exception&) {
      fail(key, "expected a list of whole numbers");
    }
    return out;
  }
  int whole(const std::string& key, int64_t def, int64_t lo, int64_t hi) const {
    const auto v = scalar<int64_t>(key, def);
    if (v < lo || v > hi)
      fail(key, std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "]");
    return int(v);
  }
};

// HF's num_buckets when config.json leaves it null: chosen at the first
// forward pass from its length (here: max_position_embeddings), factorized
// past a limit (LSHSelfAttention._set_num_buckets). 0 when no pass would hash.
void hf_default_buckets(int max_len, int chunk, AttentionConfig* a) {
  const int64_t want = 2 * (int64_t(max_len) / chunk);
  if (max_len <= chunk || want < 2) return;
  int p = 0;
  while ((int64_t(1) << (p + 1)) <= want) ++p;
  int64_t limit_root = 0;
  while ((limit_root + 1) * (limit_root + 1) <= int64_t(max_len) / chunk) ++limit_root;
  a->n_buckets = 1 << p;
  a->factorize_buckets = a->n_buckets > 2 * std::max<int64_t>(limit_root, chunk);
}

}  // namespace

std::string hf_config_json(const Config& cfg) {
  const ModelConfig& m = cfg.model;
  const AttentionConfig& a = cfg.attention;
  int chunk = 0;
  const std::vector<std::string> kinds = hf_attn_layers(cfg, &chunk);
  std::string layers = "[";
  for (size_t i = 0; i < kinds.size(); ++i) layers += (i ? ", \"" : "\"") + kinds[i] + "\"";
  layers += "]";
  const int nb = cfg.buckets(), f0 = cfg.bucket_factor0();
  const std::string buckets = f0 > 0 ? int_list({f0, nb / f0}) : std::to_string(nb);
  const std::vector<std::pair<std::string, std::string>> fields = {
      {"architectures", "[\"ReformerModelWithLMHead\"]"},
      {"model_type", "\"reformer\""},
      {"attention_head_size", std::to_string(cfg.head_dim())},
      {"attn_layers", layers},
      {"axial_norm_std", num(m.axial_init_std)},
      {"axial_pos_embds", "true"},
      {"axial_pos_embds_dim", int_list({m.axial_dims[0], m.axial_dims[1]})},
      {"axial_pos_shape", int_list({m.axial_shape[0], m.axial_shape[1]})},
      {"chunk_size_feed_forward", "0"},
      {"chunk_size_lm_head", "0"},
      {"dtype", "\"float32\""},
      {"eos_token_id", "null"},
      {"feed_forward_size", std::to_string(m.d_ff)},
      {"hash_seed", "null"},
      {"hidden_act", m.activation == Activation::gelu ? "\"gelu_new\"" : "\"relu\""},
      {"hidden_dropout_prob", num(m.dropout)},
      {"hidden_size", std::to_string(m.d_model)},
      {"initializer_range", num(m.init_std)},
      {"is_decoder", "true"},
      {"layer_norm_eps", num(m.layernorm_eps)},
      {"local_attention_probs_dropout_prob", "0.0"},
      {"local_attn_chunk_length", std::to_string(chunk)},
      {"local_num_chunks_after", std::to_string(a.chunks_after)},
      {"local_num_chunks_before", std::to_string(a.chunks_before)},
      {"lsh_attention_probs_dropout_prob", "0.0"},
      {"lsh_attn_chunk_length", std::to_string(chunk)},
      {"lsh_num_chunks_after", std::to_string(a.chunks_after)},
      {"lsh_num_chunks_before", std::to_string(a.chunks_before)},
      {"max_position_embeddings", std::to_string(m.max_len)},
      {"num_attention_heads", std::to_string(m.n_heads)},
      {"num_buckets", buckets},
      {"num_hashes", std::to_string(a.n_hashes)},
      {"num_hidden_layers", std::to_string(m.n_layers)},
      {"pad_token_id", "0"},
      {"tie_word_embeddings", "false"},
      {"use_cache", "true"},
      {"vocab_size", std::to_string(m.vocab_size)},
  };
  std::string out = "{\n";
  for (size_t i = 0; i < fields.size(); ++i)
    out += "  \"" + fields[i].first + "\": " + fields[i].second + (i + 1 < fields.size() ? ",\n" : "\n");
  return out + "}\n";
}

HeadBiasFold fold_head_bias(const std::vector<float>& head_weight, const std::vector<float>& head_bias,
                            const std::vector<float>& ln_bias) {
  const int64_t V = int64_t(head_bias.size()), N = int64_t(ln_bias.size());  // N = 2D
  REFORMER_REQUIRE(int64_t(head_weight.size()) == N * V, ShapeError,
                   "head weight is not [ln bias size, head bias size]");
  HeadBiasFold f{ln_bias, head_bias, false, 0.0, 0.0, ""};
  double b_max = 0;
  for (const float v : head_bias) b_max = std::max(b_max, std::fabs(double(v)));
  if (b_max == 0) return f;
  auto w = [&](int64_t v, int64_t j) { return double(head_weight[size_t(j * V + v)]); };  // HF's W[v][j]
  // W x, or W^T y, in double.
  auto times = [&](const std::vector<double>& x) {
    std::vector<double> y(size_t(V), 0.0);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t v = 0; v < V; ++v) y[size_t(v)] += w(v, j) * x[size_t(j)];
    return y;
  };
  auto times_t = [&](const std::vector<double>& y) {
    std::vector<double> x(size_t(N), 0.0);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t v = 0; v < V; ++v) x[size_t(j)] += w(v, j) * y[size_t(v)];
    return x;
  };
  const std::string head = "head.weight [" + std::to_string(N) + ", " + std::to_string(V) + "]";
  if (V > N) {
    f.not_folded = head + ": vocab_size " + std::to_string(V) + " > 2 d_model " + std::to_string(N) +
                   ", so W delta = b has no solution in general";
    return f;
  }
  std::vector<double> gram(size_t(V * V), 0.0);
  for (int64_t j = 0; j < N; ++j)
    for (int64_t a = 0; a < V; ++a)
      for (int64_t c = 0; c <= a; ++c) gram[size_t(a * V + c)] += w(a, j) * w(c, j);
  for (int64_t a = 0; a < V; ++a)
    for (int64_t c = 0; c < a; ++c) gram[size_t(c * V + a)] = gram[size_t(a * V + c)];
  if (!cholesky(gram, V)) {
    f.not_folded = head + ": W W^T is singular, its rows are linearly dependent";
    return f;
  }
  const std::vector<double> b(head_bias.begin(), head_bias.end());
  std::vector<double> delta = times_t(cholesky_solve(gram, V, b));
  std::vector<double> r = times(delta);  // one refinement step: delta += W^T G^-1 (b - W delta)
  for (int64_t v = 0; v < V; ++v) r[size_t(v)] = b[size_t(v)] - r[size_t(v)];
  const std::vector<double> step = times_t(cholesky_solve(gram, V, r));
  for (int64_t j = 0; j < N; ++j) delta[size_t(j)] += step[size_t(j)];

  const size_t n = static_cast<size_t>(N);
  std::vector<float> folded(n);
  std::vector<double> moved(n), abs_folded(n), abs_delta(n);
  for (int64_t j = 0; j < N; ++j) {
    folded[size_t(j)] = float(double(ln_bias[size_t(j)]) + delta[size_t(j)]);
    moved[size_t(j)] = double(folded[size_t(j)]) - double(ln_bias[size_t(j)]);  // what the fold adds
    abs_folded[size_t(j)] = std::fabs(double(folded[size_t(j)]));
    abs_delta[size_t(j)] = std::fabs(delta[size_t(j)]);
  }
  const std::vector<double> wm = times(moved);
  double residual = 0, rounding = 0, amplification = 0;
  for (int64_t v = 0; v < V; ++v) {
    double sf = 0, sd = 0;
    for (int64_t j = 0; j < N; ++j) {
      sf += std::fabs(w(v, j)) * abs_folded[size_t(j)];
      sd += std::fabs(w(v, j)) * abs_delta[size_t(j)];
    }
    residual = std::max(residual, std::fabs(wm[size_t(v)] - b[size_t(v)]));
    rounding = std::max(rounding, sf);
    amplification = std::max(amplification, sd);
  }
  const double u = std::ldexp(1.0, -24);
  const double tolerance = std::ldexp(b_max, -12) + 2 * u * rounding;
  if (!(amplification <= std::ldexp(b_max, 12)) || !(residual <= tolerance)) {
    f.not_folded = head + strfmt(": W W^T is ill-conditioned (max_v sum_j |W_vj delta_j| = %.3g, residual "
                                 "%.3g, for |b|_inf %.3g)", amplification, residual, b_max);
    return f;
  }
  f.ln_bias = std::move(folded);
  f.head_bias.assign(size_t(V), 0.0f);
  f.folded = true;
  f.residual = residual;
  f.tolerance = tolerance;
  return f;
}

std::vector<SafeTensor> hf_tensors(const Config& cfg, const std::vector<float>& params,
                                   HeadBiasFold* fold) {
  int chunk = 0;
  hf_attn_layers(cfg, &chunk);
  const ParamTable table = model_param_table(cfg);
  REFORMER_REQUIRE(int64_t(params.size()) == table.total(), ShapeError,
                   "parameter buffer does not match the configuration");
  std::map<std::string, const ParamInfo*> by_name;
  for (const ParamInfo& p : table.params()) by_name[p.name] = &p;
  auto values = [&](const std::string& name) {
    const ParamInfo& p = *by_name.at(name);
    return std::vector<float>(params.begin() + p.offset, params.begin() + p.offset + p.size);
  };
  HeadBiasFold f = fold_head_bias(values("head.weight"), values("head.bias"), values("ln_out.bias"));
  std::vector<SafeTensor> out;
  for (const Link& k : links(cfg)) {
    const ParamInfo& p = *by_name.at(k.ours);
    SafeTensor t{k.hf, k.hf_shape, std::vector<float>(size_t(p.size))};
    const float* src = params.data() + p.offset;
    if (k.ours == "ln_out.bias") t.data = f.ln_bias;
    else if (k.ours == "head.bias") t.data = f.head_bias;
    else if (k.transpose) transpose_into(src, p.shape[0], p.shape[1], t.data.data());
    else std::copy(src, src + p.size, t.data.begin());
    out.push_back(std::move(t));
  }
  if (fold) *fold = std::move(f);
  return out;
}

Config config_from_hf(const std::string& json, const std::string& source,
                      const std::vector<std::string>& overrides) {
  HfJson j;
  j.source = source;
  try {
    j.root = YAML::Load(json);
  } catch (const YAML::Exception& e) {
    throw ConfigError(source + ": not valid JSON: " + e.what());
  }
  if (!j.root.IsMap()) throw ConfigError(source + ": not a JSON object");
  if (j.scalar<std::string>("model_type", "") != "reformer")
    j.fail("model_type", "expected \"reformer\"");
  if (!j.scalar<bool>("is_decoder", false))
    j.fail("is_decoder", "must be true: the model is a causal language model");
  if (!j.scalar<bool>("axial_pos_embds", true))
    j.fail("axial_pos_embds", "must be true: the model has axial position embeddings only");
  Config c;
  ModelConfig& m = c.model;
  AttentionConfig& a = c.attention;
  YAML::Node layers;
  std::vector<std::string> kinds{"local", "lsh", "local", "lsh", "local", "lsh"};  // HF's default
  if (j.get("attn_layers", &layers)) {
    if (!layers.IsSequence()) j.fail("attn_layers", "expected a list");
    kinds.clear();
    for (const YAML::Node& k : layers) kinds.push_back(k.IsScalar() ? k.Scalar() : "?");
  }
  if (kinds.empty()) j.fail("attn_layers", "is empty");
  for (size_t l = 0; l < kinds.size(); ++l)
    if (kinds[l] != "lsh")
      j.fail("attn_layers", "layer " + std::to_string(l) + " is '" + kinds[l] +
                                "'; only \"lsh\" layers import (HF's local attention scores separate "
                                "query and key without key normalisation or self mask)");
  m.n_layers = int(kinds.size());
  a.kinds = {AttentionKind::lsh};
  m.vocab_size = j.whole("vocab_size", 320, 1, int64_t(1) << 30);
  m.d_model = j.whole("hidden_size", 256, 1, int64_t(1) << 20);
  m.n_heads = j.whole("num_attention_heads", 12, 1, 1 << 16);
  m.d_head = j.whole("attention_head_size", 64, 1, 1 << 16);
  m.d_ff = j.whole("feed_forward_size", 512, 1, int64_t(1) << 24);
  m.max_len = j.whole("max_position_embeddings", 4096, 1, kMaxLength);
  const auto two_axes = [&](const char* key, std::vector<int64_t> def) {
    const auto v = j.ints(key, std::move(def));
    if (v.size() != 2 || v[0] < 1 || v[1] < 1 || v[0] > kMaxLength || v[1] > kMaxLength)
      j.fail(key, "expected two positive whole numbers (two axes)");
    return std::vector<int>{int(v[0]), int(v[1])};
  };
  m.axial_shape = two_axes("axial_pos_shape", {64, 64});
  m.axial_dims = two_axes("axial_pos_embds_dim", {64, 192});
  const std::string act = j.scalar<std::string>("hidden_act", "relu");
  if (act == "relu") m.activation = Activation::relu;
  else if (act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast") m.activation = Activation::gelu;
  else j.fail("hidden_act", "'" + act + "' has no counterpart (relu, or GELU's tanh approximation: gelu_new)");
  m.layernorm_eps = j.scalar<double>("layer_norm_eps", 1e-12);
  m.dropout = j.scalar<double>("hidden_dropout_prob", 0.05);
  m.init_std = j.scalar<double>("initializer_range", 0.02);
  m.axial_init_std = j.scalar<double>("axial_norm_std", 1.0);
  a.bucket_size = j.whole("lsh_attn_chunk_length", 64, 1, kMaxLength);
  a.n_hashes = j.whole("num_hashes", 1, 1, 1 << 10);
  a.chunks_before = j.whole("lsh_num_chunks_before", 1, 0, 1 << 20);
  a.chunks_after = j.whole("lsh_num_chunks_after", 0, 0, 0);
  a.causal = true;
  YAML::Node nb;
  if (!j.get("num_buckets", &nb)) {
    hf_default_buckets(m.max_len, a.bucket_size, &a);
  } else if (nb.IsScalar() || (nb.IsSequence() && nb.size() == 1)) {
    a.n_buckets = nb.IsScalar() ? j.whole("num_buckets", 0, 2, 1 << 30) : j.ints("num_buckets", {})[0];
  } else {
    const auto f = j.ints("num_buckets", {});
    if (f.size() != 2 || f[0] < 2 || f[1] < 2 || f[0] * f[1] > (int64_t(1) << 30))
      j.fail("num_buckets", "expected a whole number or two factors");
    a.n_buckets = int(f[0] * f[1]);
    a.factorize_buckets = true;
    if (c.bucket_factor0() != f[0])
      j.fail("num_buckets", "factors " + int_list(f) + " are not the split this model hashes with (" +
                                std::to_string(c.bucket_factor0()) + " x " +
                                std::to_string(c.bucket_factor0() ? a.n_buckets / c.bucket_factor0() : 0) + ")");
  }
  validate_config(c, source);
  return overrides.empty() ? c : parse_config(to_yaml(c), source, overrides);
}

std::vector<float> params_from_hf(const Config& cfg, const std::vector<SafeTensor>& tensors,
                                  const std::string& source) {
  std::map<std::string, const SafeTensor*> by_name;
  for (const SafeTensor& t : tensors) by_name[t.name] = &t;
  const ParamTable table = model_param_table(cfg);
  std::map<std::string, const ParamInfo*> ours;
  for (const ParamInfo& p : table.params()) ours[p.name] = &p;
  std::vector<float> params(size_t(table.total()));
  auto shape_text = [](const std::vector<int64_t>& s) { return int_list(s); };
  const SafeTensor* alias = by_name.count(kHeadBiasAlias) ? by_name[kHeadBiasAlias] : nullptr;
  for (const Link& k : links(cfg)) {
    auto it = by_name.find(k.hf);
    const SafeTensor* t = it != by_name.end() ? it->second : nullptr;
    if (k.hf == kHeadBias && alias) {
      if (t && (t->shape != alias->shape || t->data != alias->data))
        throw CheckpointError(source + ": " + kHeadBias + " and " + kHeadBiasAlias +
                              " differ (they are one parameter)");
      t = t ? t : alias;
    }
    if (!t) throw CheckpointError(source + ": tensor " + k.hf + " is missing");
    if (t->shape != k.hf_shape)
      throw CheckpointError(source + ": tensor " + k.hf + " has shape " + shape_text(t->shape) +
                            " but config.json asks for " + shape_text(k.hf_shape));
    const ParamInfo& p = *ours.at(k.ours);
    float* dst = params.data() + p.offset;
    if (k.transpose) transpose_into(t->data.data(), p.shape[1], p.shape[0], dst);
    else std::copy(t->data.begin(), t->data.end(), dst);
    by_name.erase(k.hf);
  }
  by_name.erase(kHeadBiasAlias);
  if (!by_name.empty())
    throw CheckpointError(source + ": tensor " + by_name.begin()->first +
                          " is not part of the model config.json describes" +
                          (by_name.size() > 1 ? " (and " + std::to_string(by_name.size() - 1) + " more)" : ""));
  return params;
}

void export_hf(const std::string& checkpoint, const std::string& dir) {
  const GenerationModel g = read_generation_model(checkpoint, {});
  const std::string json = hf_config_json(g.cfg);
  HeadBiasFold fold;
  const std::vector<SafeTensor> tensors = hf_tensors(g.cfg, g.params, &fold);
  if (!fold.not_folded.empty())
    log_info("reformer export: the head bias is written as lm_head.bias, not folded into "
             "reformer.encoder.layer_norm.bias (" + fold.not_folded + "); transformers versions that do "
             "not add lm_head.bias (5.x) give logits without it");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw CheckpointError(dir + ": cannot create the directory: " + ec.message());
  write_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  write_file_atomically(dir + "/config.json", json);
}

void import_hf(const std::string& dir, const std::string& out,
               const std::vector<std::string>& overrides) {
  const std::string json_path = dir + "/config.json";
  std::ifstream in(json_path, std::ios::binary);
  if (!in) throw CheckpointError(json_path + ": cannot open");
  const std::string json((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const Config cfg = config_from_hf(json, json_path, overrides);
  const std::string st_path = dir + "/model.safetensors";
  const std::vector<float> params = params_from_hf(cfg, read_safetensors(st_path), st_path);

  CheckpointState st;
  st.seed = cfg.training.seed;
  st.config_text = to_yaml(cfg);
  st.optimizer_name = to_string(cfg.optimizer.name);
  const ParamTable table = model_param_table(cfg);
  for (const ParamInfo& p : table.params())
    st.model.push_back({p.name, p.shape,
                        std::vector<float>(params.begin() + p.offset, params.begin() + p.offset + p.size)});
  // The optimizer's state as a fresh one holds it, whatever that is.
  const auto ops = make_ops(DeviceKind::cpu);
  const Optimizer<float> opt(cfg.optimizer, table, *ops);
  for (const auto& s : opt.state()) {
    auto it = std::find_if(st.optimizer.begin(), st.optimizer.end(),
                           [&](const auto& e) { return e.first == s.state; });
    if (it == st.optimizer.end()) {
      st.optimizer.emplace_back(s.state, std::vector<CheckpointTensor>{});
      it = st.optimizer.end() - 1;
    }
    CheckpointTensor t{table.params()[s.param].name, s.shape, std::vector<float>(size_t(s.size))};
    ops->to_host(t.data.data(), s.data, s.size);
    it->second.push_back(std::move(t));
  }
  write_checkpoint(out, st);
}

}  // namespace reformer
