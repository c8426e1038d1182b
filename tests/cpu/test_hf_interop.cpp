// HuggingFace interop: the safetensors format (round trip, F16/BF16, refusal
// of damaged files), the fold of the head bias into the final LayerNorm, the
// mapping of parameters (export then import gives every other parameter bit
// exact and the same logits), config.json's fields, configurations either
// side cannot express, and the `reformer export` / `reformer import` commands
// end to end (import then export gives the same bytes).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/hf_interop.h"
#include "framework/model.h"
#include "framework/model_tensors.h"
#include "framework/safetensors.h"
#include "kernels/cpu/cpu_ops.h"
#include "tests/common/checkpoint_testing.h"

namespace reformer {
namespace {

using testing_ckpt::error_of;
using testing_ckpt::read_bytes;
using testing_ckpt::TempDir;
using testing_ckpt::write_bytes;

const std::string kBin = REFORMER_BINARY;
const std::string kSrc = REFORMER_SOURCE_DIR;

uint32_t bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

// A safetensors file from a header text and data bytes, as another writer
// might lay it out.
std::string st_file(const std::string& header, const std::string& data) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(char((uint64_t(header.size()) >> (8 * i)) & 0xff));
  return out + header + data;
}

std::string le32(float v) {
  std::string s(4, '\0');
  const uint32_t b = bits(v);
  for (int i = 0; i < 4; ++i) s[size_t(i)] = char((b >> (8 * i)) & 0xff);
  return s;
}

// ---------------------------------------------------------------- safetensors

TEST(Safetensors, RoundTripIsBitExact) {
  TempDir dir;
  const float sub = std::ldexp(1.0f, -140);  // subnormal
  std::vector<SafeTensor> ts = {
      {"a.weight", {2, 3}, {1.5f, -0.0f, sub, 3e38f, -7.25f, 1e-30f}},
      {"scalar", {}, {42.0f}},
      {"empty", {0, 4}, {}},
      {"name with \"quotes\" and \\", {1}, {0.5f}},
  };
  const std::string path = dir / "m.safetensors";
  write_safetensors(path, ts, {{"format", "pt"}});
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  EXPECT_EQ(n % 8, 0u) << "header padded to 8 bytes";
  const YAML::Node h = YAML::Load(bytes.substr(8, n));
  EXPECT_EQ(h["__metadata__"]["format"].as<std::string>(), "pt");
  EXPECT_EQ(h["a.weight"]["dtype"].as<std::string>(), "F32");
  EXPECT_EQ(h["a.weight"]["data_offsets"][1].as<int>(), 24);

  const std::vector<SafeTensor> back = read_safetensors(path);
  ASSERT_EQ(back.size(), ts.size());
  for (size_t k = 0; k < ts.size(); ++k) {  // written in order, so read in order
    EXPECT_EQ(back[k].name, ts[k].name);
    EXPECT_EQ(back[k].shape, ts[k].shape);
    ASSERT_EQ(back[k].data.size(), ts[k].data.size());
    for (size_t i = 0; i < ts[k].data.size(); ++i)
      EXPECT_EQ(bits(back[k].data[i]), bits(ts[k].data[i])) << ts[k].name << "[" << i << "]";
  }
}

TEST(Safetensors, ReadsCompactJsonF16AndBf16) {
  TempDir dir;
  // As the safetensors library writes it: no spaces. F16 1, -2, 2^-24; BF16 1, -0.5.
  const std::string header =
      "{\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,6]},"
      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[6,10]},"
      "\"__metadata__\":{\"format\":\"pt\"}}";
  const std::string data = std::string("\x00\x3c\x00\xc0\x01\x00", 6) + std::string("\x80\x3f\x00\xbf", 4);
  write_bytes(dir / "x", st_file(header, data));
  const auto t = read_safetensors(dir / "x");
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0].name, "h");
  EXPECT_EQ(t[0].data, (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24)}));
  EXPECT_EQ(t[1].name, "b");
  EXPECT_EQ(t[1].data, (std::vector<float>{1.0f, -0.5f}));
}

