// Configuration: parsing, overrides, per-key and cross-field validation,
// printing, and the recipes in configs/.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/resume_check.h"
#include "kernels/errors.h"

namespace reformer {
namespace {

// The message of the ConfigError `f` throws; fails the test if none.
std::string config_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no ConfigError thrown";
  return "";
}

std::string parse_error(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return config_error([&] { parse_config(yaml, "configs/x.yaml", overrides); });
}

std::string set_error(const std::string& override_text) {
  return config_error([&] { parse_config("", "configs/x.yaml", {override_text}); });
}

TEST(Config, DefaultsAreValid) {
  Config c;
  EXPECT_NO_THROW(validate_config(c));
  EXPECT_EQ(c.head_dim(), 32);
  EXPECT_EQ(parse_config("", "empty.yaml"), c);
}

TEST(Config, EveryRecipeLoadsAndValidates) {
  namespace fs = std::filesystem;
  int count = 0;
  for (const auto& entry : fs::directory_iterator(fs::path(REFORMER_SOURCE_DIR) / "configs")) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    Config c;
    EXPECT_NO_THROW(c = load_config(entry.path().string()));
    EXPECT_EQ(parse_config(to_yaml(c), "printed"), c);
    ++count;
  }
  EXPECT_GE(count, 6);
}

TEST(Config, RecipeValues) {
  std::string dir = std::string(REFORMER_SOURCE_DIR) + "/configs/";
  Config tiny = load_config(dir + "tiny.yaml");
  EXPECT_EQ(tiny.model.d_model, 32);
  EXPECT_EQ(tiny.model.max_len, 32);
  EXPECT_EQ(tiny.attention.bucket_size, 8);
  EXPECT_EQ(tiny.training.steps, 30);
  EXPECT_EQ(tiny.data.kind, DataKind::duplication);
  Config enwik8 = load_config(dir + "enwik8.yaml");
  EXPECT_EQ(enwik8.model.max_len, 65536);
  EXPECT_EQ(enwik8.data.kind, DataKind::bytes);
  EXPECT_EQ(enwik8.optimizer.name, OptimizerKind::adafactor);
  Config dp = load_config(dir + "multi-gpu-dp.yaml");
  EXPECT_EQ(dp.parallel.dp, 0);  // auto: the number of processes
  EXPECT_EQ(dp.parallel.backend, CommBackend::nccl);
  Config sp = load_config(dir + "long-2m-sp2.yaml");
  EXPECT_EQ(sp.parallel.sp, 2);
  EXPECT_EQ(sp.model.max_len, 2097152);
  // Only the peers' benchmark model factorizes its buckets (as HF does there).
  Config peer = load_config(dir + "bench-peer.yaml");
  EXPECT_TRUE(peer.attention.factorize_buckets);
  EXPECT_EQ(peer.buckets(), 512);  // 2 * 16384 / 64
  EXPECT_EQ(peer.bucket_factor0(), 16);
  EXPECT_FALSE(tiny.attention.factorize_buckets);
  EXPECT_FALSE(enwik8.attention.factorize_buckets);
}

TEST(Config, UnknownKeyNamesKeyFileAndLine) {
  std::string msg = parse_error("model:\n  d_model: 64\n  n_layers: 2\n  foo_bar: 3\n");
  EXPECT_EQ(msg, "configs/x.yaml:4: unknown key 'model.foo_bar'");
}

TEST(Config, UnknownKeySuggestsNearest) {
  std::string msg = parse_error("model:\n\n  d_modle: 64\n");
  EXPECT_EQ(msg, "configs/x.yaml:3: unknown key 'model.d_modle' (did you mean 'model.d_model'?)");
  // The right key under the wrong section.
  EXPECT_NE(parse_error("model:\n  bucket_size: 16\n").find("'attention.bucket_size'"),
            std::string::npos);
}

