// The model-FLOPs formula (framework/flops.h) against the products the model
// really runs: one training step of the CPU model through ProfilingOps, whose
// per-op FLOPs (kernels/common/op_flops.h) are summed, for every attention
// kind and window shape.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/flops.h"
#include "framework/model.h"
#include "kernels/common/op_flops.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/profiling_ops.h"

using namespace reformer;

namespace {

Config flops_config(const std::vector<std::string>& sets) {
  const char* yaml = R"(
model:
  vocab_size: 11
  d_model: 8
  n_heads: 2
  d_ff: 12
  n_layers: 3
  max_len: 48
attention:
  kinds: [lsh, local, full]
  bucket_size: 4
  n_hashes: 3
training:
  seed: 5
)";
  return parse_config(yaml, "flops", sets);
}

// FLOPs ProfilingOps counted over one forward + backward of the model.
double counted_step_flops(const Config& cfg) {
  CpuOps<float> cpu;
  ProfilingOps ops(cpu, std::make_unique<WallClock>());
  ReformerModel<float> model(cfg, ops);
  model.init_params(cfg.training.seed);
  const int64_t L = model.seq_len();
  std::vector<int32_t> tokens(static_cast<size_t>(L)), targets(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) tokens[size_t(i)] = int32_t((7 * i + 3) % cfg.model.vocab_size);
  for (int64_t i = 0; i < L; ++i) targets[size_t(i)] = i + 1 < L ? tokens[size_t(i + 1)] : -1;
  ops.reset();
  model.forward_backward(tokens.data(), targets.data(), 0, true, true, 1.0f);
  double total = 0;
  for (const OpStats& s : ops.stats()) total += s.flops;
  return total;
}

}  // namespace

TEST(Flops, FormulaEqualsWhatTheModelRuns) {
  const std::vector<std::vector<std::string>> cases = {
      {},
      {"attention.kinds=[lsh]", "attention.chunks_before=2", "attention.chunks_after=1",
       "attention.causal=false"},
      {"attention.kinds=[local]", "attention.chunks_before=3"},
      {"attention.kinds=[full]", "attention.causal=false"},
      {"model.max_len=4"},  // every layer short enough for full attention
      {"model.ffn_chunk=16", "model.loss_chunk=8", "model.d_head=3"},
      {"model.kept_layers=2"},  // kept layers rerun nothing
      {"model.kept_layers=1", "model.attn_heads_per_pass=1"},  // nor their residual update
      {"model.stashed_layers=2"},  // stashed layers rerun all but the attention forward
      {"model.kept_layers=2", "model.kept_attention=outputs"},  // the projections rerun
      {"model.kept_layers=1", "model.stashed_layers=1", "model.attn_heads_per_pass=1"},
  };
  for (const auto& sets : cases) {
    const Config cfg = flops_config(sets);
    const double formula = train_flops(cfg).per_token * double(cfg.model.max_len);
    const double counted = counted_step_flops(cfg);
    std::string what;
    for (const auto& s : sets) what += s + " ";
    EXPECT_GT(counted, 0) << what;
    EXPECT_NEAR(formula, counted, 1e-9 * counted) << what;
  }
}

TEST(Flops, AttentionPairs) {
  AttentionParams p;
  p.L = 32;
  p.chunk = 4;  // 8 chunks
  p.n_rounds = 2;
  p.chunks_before = 1;
  p.wrap = true;
  EXPECT_EQ(chunked_attention_pairs(p), 2.0 * 8 * 2 * 16);
  p.wrap = false;  // chunk 0 has no look-back
  EXPECT_EQ(chunked_attention_pairs(p), 2.0 * (8 + 7) * 16);
  p.chunks_before = 20;  // wrapped windows hold each chunk once
  p.wrap = true;
  EXPECT_EQ(chunked_attention_pairs(p), 2.0 * 8 * 8 * 16);
  p.causal = true;
  EXPECT_EQ(full_attention_pairs(p), 32.0 * 33 / 2);
  p.causal = false;
  EXPECT_EQ(full_attention_pairs(p), 32.0 * 32);
}

// The figure the README gives: bench-peer.yaml (6 layers, d_model 1024,
// 8 heads, d_ff 4096, LSH 4 rounds, chunks of 64, one look-back).
TEST(Flops, BenchPeerPerToken) {
  const Config cfg = parse_config(R"(
model: {vocab_size: 256, d_model: 1024, n_heads: 8, d_ff: 4096, n_layers: 6, max_len: 65536}
attention: {kinds: [lsh], bucket_size: 64, n_hashes: 4}
)", "peer", {});
  const ModelFlops f = train_flops(cfg);
  // Per layer and token: products 2 (3 D^2 + 2 D F) = 23.07M, four times;
  // attention 4 rounds x 8 heads x 128 keys x 128 dims x (2 x 4 + 10).
  const double products = 4 * 2.0 * (3.0 * 1024 * 1024 + 2.0 * 1024 * 4096);
  const double attention = 4.0 * 8 * 128 * 128 * 18;
  const double head = 3 * 2.0 * 2048 * 256;
  EXPECT_NEAR(f.per_token, 6 * (products + attention) + head, 1.0);
  EXPECT_NEAR(f.attention_per_token, 6 * attention, 1.0);
}

// Pairs mode (sp > n_heads) executes each head's qk, v projection and its
// local and full attention g times; heads mode and LSH layers nothing twice.
TEST(Flops, SequenceParallelPairsRedundancy) {
  const Config cfg = parse_config(R"(
model: {vocab_size: 64, d_model: 64, n_heads: 2, d_ff: 128, n_layers: 2, max_len: 256}
attention: {kinds: [local, lsh], bucket_size: 16, n_hashes: 4}
)", "pairs", {});
  const double model = train_flops(cfg).per_token;
  EXPECT_EQ(sp_executed_flops_per_token(cfg, 2), model);
  // sp 8: g = 4. Local layer 0: 16 chunks, each itself and one look-back
  // (15 pairs of chunks plus 16) x 16 x 16 keys, 2 heads, 32 dims.
  const double local_pairs = 2.0 * (16 + 15) * 16 * 16;
  const double local = local_pairs * 32 * (2 * 4 + 10);
  const double qkv = 2 * 4 * 2.0 * 256 * 64 * 64;  // per layer, four times
  EXPECT_NEAR(sp_executed_flops_per_token(cfg, 8), model + 3 * (2 * qkv + local) / 256, 1e-6);
}