TEST(Safetensors, RefusesDamagedFiles) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  write_safetensors(path, {{"w", {4}, {1, 2, 3, 4}}});
  const std::string good = read_bytes(path);
  auto refused = [&](const std::string& bytes) {
    write_bytes(path, bytes);
    return error_of([&] { read_safetensors(path); });
  };
  EXPECT_NE(refused(good.substr(0, good.size() - 1)).find("run past the data buffer"), std::string::npos);
  EXPECT_NE(refused(good.substr(0, 5)).find("truncated"), std::string::npos);
  std::string huge = good;
  huge[6] = '\x7f';  // header length ~ 2^55
  EXPECT_NE(refused(huge).find("header length"), std::string::npos);
  EXPECT_NE(refused(good + "xxxx").find("claim"), std::string::npos);  // unclaimed bytes
  const std::string d8 = le32(1) + le32(2);
  auto one = [](const std::string& entry) { return "{\"w\":{" + entry + "}}"; };
  EXPECT_NE(refused(st_file(one("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]"), d8))
                .find("tensor 'w': data_offsets [4, 12] run past"),
            std::string::npos);
  EXPECT_NE(refused(st_file(one("\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]"), d8))
                .find("needs 12"),
            std::string::npos);
  EXPECT_NE(refused(st_file(one("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]"), d8))
                .find("data_offsets"),
            std::string::npos);
  EXPECT_NE(refused(st_file(one("\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]"), d8))
                .find("dtype I64"),
            std::string::npos);
  EXPECT_NE(refused(st_file(one("\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]"), d8))
                .find("dim >= 0"),
            std::string::npos);
  const std::string overlap =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}";
  EXPECT_NE(refused(st_file(overlap, d8)).find("overlap or gap"), std::string::npos);
  EXPECT_NE(refused(st_file("{\"w\": [1, 2", d8)).find("not valid JSON"), std::string::npos);
  EXPECT_NE(refused(st_file("[1, 2]", "")).find("not a JSON object"), std::string::npos);
  EXPECT_NE(error_of([&] { read_safetensors(dir / "absent"); }).find("cannot open"), std::string::npos);
}