TEST(Config, UnknownSection) {
  std::string msg = parse_error("model:\n  d_model: 64\nmodle:\n  d_ff: 3\n");
  EXPECT_NE(msg.find("configs/x.yaml:3: unknown section 'modle'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("did you mean 'model'?"), std::string::npos) << msg;
}

TEST(Config, WrongType) {
  std::string yaml = "# comment\nmodel:\n  d_model: 64\n  n_layers: 2\n\n\n  n_heads: four\n";
  EXPECT_EQ(parse_error(yaml), "configs/x.yaml:7: model.n_heads: expected an integer, got 'four'");
  EXPECT_EQ(parse_error("optimizer:\n  lr: fast\n"),
            "configs/x.yaml:2: optimizer.lr: expected a number, got 'fast'");
  EXPECT_EQ(parse_error("attention:\n  causal: maybe\n"),
            "configs/x.yaml:2: attention.causal: expected true or false, got 'maybe'");
  EXPECT_EQ(parse_error("model:\n  d_model: [1, 2]\n"),
            "configs/x.yaml:2: model.d_model: expected an integer, got a list");
  EXPECT_EQ(parse_error("model:\n  d_model: 64.5\n"),
            "configs/x.yaml:2: model.d_model: expected an integer, got '64.5'");
  EXPECT_EQ(parse_error("training:\n  seed: -1\n"),
            "configs/x.yaml:2: training.seed: expected a non-negative integer, got '-1'");
}

TEST(Config, OutOfRange) {
  EXPECT_EQ(parse_error("model:\n  n_heads: 0\n"),
            "configs/x.yaml:2: model.n_heads = 0 is out of range [1, 4096]");
  EXPECT_EQ(parse_error("model:\n  dropout: 1.0\n"),
            "configs/x.yaml:2: model.dropout = 1.0 is out of range [0, 1)");
  EXPECT_EQ(parse_error("model:\n  max_len: 99999999999999999999\n"),
            "configs/x.yaml:2: model.max_len = 99999999999999999999 is out of range [1, 1073741824]");
}

TEST(Config, BadEnum) {
  EXPECT_EQ(parse_error("optimizer:\n  name: sgd\n"),
            "configs/x.yaml:2: optimizer.name: 'sgd' is not one of adamw, adafactor");
  EXPECT_EQ(parse_error("attention:\n  kinds: [lsh, lhs]\n"),
            "configs/x.yaml:2: attention.kinds[1]: 'lhs' is not one of lsh, full, local");
  // Block lists report the element's own line.
  EXPECT_EQ(parse_error("attention:\n  kinds:\n    - lsh\n    - lhs\n"),
            "configs/x.yaml:4: attention.kinds[1]: 'lhs' is not one of lsh, full, local");
}

TEST(Config, YamlSyntaxErrorNamesLine) {
  std::string msg = parse_error("model:\n  d_model: 64\n   n_heads: 4\nattention:\n  n_hashes: 2\n");
  EXPECT_EQ(msg.rfind("configs/x.yaml:", 0), 0u) << msg;
  EXPECT_NE(msg.find("YAML syntax error"), std::string::npos) << msg;
  EXPECT_NE(msg.find("configs/x.yaml:3:"), std::string::npos) << msg;
}

TEST(Config, TopLevelMustBeAMap) {
  EXPECT_NE(parse_error("- model\n- attention\n").find("top level must be a map"),
            std::string::npos);
  EXPECT_NE(parse_error("model: 3\n").find("model: expected a map of keys"), std::string::npos);
}

TEST(Config, DuplicateKey) {
  std::string msg = parse_error("model:\n  d_model: 64\n  d_model: 32\n");
  EXPECT_EQ(msg, "configs/x.yaml:3: model.d_model appears twice (first at line 2)");
}

TEST(Config, MissingFile) {
  std::string msg = config_error([] { load_config("/nonexistent/dir/x.yaml"); });
  EXPECT_NE(msg.find("cannot open config file"), std::string::npos) << msg;
  EXPECT_NE(msg.find("/nonexistent/dir/x.yaml"), std::string::npos) << msg;
}

TEST(Config, LoadConfigReportsPathAndLine) {
  std::string path = testing::TempDir() + "test_config_bad.yaml";
  {
    std::ofstream out(path);
    out << "model:\n  d_model: 64\ntraining:\n  step: 5\n";
  }
  std::string msg = config_error([&] { load_config(path); });
  EXPECT_EQ(msg, path + ":4: unknown key 'training.step' (did you mean 'training.steps'?)");
  std::filesystem::remove(path);
}

TEST(Config, MissingKeysKeepDefaults) {
  Config c = parse_config("model:\n  d_model: 64\n", "x.yaml");
  Config d;
  EXPECT_EQ(c.model.d_model, 64);
  EXPECT_EQ(c.model.n_heads, d.model.n_heads);
  EXPECT_EQ(c.optimizer, d.optimizer);
  EXPECT_EQ(c.attention, d.attention);
}

TEST(Config, SetOverrides) {
  Config c = parse_config("model:\n  d_model: 64\n", "x.yaml",
                          {"model.d_model=96", "optimizer.lr=2.5e-4", "training.device=auto",
                           "attention.kinds=[lsh,full]", "attention.causal=false",
                           "training.seed=18446744073709551615", "model.d_model = 128"});
  EXPECT_EQ(c.model.d_model, 128);  // later overrides win
  EXPECT_EQ(c.optimizer.lr, 2.5e-4);
  EXPECT_EQ(c.training.device, DeviceKind::auto_);
  EXPECT_EQ(c.attention.kinds, (std::vector<AttentionKind>{AttentionKind::lsh, AttentionKind::full}));
  EXPECT_FALSE(c.attention.causal);
  EXPECT_EQ(c.training.seed, 18446744073709551615ull);
  EXPECT_EQ(c.attention_kind(3), AttentionKind::full);
  // A single scalar is a one-element list; an empty value an empty string.
  Config d = parse_config("", "x.yaml", {"attention.kinds=local", "logging.metrics="});
  EXPECT_EQ(d.attention.kinds, (std::vector<AttentionKind>{AttentionKind::local}));
  EXPECT_EQ(d.logging.metrics, "");
  Config e = parse_config("", "x.yaml", {"model.axial_shape=[16, 16]"});
  EXPECT_EQ(e.model.axial_shape, (std::vector<int>{16, 16}));
}

TEST(Config, SetErrors) {
  EXPECT_EQ(set_error("model.d_model=abc"),
            "--set model.d_model=abc: model.d_model: expected an integer, got 'abc'");
  EXPECT_EQ(set_error("model.d_modle=64"),
            "--set model.d_modle=64: unknown key 'model.d_modle' (did you mean 'model.d_model'?)");
  EXPECT_EQ(set_error("model.d_model"), "--set model.d_model: expected KEY=VALUE, e.g. model.d_model=256");
  EXPECT_EQ(set_error("attention.kinds=[lsh,lhs]"),
            "--set attention.kinds=[lsh,lhs]: attention.kinds[1]: 'lhs' is not one of lsh, full, local");
  EXPECT_EQ(set_error("model.n_heads=0"),
            "--set model.n_heads=0: model.n_heads = 0 is out of range [1, 4096]");
  std::string msg = set_error("attention.kinds=[lsh,");
  EXPECT_EQ(msg.rfind("--set attention.kinds=[lsh,: attention.kinds: cannot read", 0), 0u) << msg;
}

TEST(Config, CrossFieldBucketSize) {
  std::string msg = parse_error("model:\n  max_len: 100\nattention:\n  bucket_size: 32\n");
  EXPECT_EQ(msg.rfind("configs/x.yaml:2: model.max_len = 100 is not a multiple of attention.bucket_size = 32", 0),
            0u) << msg;
  // Full attention only: no constraint.
  EXPECT_NO_THROW(parse_config("model:\n  max_len: 100\nattention:\n  kinds: [full]\n", "x.yaml"));
  // Set from the command line: the message still starts with the file.
  msg = parse_error("", {"model.max_len=100"});
  EXPECT_EQ(msg.rfind("configs/x.yaml: model.max_len = 100", 0), 0u) << msg;
}

TEST(Config, CrossFieldAxial) {
  EXPECT_EQ(parse_error("model:\n  d_model: 64\n  axial_dims: [32, 16]\n"),
            "configs/x.yaml:3: model.axial_dims = [32, 16] sums to 48, not model.d_model = 64");
  EXPECT_EQ(parse_error("model:\n  max_len: 256\n  axial_shape: [8, 16]\n"),
            "configs/x.yaml:3: model.axial_shape = [8, 16] covers 128 positions, fewer than "
            "model.max_len = 256");
  EXPECT_NE(parse_error("model:\n  axial_shape: [8, 8, 8]\n").find("must have 2 entries"),
            std::string::npos);
}

TEST(Config, CrossFieldAttentionAndHeads) {
  EXPECT_EQ(parse_error("attention:\n  causal: true\n  chunks_after: 1\n"),
            "configs/x.yaml:3: attention.chunks_after = 1 must be 0 when attention.causal is true");
  EXPECT_NO_THROW(parse_config("attention:\n  causal: false\n  chunks_after: 1\n", "x.yaml"));
  EXPECT_NE(parse_error("attention:\n  n_buckets: 7\n").find("attention.n_buckets = 7 must be even"),
            std::string::npos);
  EXPECT_NE(parse_error("model:\n  d_model: 130\n  n_heads: 4\n").find("model.n_heads = 4"),
            std::string::npos);
  EXPECT_NO_THROW(parse_config("model:\n  d_model: 130\n  n_heads: 4\n  d_head: 32\n  axial_dims: [65, 65]\n",
                               "x.yaml"));
}

TEST(Config, CrossFieldDataAndParallel) {
  EXPECT_NE(parse_error("data:\n  kind: bytes\n").find("data.path"), std::string::npos);
  EXPECT_NE(parse_error("model:\n  vocab_size: 16\ndata:\n  dup_symbols: 17\n").find("data.dup_symbols = 17"),
            std::string::npos);
  EXPECT_NE(parse_error("model:\n  vocab_size: 2\n").find("at least 3"), std::string::npos);
  EXPECT_NE(parse_error("model:\n  max_len: 33\nattention:\n  kinds: [full]\n").find("must be even"),
            std::string::npos);
  EXPECT_NE(parse_error("data:\n  valid_fraction: 0.5\n  test_fraction: 0.5\n").find("less than 1"),
            std::string::npos);
  EXPECT_NE(parse_error("parallel:\n  dp: 2\n  backend: mpi\ntraining:\n  batch_size: 3\n")
                .find("training.batch_size = 3 is not divisible by parallel.dp = 2"),
            std::string::npos);
  EXPECT_NE(parse_error("parallel:\n  dp: 2\n").find("parallel.backend"), std::string::npos);
  EXPECT_NE(parse_error("checkpoint:\n  keep: 0\n").find("checkpoint.keep = 0 is out of range"),
            std::string::npos);
}

TEST(Config, DerivedAxialDefaults) {
  Config c = parse_config("model:\n  max_len: 32\n  d_model: 33\n  n_heads: 3\n", "x.yaml");
  EXPECT_EQ(c.model.axial_shape, (std::vector<int>{4, 8}));  // a2 = 8 >= sqrt(32)
  EXPECT_EQ(c.model.axial_dims, (std::vector<int>{16, 17}));
  Config d = parse_config("model:\n  max_len: 1000\nattention:\n  bucket_size: 8\n", "x.yaml");
  EXPECT_EQ(d.model.axial_shape, (std::vector<int>{32, 32}));  // ceil(1000 / 32) = 32
  Config e = parse_config("model:\n  max_len: 65536\n", "x.yaml");
  EXPECT_EQ(e.model.axial_shape, (std::vector<int>{256, 256}));
  Config f = parse_config("model:\n  max_len: 96\n", "x.yaml");
  EXPECT_EQ(f.model.axial_shape, (std::vector<int>{6, 16}));
  // Given values are kept.
  Config g = parse_config("model:\n  max_len: 64\n  axial_shape: [2, 32]\n", "x.yaml");
  EXPECT_EQ(g.model.axial_shape, (std::vector<int>{2, 32}));
}

TEST(Config, Buckets) {
  Config c = parse_config("model:\n  max_len: 1024\nattention:\n  bucket_size: 64\n", "x.yaml");
  EXPECT_EQ(c.buckets(), 32);
  c = parse_config("model:\n  max_len: 96\nattention:\n  bucket_size: 32\n", "x.yaml");
  EXPECT_EQ(c.buckets(), 8);  // 2 * 96 / 32 = 6, rounded up
  c = parse_config("model:\n  max_len: 32\nattention:\n  bucket_size: 32\n", "x.yaml");
  EXPECT_EQ(c.buckets(), 2);
  c = parse_config("attention:\n  n_buckets: 6\n", "x.yaml");
  EXPECT_EQ(c.buckets(), 6);
  EXPECT_EQ(c.bucket_factor0(), 0);  // not factorized by default
}

TEST(Config, FactorizeBuckets) {
  Config c;
  EXPECT_FALSE(c.attention.factorize_buckets);
  // Auto n_buckets = 2 * 1024 / 64 = 32 = 2^5: f0 = 2^2, f1 = 2^3.
  const std::string auto32 = "model:\n  max_len: 1024\nattention:\n  bucket_size: 64\n";
  c = parse_config(auto32, "x.yaml");
  EXPECT_EQ(c.bucket_factor0(), 0);
  c = parse_config(auto32, "x.yaml", {"attention.factorize_buckets=true"});
  EXPECT_EQ(c.buckets(), 32);
  EXPECT_EQ(c.bucket_factor0(), 4);
  // Explicit powers of two: 2^k -> f0 = 2^floor(k/2); fewer than 4 buckets are not factorized.
  for (const auto& [nb, f0] : {std::pair{2, 0}, std::pair{4, 2}, std::pair{8, 2},
                               std::pair{16, 4}, std::pair{2048, 32}, std::pair{32768, 128}}) {
    c = parse_config("", "x.yaml",
                     {"attention.factorize_buckets=true", "attention.n_buckets=" + std::to_string(nb)});
    EXPECT_EQ(c.bucket_factor0(), f0) << nb;
    if (f0 > 0) {
      EXPECT_EQ(nb % f0, 0) << nb;
      EXPECT_GE(nb / f0, f0) << nb;
      EXPECT_LE(nb / f0, 2 * f0) << nb;
    }
  }
  // A non-power of two is refused only when factorized.
  EXPECT_EQ(parse_error("attention:\n  factorize_buckets: true\n  n_buckets: 24\n"),
            "configs/x.yaml:3: attention.n_buckets = 24 must be a power of two when "
            "attention.factorize_buckets is true (0 chooses one from max_len / bucket_size)");
  EXPECT_EQ(parse_error("attention:\n  n_buckets: 12\n", {"attention.factorize_buckets=true"}),
            "configs/x.yaml:2: attention.n_buckets = 12 must be a power of two when "
            "attention.factorize_buckets is true (0 chooses one from max_len / bucket_size)");
  EXPECT_NO_THROW(parse_config("attention:\n  n_buckets: 24\n", "x.yaml"));
  EXPECT_EQ(parse_error("attention:\n  factorize_buckets: maybe\n"),
            "configs/x.yaml:2: attention.factorize_buckets: expected true or false, got 'maybe'");
}

TEST(Config, ToYamlRoundTrip) {
  Config c = parse_config(
      "model:\n  layernorm_eps: 1.0e-7\n  init_std: 0.1\n  dropout: 0.3333333333333333\n"
      "optimizer:\n  lr: 3.0e-4\n  beta2: 0.999\n"
      "data:\n  path: \"odd name: #1 \\\"quoted\\\"\"\n"
      "checkpoint:\n  resume: 'yes'\n"
      "logging:\n  metrics: ''\n",
      "x.yaml", {"training.seed=12345678901234567890", "attention.kinds=[lsh, local, full]"});
  std::string text = to_yaml(c);
  Config again = parse_config(text, "printed");
  EXPECT_EQ(again, c);
  EXPECT_EQ(to_yaml(again), text);
  EXPECT_EQ(again.data.path, "odd name: #1 \"quoted\"");
  EXPECT_EQ(again.checkpoint.resume, "yes");
  EXPECT_EQ(again.model.dropout, 0.3333333333333333);
  // Every key is printed, once.
  for (const std::string& key : config_keys()) {
    std::string member = key.substr(key.find('.') + 1);
    EXPECT_NE(text.find("\n  " + member + ": "), std::string::npos) << key;
  }
}

// model.lsh_saved: auto (the default), orders or buckets, printed back as
// read; buckets with more than 2^16 buckets per round is refused by key,
// file and line.
TEST(Config, LshSaved) {
  const Config dflt = parse_config("model:\n  n_layers: 3\n", "s.yaml");
  EXPECT_EQ(dflt.model.lsh_saved, LshSaved::auto_);
  EXPECT_NE(to_yaml(dflt).find("\n  lsh_saved: auto\n"), std::string::npos);
  const Config b = parse_config("model:\n  lsh_saved: buckets\n", "s.yaml");
  EXPECT_EQ(b.model.lsh_saved, LshSaved::buckets);
  EXPECT_EQ(parse_config(to_yaml(b), "again").model.lsh_saved, LshSaved::buckets);
  const std::string msg = config_error([] {
    parse_config("model:\n  max_len: 4194304\n  lsh_saved: buckets\nattention:\n"
                 "  kinds: [lsh]\n  bucket_size: 64\n", "s.yaml");
  });
  EXPECT_NE(msg.find("s.yaml:3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("hash into 131072 buckets"), std::string::npos) << msg;
  EXPECT_NE(config_error([] { parse_config("model:\n  lsh_saved: ids\n", "s.yaml"); })
                .find("model.lsh_saved"),
            std::string::npos);
}

// model.kept_layers: `auto` (the default) reads as kKeptLayersAuto and prints
// back as auto; a count reads as itself; more than n_layers is refused by
// key, file and line.
TEST(Config, KeptLayers) {
  const Config dflt = parse_config("model:\n  n_layers: 3\n", "k.yaml");
  EXPECT_EQ(dflt.model.kept_layers, kKeptLayersAuto);
  EXPECT_NE(to_yaml(dflt).find("\n  kept_layers: auto\n"), std::string::npos);
  EXPECT_EQ(parse_config("model:\n  kept_layers: auto\n", "k.yaml").model.kept_layers,
            kKeptLayersAuto);
  const Config two = parse_config("model:\n  n_layers: 3\n  kept_layers: 2\n", "k.yaml");
  EXPECT_EQ(two.model.kept_layers, 2);
  EXPECT_EQ(parse_config(to_yaml(two), "again").model.kept_layers, 2);
  const std::string msg = config_error(
      [] { parse_config("model:\n  n_layers: 3\n  kept_layers: 4\n", "k.yaml"); });
  EXPECT_NE(msg.find("k.yaml:3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.kept_layers = 4 exceeds model.n_layers = 3"), std::string::npos)
      << msg;
  EXPECT_NE(config_error([] { parse_config("model:\n  kept_layers: -2\n", "k.yaml"); }).find(
                "model.kept_layers"),
            std::string::npos);
}

// model.stashed_layers: `auto` by default, printed back as auto; a count
// reads as itself; more than the layers below the kept ones is refused by
// key, file and line.
TEST(Config, StashedLayers) {
  const Config dflt = parse_config("model:\n  n_layers: 3\n", "s.yaml");
  EXPECT_EQ(dflt.model.stashed_layers, kStashedLayersAuto);
  EXPECT_NE(to_yaml(dflt).find("\n  stashed_layers: auto\n"), std::string::npos);
  const Config two =
      parse_config("model:\n  n_layers: 3\n  kept_layers: 1\n  stashed_layers: 2\n", "s.yaml");
  EXPECT_EQ(two.model.stashed_layers, 2);
  EXPECT_EQ(parse_config(to_yaml(two), "again").model.stashed_layers, 2);
  const std::string msg = config_error([] {
    parse_config("model:\n  n_layers: 3\n  kept_layers: 2\n  stashed_layers: 2\n", "s.yaml");
  });
  EXPECT_NE(msg.find("s.yaml:4"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.stashed_layers = 2 exceeds the 1 layers below the kept ones"),
            std::string::npos)
      << msg;
  EXPECT_NE(config_error([] { parse_config("model:\n  stashed_layers: -2\n", "s.yaml"); })
                .find("model.stashed_layers"),
            std::string::npos);
}

// model.kept_attention: auto by default (printed back as auto), state or
// outputs; anything else is refused naming the key.
TEST(Config, KeptAttention) {
  const Config dflt = parse_config("model:\n  n_layers: 3\n", "a.yaml");
  EXPECT_EQ(dflt.model.kept_attention, KeptAttention::auto_);
  EXPECT_NE(to_yaml(dflt).find("\n  kept_attention: auto\n"), std::string::npos);
  EXPECT_EQ(parse_config("model:\n  kept_attention: outputs\n", "a.yaml").model.kept_attention,
            KeptAttention::outputs);
  EXPECT_EQ(parse_config("model:\n  kept_attention: state\n", "a.yaml").model.kept_attention,
            KeptAttention::state);
  const std::string msg =
      config_error([] { parse_config("model:\n  kept_attention: some\n", "a.yaml"); });
  EXPECT_NE(msg.find("model.kept_attention"), std::string::npos) << msg;
  EXPECT_NE(msg.find("a.yaml:2"), std::string::npos) << msg;
}

// The kept layers' forms (model.kept_ffn, kept_x1, kept_ln): auto by
// default (printed back as auto), each value read and printed back;
// anything else is refused naming the key, file and line.
TEST(Config, KeptForms) {
  struct Key {
    std::string name;
    std::vector<std::string> values;
  };
  for (const Key& k : {Key{"kept_ffn", {"both", "pre_activation"}},
                       Key{"kept_x1", {"kept", "rebuilt"}}, Key{"kept_ln", {"kept", "rebuilt"}}}) {
    SCOPED_TRACE(k.name);
    const Config dflt = parse_config("model:\n  n_layers: 3\n", "a.yaml");
    EXPECT_NE(to_yaml(dflt).find("\n  " + k.name + ": auto\n"), std::string::npos);
    for (const std::string& v : k.values) {
      const Config c = parse_config("model:\n  " + k.name + ": " + v + "\n", "a.yaml");
      EXPECT_NE(to_yaml(c).find("\n  " + k.name + ": " + v + "\n"), std::string::npos) << v;
    }
    const std::string msg = config_error(
        [&] { parse_config("model:\n  n_layers: 3\n  " + k.name + ": some\n", "b.yaml"); });
    EXPECT_NE(msg.find("model." + k.name), std::string::npos) << msg;
    EXPECT_NE(msg.find("b.yaml:3"), std::string::npos) << msg;
  }
  EXPECT_EQ(parse_config("model:\n  kept_ffn: pre_activation\n", "a.yaml").model.kept_ffn,
            KeptFfn::pre_activation);
  EXPECT_EQ(parse_config("model:\n  kept_x1: rebuilt\n", "a.yaml").model.kept_x1,
            KeptPart::rebuilt);
  EXPECT_EQ(parse_config("model:\n  kept_ln: rebuilt\n", "a.yaml").model.kept_ln,
            KeptPart::rebuilt);
}

TEST(Config, KeyTable) {
  std::vector<std::string> keys = config_keys();
  EXPECT_EQ(keys.size(), 77u);
  EXPECT_EQ(keys.front(), "model.vocab_size");
  EXPECT_EQ(keys.back(), "logging.per_rank");
}

// Every enum's names read back as the same value; unknown names do not parse.
template <class E>
void expect_names_round_trip(std::initializer_list<E> values) {
  for (E e : values) EXPECT_EQ(parse_enum<E>(to_string(e)), e) << to_string(e);
  EXPECT_EQ(parse_enum<E>("bogus"), std::nullopt);
  EXPECT_EQ(values.size(), EnumNames<E>::names.size());
}

TEST(Config, EnumNames) {
  expect_names_round_trip({AttentionKind::lsh, AttentionKind::full, AttentionKind::local});
  expect_names_round_trip({OptimizerKind::adamw, OptimizerKind::adafactor});
  expect_names_round_trip({AttentionPrecision::fp32, AttentionPrecision::bf16});
  expect_names_round_trip({Schedule::rsqrt, Schedule::cosine, Schedule::constant});
  expect_names_round_trip({DeviceKind::cpu, DeviceKind::cuda, DeviceKind::auto_});
  expect_names_round_trip({DataKind::duplication, DataKind::bytes});
  expect_names_round_trip({ByteSplit::fractions, ByteSplit::enwik8});
  expect_names_round_trip({SpMode::heads, SpMode::sort});
  expect_names_round_trip({OnNonFinite::stop, OnNonFinite::skip});
  expect_names_round_trip({Activation::gelu, Activation::relu});
  expect_names_round_trip({CommBackend::local, CommBackend::mpi, CommBackend::nccl});
  EXPECT_STREQ(to_string(DeviceKind::auto_), "auto");
  for (CommBackend b : {CommBackend::local, CommBackend::mpi, CommBackend::nccl})
    EXPECT_EQ(parse_comm_backend(to_string(b)), b);  // distributed/backend.h agrees
  // Parsed once: the fields hold the values.
  Config c = parse_config("model:\n  activation: relu\noptimizer:\n  schedule: cosine\n", "x.yaml",
                          {"data.split=enwik8", "attention.kinds=[local, lsh]"});
  EXPECT_EQ(c.model.activation, Activation::relu);
  EXPECT_EQ(c.optimizer.schedule, Schedule::cosine);
  EXPECT_EQ(c.data.split, ByteSplit::enwik8);
  EXPECT_EQ(c.attention_kind(0), AttentionKind::local);
  EXPECT_EQ(parse_error("optimizer:\n  name:\n"),
            "configs/x.yaml:2: optimizer.name: expected one of adamw, adafactor, got nothing");
  EXPECT_EQ(parse_error("training:\n  device: [cpu]\n"),
            "configs/x.yaml:2: training.device: expected one of cpu, cuda, auto, got a list");
}

TEST(Config, NewParallelTrainingAndLoggingKeys) {
  Config d;
  EXPECT_EQ(d.parallel.sp_mode, SpMode::heads);
  EXPECT_EQ(d.parallel.timeout_s, 600.0);
  EXPECT_EQ(d.parallel.bucket_mb, 25.0);
  EXPECT_FALSE(d.logging.per_rank);
  EXPECT_EQ(d.training.on_nonfinite, OnNonFinite::stop);
  Config c = parse_config(
      "parallel:\n  dp: auto\n  sp_mode: sort\n  timeout_s: 30.5\n  bucket_mb: 0.25\n"
      "training:\n  on_nonfinite: skip\nlogging:\n  per_rank: true\n",
      "x.yaml");
  EXPECT_EQ(c.parallel.dp, 0);
  EXPECT_EQ(c.parallel.sp_mode, SpMode::sort);
  EXPECT_EQ(c.parallel.timeout_s, 30.5);
  EXPECT_EQ(c.parallel.bucket_mb, 0.25);
  EXPECT_EQ(c.training.on_nonfinite, OnNonFinite::skip);
  EXPECT_TRUE(c.logging.per_rank);
  const std::string text = to_yaml(c);
  EXPECT_NE(text.find("\n  dp: auto\n"), std::string::npos) << text;
  EXPECT_EQ(parse_config(text, "printed"), c);
  EXPECT_EQ(parse_config("", "x.yaml", {"parallel.dp=3", "parallel.backend=mpi",
                                        "training.batch_size=6"}).parallel.dp, 3);
  EXPECT_EQ(set_error("parallel.dp=0"),
            "--set parallel.dp=0: parallel.dp = 0 is out of range [1, 65536] (or auto)");
  EXPECT_EQ(set_error("parallel.dp=many"),
            "--set parallel.dp=many: parallel.dp: expected an integer or auto, got 'many'");
  EXPECT_EQ(set_error("parallel.timeout_s=0"),
            "--set parallel.timeout_s=0: parallel.timeout_s = 0 is out of range (0, 1000000000]");
  EXPECT_EQ(set_error("parallel.bucket_mb=-1"),
            "--set parallel.bucket_mb=-1: parallel.bucket_mb = -1 is out of range (0, 1048576]");
  EXPECT_EQ(set_error("parallel.sp_mode=rows"),
            "--set parallel.sp_mode=rows: parallel.sp_mode: 'rows' is not one of heads, sort");
  EXPECT_EQ(set_error("training.on_nonfinite=ignore"),
            "--set training.on_nonfinite=ignore: training.on_nonfinite: 'ignore' is not one of "
            "stop, skip");
  EXPECT_EQ(set_error("logging.per_rank=2"),
            "--set logging.per_rank=2: logging.per_rank: expected true or false, got '2'");
}

TEST(Config, ResolveWorldSize) {
  Config c = parse_config("", "x.yaml",
                          {"parallel.dp=auto", "parallel.sp=2", "parallel.backend=mpi"});
  resolve_world_size(c, 8);
  EXPECT_EQ(c.parallel.dp, 4);
  Config one = parse_config("", "x.yaml", {"parallel.dp=auto"});  // local backend, one process
  resolve_world_size(one, 1);
  EXPECT_EQ(one.parallel.dp, 1);
  Config odd = parse_config("", "x.yaml", {"parallel.dp=auto", "parallel.sp=2", "parallel.backend=mpi"});
  EXPECT_NE(config_error([&] { resolve_world_size(odd, 3); }).find("not divisible by parallel.sp = 2"),
            std::string::npos);
  Config batch = parse_config("", "x.yaml", {"parallel.dp=auto", "parallel.backend=mpi"});
  EXPECT_NE(config_error([&] { resolve_world_size(batch, 3); })
                .find("training.batch_size = 8 is not divisible by parallel.dp = 3"),
            std::string::npos);
  Config fixed = parse_config("", "x.yaml", {"parallel.dp=2", "parallel.backend=mpi"});
  EXPECT_NE(config_error([&] { resolve_world_size(fixed, 4); }).find("number of processes (4)"),
            std::string::npos);
}

TEST(Config, FirstDifferenceAndDigest) {
  const Config a = parse_config("", "x.yaml");
  Config b = a;
  EXPECT_EQ(first_difference(a, b), "");
  EXPECT_EQ(config_digest(a), config_digest(b));
  EXPECT_EQ(config_digest(a), config_digest(parse_config(to_yaml(a), "printed")));
  b.training.seed = 7;
  b.optimizer.lr = 2e-3;  // earlier in the table than training.seed
  EXPECT_EQ(first_difference(a, b), "optimizer.lr");
  EXPECT_EQ(first_difference(b, a), "optimizer.lr");
  EXPECT_NE(config_digest(a), config_digest(b));
  b = a;
  b.attention.kinds = {AttentionKind::lsh, AttentionKind::full};
  EXPECT_EQ(first_difference(a, b), "attention.kinds");
  b = a;
  b.parallel.dp = 0;
  EXPECT_EQ(first_difference(a, b), "parallel.dp");
}

// ---------------------------------------------------------------- hostile input

TEST(Config, ADirectoryIsNotAConfigFile) {
  const std::string dir = testing::TempDir();
  std::string msg = config_error([&] { load_config(dir); });
  EXPECT_NE(msg.find("'" + dir + "' is a directory"), std::string::npos) << msg;
}

TEST(Config, AnEndlessOrHugeFileIsRefusedAfterTheCap) {
  std::string msg = config_error([] { load_config("/dev/zero"); });
  EXPECT_EQ(msg, "config file '/dev/zero' is larger than 16 MiB; a configuration is a few "
                 "kilobytes of YAML (is it the right file?)");
}

TEST(Config, ASecondYamlDocumentIsRefusedNamingItsLine) {
  EXPECT_EQ(parse_error("model:\n  d_model: 64\n---\nmodel:\n  d_model: 32\n").rfind("configs/x.yaml:3: a second YAML document", 0),
            0u);
  EXPECT_EQ(parse_error("# recipe\n---\nmodel:\n  d_model: 64\n--- \ntraining:\n  steps: 2\n")
                .rfind("configs/x.yaml:5: a second YAML document", 0),
            0u);
  EXPECT_NE(parse_error("model:\n  d_model: 64\n---\n").find("a configuration is one document"),
            std::string::npos);
  // One document with its start and end markers is fine.
  EXPECT_EQ(parse_config("---\nmodel:\n  d_model: 64\n...\n", "x.yaml").model.d_model, 64);
}

TEST(Config, ValuesThatCannotStayFiniteAreRefused) {
  EXPECT_EQ(parse_error("model:\n  layernorm_eps: 0\n"),
            "configs/x.yaml:2: model.layernorm_eps = 0 is out of range (0, 1]");
  EXPECT_EQ(parse_error("optimizer:\n  eps: 0.0\n").rfind(
                "configs/x.yaml:2: optimizer.eps = 0.0 must be positive with optimizer.name = adamw", 0),
            0u);
  EXPECT_NO_THROW(parse_config("optimizer:\n  name: adafactor\n  eps: 0\n", "x.yaml"));
  // A Config built in code gets the per-key checks too.
  Config c;
  c.model.layernorm_eps = -1e-6;
  EXPECT_EQ(config_error([&] { validate_config(c, "code"); }),
            "code: model.layernorm_eps = -1.0e-06 is out of range (0, 1]");
  c = Config{};
  c.model.max_len = 0;
  EXPECT_EQ(config_error([&] { validate_config(c, "code"); }),
            "code: model.max_len = 0 is out of range [1, 1073741824]");
}

TEST(Config, DuplicationNeedsFourPositions) {
  EXPECT_EQ(parse_error("model:\n  max_len: 2\nattention:\n  kinds: [full]\n")
                .rfind("configs/x.yaml:2: model.max_len = 2 must be even and at least 4 for "
                       "data.kind = duplication", 0),
            0u);
  EXPECT_NO_THROW(parse_config("model:\n  max_len: 4\nattention:\n  kinds: [full]\n", "x.yaml"));
}

}  // namespace
}  // namespace reformer

// The class of a key changed between a checkpoint and the run resuming from it.
TEST(Config, ResumeChangeClasses) {
  using reformer::resume_change_class;
  using reformer::ResumeChange;
  EXPECT_EQ(resume_change_class("model.d_ff"), ResumeChange::shape);
  EXPECT_EQ(resume_change_class("optimizer.name"), ResumeChange::shape);
  EXPECT_EQ(resume_change_class("model.dropout"), ResumeChange::refuse);
  EXPECT_EQ(resume_change_class("attention.n_hashes"), ResumeChange::refuse);
  EXPECT_EQ(resume_change_class("training.seed"), ResumeChange::refuse);
  EXPECT_EQ(resume_change_class("training.batch_size"), ResumeChange::refuse);
  EXPECT_EQ(resume_change_class("data.dup_symbols"), ResumeChange::refuse);
  EXPECT_EQ(resume_change_class("optimizer.lr"), ResumeChange::warn);
  EXPECT_EQ(resume_change_class("optimizer.warmup_steps"), ResumeChange::warn);
  EXPECT_EQ(resume_change_class("data.path"), ResumeChange::warn);
  EXPECT_EQ(resume_change_class("training.steps"), ResumeChange::info);
  EXPECT_EQ(resume_change_class("parallel.dp"), ResumeChange::info);
  EXPECT_EQ(resume_change_class("checkpoint.keep"), ResumeChange::info);
  EXPECT_EQ(resume_change_class("logging.metrics"), ResumeChange::info);
  EXPECT_EQ(resume_change_class("logging.plot"), ResumeChange::info);
  EXPECT_EQ(resume_change_class("checkpoint.resume"), ResumeChange::silent);
  EXPECT_EQ(resume_change_class("checkpoint.allow_changes"), ResumeChange::silent);
}