TEST(Safetensors, WriterRefusesBadTensorsAndLeavesNoFile) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  EXPECT_NE(error_of([&] { write_safetensors(path, {{"w", {2, 2}, {1, 2, 3}}}); }).find("tensor 'w'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { write_safetensors(path, {{"w", {1}, {1}}, {"w", {1}, {2}}}); })
                .find("duplicate"),
            std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

// ---------------------------------------------------------------- the head-bias fold

// Normal values for a head weight [n, v] (ours: [2D, V]), its bias [v] and a
// LayerNorm bias [n].
struct Head {
  std::vector<float> w, b, beta;
};
Head random_head(int64_t n, int64_t v, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  Head h{std::vector<float>(size_t(n * v)), std::vector<float>(size_t(v)), std::vector<float>(size_t(n))};
  for (auto* x : {&h.w, &h.b, &h.beta})
    for (float& e : *x) e = g(rng);
  return h;
}

TEST(HfInterop, FoldsTheHeadBiasIntoTheFinalLayerNorm) {
  const int64_t N = 64, V = 16;
  const Head h = random_head(N, V, 5);
  const HeadBiasFold f = fold_head_bias(h.w, h.b, h.beta);
  ASSERT_TRUE(f.folded) << f.not_folded;
  EXPECT_EQ(f.head_bias, std::vector<float>(size_t(V), 0.0f));
  // Independently, in double: W (beta' - beta) = b within the documented
  // tolerance, which here is dominated by fp32 rounding of beta' (~1e-6 of
  // |b| ~ 2), far below the bias itself.
  double worst = 0, b_max = 0;
  for (int64_t v = 0; v < V; ++v) {
    double s = 0;
    for (int64_t j = 0; j < N; ++j)
      s += double(h.w[size_t(j * V + v)]) * (double(f.ln_bias[size_t(j)]) - double(h.beta[size_t(j)]));
    worst = std::max(worst, std::fabs(s - h.b[size_t(v)]));
    b_max = std::max(b_max, std::fabs(double(h.b[size_t(v)])));
  }
  EXPECT_EQ(worst, f.residual);
  EXPECT_LE(f.residual, f.tolerance);
  EXPECT_LE(f.tolerance, 1e-3 * b_max);

  // Nothing to fold: values kept as they are (bits included).
  std::vector<float> zero(size_t(V), 0.0f);
  zero[3] = -0.0f;
  const HeadBiasFold z = fold_head_bias(h.w, zero, h.beta);
  EXPECT_FALSE(z.folded);
  EXPECT_TRUE(z.not_folded.empty());
  EXPECT_EQ(bits(z.head_bias[3]), bits(-0.0f));
  EXPECT_EQ(z.ln_bias, h.beta);
}

TEST(HfInterop, KeepsAHeadBiasThatCannotBeFolded) {
  // V > 2D: W delta = b has no solution in general; b stays in lm_head.bias.
  const Head wide = random_head(8, 12, 6);
  const HeadBiasFold f = fold_head_bias(wide.w, wide.b, wide.beta);
  EXPECT_FALSE(f.folded);
  EXPECT_EQ(f.head_bias, wide.b);
  EXPECT_EQ(f.ln_bias, wide.beta);
  EXPECT_NE(f.not_folded.find("head.weight [8, 12]: vocab_size 12 > 2 d_model 8"), std::string::npos);
  // Two tokens with the same head row but different biases: W W^T singular.
  Head same = random_head(64, 16, 7);
  for (int64_t j = 0; j < 64; ++j) same.w[size_t(j * 16 + 9)] = same.w[size_t(j * 16 + 2)];
  const HeadBiasFold s = fold_head_bias(same.w, same.b, same.beta);
  EXPECT_FALSE(s.folded);
  EXPECT_EQ(s.head_bias, same.b);
  EXPECT_NE(s.not_folded.find("head.weight [64, 16]: W W^T is"), std::string::npos) << s.not_folded;
  EXPECT_THROW(fold_head_bias(same.w, same.b, wide.beta), ShapeError);
}

// ---------------------------------------------------------------- the mapping

Config tiny(std::vector<std::string> sets = {}) {
  return load_config(kSrc + "/configs/tiny.yaml", sets);
}

// Random values for every parameter of `cfg` (not just an init: LayerNorm
// weights and biases differ from 1 and 0 too).
std::vector<float> random_params(const Config& cfg, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> p(size_t(model_param_table(cfg).total()));
  for (float& v : p) v = n(rng);
  return p;
}

// `name`'s entry (offset, size, shape) in model_param_table(cfg).
ParamInfo param(const Config& cfg, const std::string& name) {
  for (const ParamInfo& p : model_param_table(cfg).params())
    if (p.name == name) return p;
  throw ShapeError("no parameter " + name);
}

TEST(HfInterop, ExportThenImportKeepsEveryParameterButTheFoldedBias) {
  const Config cfg = tiny({"model.d_head=8", "model.n_layers=3", "attention.n_hashes=1"});
  const std::vector<float> p = random_params(cfg, 7);
  HeadBiasFold fold;
  const std::vector<SafeTensor> ts = hf_tensors(cfg, p, &fold);
  ASSERT_TRUE(fold.folded) << fold.not_folded;
  // Shapes as transformers' modules hold them (torch Linear: [out, in]).
  auto shape_of = [&](const std::string& name) {
    for (const SafeTensor& t : ts)
      if (t.name == name) return t.shape;
    ADD_FAILURE() << name << " not exported";
    return std::vector<int64_t>{};
  };
  EXPECT_EQ(shape_of("reformer.embeddings.word_embeddings.weight"), (std::vector<int64_t>{16, 32}));
  EXPECT_EQ(shape_of("reformer.embeddings.position_embeddings.weights.0"), (std::vector<int64_t>{4, 1, 16}));
  EXPECT_EQ(shape_of("reformer.embeddings.position_embeddings.weights.1"), (std::vector<int64_t>{1, 8, 16}));
  EXPECT_EQ(shape_of("reformer.encoder.layers.2.attention.self_attention.query_key.weight"),
            (std::vector<int64_t>{16, 32}));  // H * dh = 2 * 8 rows, D columns
  EXPECT_EQ(shape_of("reformer.encoder.layers.0.attention.output.dense.weight"), (std::vector<int64_t>{32, 16}));
  EXPECT_EQ(shape_of("reformer.encoder.layers.1.feed_forward.dense.dense.weight"), (std::vector<int64_t>{64, 32}));
  EXPECT_EQ(shape_of("reformer.encoder.layers.1.feed_forward.output.dense.weight"), (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(shape_of("reformer.encoder.layer_norm.weight"), (std::vector<int64_t>{64}));
  EXPECT_EQ(shape_of("lm_head.decoder.weight"), (std::vector<int64_t>{16, 64}));
  EXPECT_EQ(shape_of("lm_head.bias"), (std::vector<int64_t>{16}));
  EXPECT_EQ(ts.size(), 3 + 3 * 11 + 2 + 2u);  // no lm_head.decoder.bias (transformers 5.x has none)
  EXPECT_EQ(ts.back().name, "lm_head.bias");
  EXPECT_EQ(ts.back().data, std::vector<float>(16, 0.0f));  // folded

  // One value checks the transpose: ours wqk[i][j] (in i, out j) is HF's [j][i].
  const ParamTable table = model_param_table(cfg);
  for (const ParamInfo& pi : table.params())
    if (pi.name == "layers.2.attn.wqk")
      for (const SafeTensor& t : ts)
        if (t.name == "reformer.encoder.layers.2.attention.self_attention.query_key.weight")
          EXPECT_EQ(bits(t.data[size_t(5 * 32 + 3)]), bits(p[size_t(pi.offset + 3 * 16 + 5)]));

  const Config back = config_from_hf(hf_config_json(cfg), "config.json");
  EXPECT_EQ(back.model.n_layers, 3);
  EXPECT_EQ(back.head_dim(), 8);
  const std::vector<float> q = params_from_hf(back, ts, "model.safetensors");
  ASSERT_EQ(q.size(), p.size());
  const ParamInfo hb = param(cfg, "head.bias"), lb = param(cfg, "ln_out.bias");
  for (int64_t i = 0; i < int64_t(p.size()); ++i) {
    if (i >= hb.offset && i < hb.offset + hb.size) ASSERT_EQ(q[size_t(i)], 0.0f);
    else if (i >= lb.offset && i < lb.offset + lb.size)
      ASSERT_EQ(bits(q[size_t(i)]), bits(fold.ln_bias[size_t(i - lb.offset)]));
    else ASSERT_EQ(bits(q[size_t(i)]), bits(p[size_t(i)])) << "element " << i;
  }
  // Exported again, the imported parameters give the same tensors (nothing
  // left to fold): export is idempotent.
  const std::vector<SafeTensor> again = hf_tensors(back, q);
  ASSERT_EQ(again.size(), ts.size());
  for (size_t k = 0; k < ts.size(); ++k) EXPECT_TRUE(again[k].data == ts[k].data) << ts[k].name;
}

std::vector<float> cpu_logits(const Config& cfg, const std::vector<float>& params) {
  std::vector<int32_t> tokens(size_t(cfg.model.max_len));
  for (size_t t = 0; t < tokens.size(); ++t) tokens[t] = int32_t((7 * t + 3) % size_t(cfg.model.vocab_size));
  CpuOps<float> ops;
  ReformerModel<float> model(cfg, ops);
  ops.from_host(model.params(), params.data(), model.num_params());
  std::vector<float> logits;
  model.forward_logits(tokens.data(), 3, &logits);
  return logits;
}

TEST(HfInterop, ExportThenImportGivesTheSameLogits) {
  // LSH over 4 chunks and 2 rounds; both parameter sets see the same tokens and rotations.
  const Config cfg = tiny({"attention.n_hashes=2"});
  const std::vector<float> p = random_params(cfg, 9);
  HeadBiasFold fold;
  const std::vector<float> q = params_from_hf(cfg, hf_tensors(cfg, p, &fold), "m");
  ASSERT_TRUE(fold.folded);
  const std::vector<float> a = cpu_logits(cfg, p), b = cpu_logits(cfg, q);
  // Everything below the final LayerNorm is bit-identical, so the LayerNorm
  // output n (|n_j| <= sqrt(N), N = 2D) is too. Logits are sum_j h_j W_jv (+ b_v)
  // with h = n g + beta (or beta'); in exact arithmetic they differ by at most
  // fold.residual, and each fp32 evaluation (N + 1 products and sums, any
  // order) errs by at most gamma sum_j |h_j W_jv| (+ |b_v|), gamma = (N + 1) u.
  const int64_t N = 2 * cfg.model.d_model, V = cfg.model.vocab_size;
  const ParamInfo w = param(cfg, "head.weight"), g = param(cfg, "ln_out.weight"),
                  beta = param(cfg, "ln_out.bias"), hb = param(cfg, "head.bias");
  const double gamma = double(N + 1) * std::ldexp(1.0, -24);
  std::vector<double> tol(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) {
    double bound = 0;  // sum_j |W_jv| max |h_j| over both parameter sets
    for (int64_t j = 0; j < N; ++j) {
      const double h = std::fabs(p[size_t(g.offset + j)]) * std::sqrt(double(N)) +
                       std::max(std::fabs(p[size_t(beta.offset + j)]), std::fabs(fold.ln_bias[size_t(j)]));
      bound += std::fabs(p[size_t(w.offset + j * V + v)]) * h;
    }
    tol[size_t(v)] = fold.residual + gamma * (2 * bound + std::fabs(p[size_t(hb.offset + v)]));
  }
  ASSERT_EQ(a.size(), b.size());
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
    bad += std::fabs(double(a[i]) - b[i]) > tol[i % size_t(V)];
  }
  EXPECT_EQ(bad, 0) << "max |difference| " << worst;
  // The bias is there to lose: without it the logits move by ~|b| (order 1).
  std::vector<float> dropped = p;
  std::fill_n(dropped.begin() + hb.offset, hb.size, 0.0f);
  const std::vector<float> c = cpu_logits(cfg, dropped);
  double moved = 0;
  for (size_t i = 0; i < a.size(); ++i) moved = std::max(moved, std::fabs(double(a[i]) - c[i]));
  EXPECT_GT(moved, 100 * worst);
}

TEST(HfInterop, ConfigJsonHasTheFieldsTransformersReads) {
  const Config cfg = tiny({"model.activation=gelu", "model.layernorm_eps=1e-5", "model.dropout=0.1",
                           "attention.n_hashes=4", "attention.chunks_before=2"});
  const YAML::Node j = YAML::Load(hf_config_json(cfg));
  EXPECT_EQ(j["model_type"].as<std::string>(), "reformer");
  EXPECT_EQ(j["architectures"][0].as<std::string>(), "ReformerModelWithLMHead");
  EXPECT_EQ(j["attn_layers"].size(), 2u);
  EXPECT_EQ(j["attn_layers"][1].as<std::string>(), "lsh");
  EXPECT_EQ(j["hidden_size"].as<int>(), 32);
  EXPECT_EQ(j["num_attention_heads"].as<int>(), 2);
  EXPECT_EQ(j["attention_head_size"].as<int>(), 16);
  EXPECT_EQ(j["feed_forward_size"].as<int>(), 64);
  EXPECT_EQ(j["vocab_size"].as<int>(), 16);
  EXPECT_EQ(j["max_position_embeddings"].as<int>(), 32);
  EXPECT_EQ(j["axial_pos_shape"][0].as<int>() * j["axial_pos_shape"][1].as<int>(), 32);
  EXPECT_EQ(j["axial_pos_embds_dim"][0].as<int>() + j["axial_pos_embds_dim"][1].as<int>(), 32);
  EXPECT_TRUE(j["axial_pos_embds"].as<bool>());
  EXPECT_EQ(j["hidden_act"].as<std::string>(), "gelu_new");  // tanh approximation, as ours
  EXPECT_EQ(j["layer_norm_eps"].as<double>(), 1e-5);         // exact decimal text
  EXPECT_EQ(j["hidden_dropout_prob"].as<double>(), 0.1);
  EXPECT_EQ(j["lsh_attn_chunk_length"].as<int>(), 8);
  EXPECT_EQ(j["lsh_num_chunks_before"].as<int>(), 2);
  EXPECT_EQ(j["lsh_num_chunks_after"].as<int>(), 0);
  EXPECT_EQ(j["num_hashes"].as<int>(), 4);
  EXPECT_EQ(j["num_buckets"].as<int>(), 8);  // 2 * 32 / 8
  EXPECT_TRUE(j["is_decoder"].as<bool>());
  EXPECT_FALSE(j["tie_word_embeddings"].as<bool>());
  EXPECT_EQ(j["chunk_size_lm_head"].as<int>(), 0);
  EXPECT_EQ(j["pad_token_id"].as<int>(), 0);
  EXPECT_TRUE(j["eos_token_id"].IsNull());

  const Config f = tiny({"model.max_len=256", "attention.factorize_buckets=true"});
  const YAML::Node fj = YAML::Load(hf_config_json(f));
  EXPECT_EQ(fj["num_buckets"][0].as<int>(), 8);  // 64 = 8 x 8, factor 0 first
  EXPECT_EQ(fj["num_buckets"][1].as<int>(), 8);
  const Config fb = config_from_hf(hf_config_json(f), "config.json");
  EXPECT_TRUE(fb.attention.factorize_buckets);
  EXPECT_EQ(fb.buckets(), 64);
}

TEST(HfInterop, ExactAttentionKindsMapToWholeSequenceChunks) {
  // At max_len <= bucket_size every kind runs exact attention, as HF's lsh
  // layers do for a sequence within one chunk.
  const Config small = tiny({"attention.kinds=[lsh, local, full]", "model.n_layers=3",
                             "attention.bucket_size=32"});
  YAML::Node j = YAML::Load(hf_config_json(small));
  for (int l = 0; l < 3; ++l) EXPECT_EQ(j["attn_layers"][l].as<std::string>(), "lsh");
  EXPECT_EQ(j["lsh_attn_chunk_length"].as<int>(), 32);
  // A model of full layers only: one chunk holds the whole sequence.
  j = YAML::Load(hf_config_json(tiny({"attention.kinds=[full]"})));
  EXPECT_EQ(j["lsh_attn_chunk_length"].as<int>(), 32);
  EXPECT_EQ(config_from_hf(hf_config_json(tiny({"attention.kinds=[full]"})), "c").attention.bucket_size, 32);
}

TEST(HfInterop, RefusesWhatHfCannotExpress) {
  auto config_error = [](auto&& fn) -> std::string {
    try {
      fn();
    } catch (const ConfigError& e) {
      return e.what();
    }
    ADD_FAILURE() << "expected a ConfigError";
    return "";
  };
  EXPECT_NE(config_error([] { hf_config_json(tiny({"attention.kinds=[lsh, local]"})); })
                .find("attention.kinds: layer 1 is 'local'"),
            std::string::npos);
  EXPECT_NE(config_error([] { hf_tensors(tiny({"attention.kinds=[full, lsh]"}), {}); })
                .find("attention.kinds: layer 0 is 'full'"),
            std::string::npos);
  EXPECT_NE(config_error([] { hf_config_json(tiny({"attention.causal=false"})); }).find("attention.causal"),
            std::string::npos);

  // Import: what our model cannot run, named by HF's key.
  const std::string good = hf_config_json(tiny());
  // config.json with one line's value replaced.
  auto with = [&](const std::string& key, const std::string& value) {
    const std::string k = "\"" + key + "\": ";
    const size_t at = good.find(k) + k.size(), end = good.find('\n', at);
    return good.substr(0, at) + value + good.substr(good[end - 1] == ',' ? end - 1 : end);
  };
  EXPECT_NO_THROW(config_from_hf(with("hidden_act", "relu"), "c.json"));
  EXPECT_NE(config_error([&] { config_from_hf(with("hidden_act", "gelu"), "c.json"); })
                .find("c.json: hidden_act: 'gelu'"),
            std::string::npos);
  EXPECT_NE(config_error([&] { config_from_hf(with("attn_layers", "[lsh, local]"), "c.json"); })
                .find("c.json: attn_layers: layer 1 is 'local'"),
            std::string::npos);
  EXPECT_NE(config_error([&] { config_from_hf(with("is_decoder", "false"), "c.json"); }).find("is_decoder"),
            std::string::npos);
  EXPECT_NE(config_error([&] { config_from_hf(with("lsh_num_chunks_after", "1"), "c.json"); })
                .find("lsh_num_chunks_after"),
            std::string::npos);
  EXPECT_NE(config_error([&] { config_from_hf(with("hidden_size", "\"wide\""), "c.json"); })
                .find("hidden_size"),
            std::string::npos);
  EXPECT_NE(config_error([&] { config_from_hf(with("num_buckets", "[4, 16]"), "c.json"); })
                .find("num_buckets"),
            std::string::npos);  // 64 hashes here as 8 x 8
  EXPECT_NE(config_error([] { config_from_hf("{not json", "c.json"); }).find("c.json"), std::string::npos);
}

TEST(HfInterop, AbsentKeysTakeHfDefaults) {
  const Config c = config_from_hf(R"({"model_type": "reformer", "is_decoder": true,
      "attn_layers": ["lsh", "lsh"], "max_position_embeddings": 65536,
      "axial_pos_shape": [256, 256]})", "c.json");
  EXPECT_EQ(c.model.vocab_size, 320);
  EXPECT_EQ(c.model.d_model, 256);
  EXPECT_EQ(c.model.n_heads, 12);
  EXPECT_EQ(c.head_dim(), 64);
  EXPECT_EQ(c.model.d_ff, 512);
  EXPECT_EQ(c.model.activation, Activation::relu);
  EXPECT_EQ(c.model.layernorm_eps, 1e-12);
  EXPECT_EQ(c.attention.bucket_size, 64);
  EXPECT_EQ(c.attention.n_hashes, 1);
  // num_buckets null: HF picks 2 * 65536 / 64 = 2048 at the first pass, and
  // factorizes it past 2 * max(sqrt(1024), 64) = 128 as [32, 64].
  EXPECT_EQ(c.buckets(), 2048);
  EXPECT_EQ(c.bucket_factor0(), 32);
}

TEST(HfInterop, ImportRefusesMissingExtraAndMisshapenTensors) {
  const Config cfg = tiny();
  const std::vector<SafeTensor> good = hf_tensors(cfg, random_params(cfg, 3));
  auto refused = [&](std::vector<SafeTensor> ts) {
    return error_of([&] { params_from_hf(cfg, ts, "m.safetensors"); });
  };
  std::vector<SafeTensor> ts = good;
  ts.erase(ts.begin() + 4);
  EXPECT_NE(refused(ts).find("m.safetensors: tensor reformer.encoder.layers.0.attention.layer_norm.bias is missing"),
            std::string::npos);
  ts = good;
  ts.push_back({"reformer.encoder.layers.9.attention.layer_norm.bias", {32}, std::vector<float>(32)});
  EXPECT_NE(refused(ts).find("layers.9.attention.layer_norm.bias is not part of the model"), std::string::npos);
  ts = good;
  ts[0].shape = {32, 16};
  EXPECT_NE(refused(ts).find("word_embeddings.weight has shape [32, 16] but config.json asks for [16, 32]"),
            std::string::npos);
  // transformers 4.x saves the head bias under two names, one parameter.
  ts = good;
  ASSERT_EQ(ts.back().name, "lm_head.bias");
  ts.back().data[1] = 0.25f;
  ts.push_back({"lm_head.decoder.bias", ts.back().shape, ts.back().data});
  EXPECT_NO_THROW(params_from_hf(cfg, ts, "m"));
  ts.back().data[0] += 1;
  EXPECT_NE(refused(ts).find("differ"), std::string::npos);
  ts.erase(ts.end() - 2);  // either name alone is enough
  const ParamInfo hb = param(cfg, "head.bias");
  EXPECT_EQ(params_from_hf(cfg, ts, "m")[size_t(hb.offset + 1)], 0.25f);
}

// ---------------------------------------------------------------- the commands

int run(const std::string& cmd) {
  const int st = std::system((cmd + " >/dev/null 2>&1").c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

TEST(HfInteropCli, ImportThenExportGivesTheSameFolderAndATrainableCheckpoint) {
  TempDir dir;
  const Config cfg = tiny();
  const std::string a = dir / "a", b = dir / "b", ck = dir / "imported.h5";
  std::filesystem::create_directories(a);
  write_safetensors(a + "/model.safetensors", hf_tensors(cfg, random_params(cfg, 11)), {{"format", "pt"}});
  write_bytes(a + "/config.json", hf_config_json(cfg));

  ASSERT_EQ(run(kBin + " import --from " + a + " --out " + ck + " --set training.steps=1"), 0);
  const CheckpointState st = read_checkpoint(ck);
  EXPECT_EQ(st.step, 0);
  EXPECT_EQ(st.optimizer_name, "adamw");
  ASSERT_FALSE(st.optimizer.empty());
  for (const auto& [name, tensors] : st.optimizer)
    for (const auto& t : tensors)
      for (const float v : t.data) ASSERT_EQ(v, 0.0f) << name << "/" << t.name;

  ASSERT_EQ(run(kBin + " export --checkpoint " + ck + " --format hf --out " + b), 0);
  EXPECT_EQ(read_bytes(b + "/model.safetensors"), read_bytes(a + "/model.safetensors"));
  EXPECT_EQ(read_bytes(b + "/config.json"), read_bytes(a + "/config.json"));
  // The imported checkpoint loads and evaluates like any other.
  EXPECT_EQ(run(kBin + " eval --checkpoint " + ck + " --batches 1"), 0);

  // Exit statuses: usage 2, a model HF cannot express 2, a damaged input 1.
  EXPECT_EQ(run(kBin + " export --checkpoint " + ck + " --out " + b), 2);  // no --format
  EXPECT_EQ(run(kBin + " import --from " + a), 2);
  write_bytes(a + "/model.safetensors", read_bytes(a + "/model.safetensors").substr(0, 100));
  EXPECT_EQ(run(kBin + " import --from " + a + " --out " + (dir / "x.h5")), 1);
  EXPECT_FALSE(std::filesystem::exists(dir / "x.h5"));
  const std::string local = dir / "local";
  ASSERT_EQ(run(kBin + " train --config " + kSrc + "/configs/tiny.yaml --set training.steps=1" +
                " --set attention.kinds=[lsh,local] --set checkpoint.dir=" + local),
            0);
  EXPECT_EQ(run(kBin + " export --checkpoint " + local + "/ckpt-00000001.h5 --format hf --out " + b), 2);
}

}  // namespace
}  // namespace reformer
