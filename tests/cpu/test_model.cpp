// Whole-model checks: gradients of every parameter against central finite
// differences (double), the reversible rebuild, LSH == full attention when
// every window covers the sequence, and causality.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "framework/config.h"
#include "framework/memory_plan.h"
#include "framework/model.h"
#include "framework/model_tensors.h"
#include "kernels/common/gemm_staging.h"
#include "kernels/errors.h"
#include "kernels/profiling_ops.h"
#include "kernels/cpu/cpu_ops.h"
#include "tests/common/gradcheck.h"

using namespace reformer;

namespace {

// A small model with odd sizes; `extra` YAML is appended to the model and
// attention sections by --set style overrides.
Config small_config(const std::vector<std::string>& sets = {}) {
  const char* yaml = R"(
model:
  vocab_size: 7
  d_model: 6
  n_heads: 2
  d_ff: 5
  n_layers: 2
  max_len: 12
  init_std: 0.5
  axial_init_std: 0.5
attention:
  kinds: [lsh, local]
  bucket_size: 3
  n_hashes: 2
  n_buckets: 4
training:
  seed: 3
data:
  kind: duplication
  dup_symbols: 7
)";
  return parse_config(yaml, "small", sets);
}

void make_tokens(int64_t L, int V, uint64_t seed, std::vector<int32_t>* tokens,
                 std::vector<int32_t>* targets) {
  tokens->resize(size_t(L));
  targets->resize(size_t(L));
  uint64_t s = seed;
  for (int64_t i = 0; i < L; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    (*tokens)[size_t(i)] = int32_t((s >> 33) % uint64_t(V));
  }
  for (int64_t i = 0; i < L; ++i)
    (*targets)[size_t(i)] = i + 1 < L ? (*tokens)[size_t(i + 1)] : -1;
  (*targets)[2] = -1;  // an ignored position in the middle
}

// Checks d(mean loss)/d(theta) for every parameter against central
// differences. In double the loss (~2) carries rounding ~1e-16 relative, so
// with h = 1e-6 the difference quotient has absolute noise ~1e-10 and the
// truncation error is ~h^2 times the third derivative. The test asks
// |analytic - numeric| <= 1e-6 * (1e-3 + |numeric|): 1e-9 absolute for
// near-zero gradients, 1e-6 relative otherwise.
void check_model_gradients(const Config& cfg) {
  CpuOps<double> ops;
  ReformerModel<double> model(cfg, ops);
  model.init_params(cfg.training.seed);
  std::vector<int32_t> tokens, targets;
  make_tokens(model.seq_len(), cfg.model.vocab_size, 11, &tokens, &targets);
  int64_t count = 0;
  for (int32_t t : targets) count += t >= 0;
  const double scale = 1.0 / double(count);
  const uint64_t step = 5;

  model.zero_grads();
  model.forward_backward(tokens.data(), targets.data(), step, true, true, scale);
  std::vector<double> analytic(model.grads(), model.grads() + model.num_params());

  auto loss = [&]() {
    return model.forward_backward(tokens.data(), targets.data(), step, false, true, 0).loss_sum *
           scale;
  };
  const std::vector<double> numeric =
      test::numeric_grad(loss, model.params(), model.num_params(), 1e-6);
  for (const ParamInfo& p : model.table().params()) {
    const double err = test::max_rel_err(analytic.data() + p.offset, numeric.data() + p.offset,
                                         p.size, 1e-3);
    EXPECT_LE(err, 1e-6) << "parameter " << p.name;
  }
}

}  // namespace

TEST(ModelGrad, LshAndLocalLayers) { check_model_gradients(small_config()); }

TEST(ModelGrad, FullAttentionLayer) {
  check_model_gradients(small_config({"attention.kinds=[full]", "model.n_layers=1"}));
}

TEST(ModelGrad, ThreeHashRoundsReluChunked) {
  check_model_gradients(small_config({"attention.n_hashes=3", "model.activation=relu",
                                      "model.ffn_chunk=5", "model.loss_chunk=7",
                                      "attention.kinds=[lsh]"}));
}

// Attention in passes of fewer than all heads (the pass's columns of Wqk,
// Wv and Wo, their gradients added back), one head and two of four.
TEST(ModelGrad, AttentionInPassesOfFewerHeads) {
  check_model_gradients(small_config({"model.attn_heads_per_pass=1", "model.dropout=0.25"}));
  // One head per pass, its hash rounds one call at a time.
  check_model_gradients(small_config({"model.attn_heads_per_pass=1",
                                      "model.attn_rounds_per_pass=1"}));
  check_model_gradients(small_config({"model.n_heads=4", "model.d_head=2",
                                      "model.attn_heads_per_pass=2"}));
  // Projection chunks other than the feed-forward's (model.proj_chunk).
  check_model_gradients(small_config({"model.attn_heads_per_pass=1", "model.dropout=0.25",
                                      "model.proj_chunk=5", "model.ffn_chunk=3"}));
  check_model_gradients(small_config({"model.proj_chunk=2", "model.ffn_chunk=7"}));
}

// A pass of one head attends its hash rounds one call at a time (combined
// and differentiated through their joint log-sum-exp): the same loss and
// gradients as all rounds in one call, to double rounding.
TEST(Model, RoundByRoundEqualsAllRoundsAtOnce) {
  const Config by_round = small_config({"model.attn_rounds_per_pass=1", "attention.n_hashes=3"});
  const Config at_once = small_config({"model.attn_heads_per_pass=2", "attention.n_hashes=3"});
  ASSERT_TRUE(attention_by_round(by_round, 1, 8));
  ASSERT_FALSE(attention_by_round(at_once, 1, 8));
  std::vector<std::vector<double>> grads;
  std::vector<double> losses;
  for (const Config* cfg : {&by_round, &at_once}) {
    CpuOps<double> ops;
    ReformerModel<double> model(*cfg, ops);
    model.init_params(cfg->training.seed);
    std::vector<int32_t> tokens, targets;
    make_tokens(model.seq_len(), cfg->model.vocab_size, 11, &tokens, &targets);
    model.zero_grads();
    losses.push_back(
        model.forward_backward(tokens.data(), targets.data(), 4, true, true, 0.1).loss_sum);
    grads.emplace_back(model.grads(), model.grads() + model.num_params());
  }
  EXPECT_NEAR(losses[0], losses[1], 1e-12 * std::abs(losses[1]));
  EXPECT_LE(test::max_rel_err(grads[0].data(), grads[1].data(), int64_t(grads[0].size()), 1e-3),
            1e-10);
}

TEST(ModelGrad, FactorizedBuckets) {
  // 8 buckets hashed as 2 * 4 (one rotation block per factor, as HF).
  const Config cfg = small_config({"attention.factorize_buckets=true", "attention.n_buckets=8"});
  ASSERT_EQ(cfg.bucket_factor0(), 2);
  check_model_gradients(cfg);
}

TEST(ModelGrad, WithDropoutMasksReproducedInRecompute) {
  // The dropout masks are keyed by (seed, step, layer, site), so the forward
  // recompute in the backward pass reproduces them and the gradient is exact.
  check_model_gradients(small_config({"model.dropout=0.25"}));
}

TEST(ModelGrad, AccumulatesAcrossSequences) {
  const Config cfg = small_config();
  CpuOps<double> ops;
  ReformerModel<double> model(cfg, ops);
  model.init_params(1);
  std::vector<int32_t> tokens, targets;
  make_tokens(model.seq_len(), cfg.model.vocab_size, 4, &tokens, &targets);
  model.zero_grads();
  model.forward_backward(tokens.data(), targets.data(), 0, true, true, 1.0);
  std::vector<double> once(model.grads(), model.grads() + model.num_params());
  model.forward_backward(tokens.data(), targets.data(), 0, true, true, 1.0);
  for (int64_t i = 0; i < model.num_params(); ++i)
    ASSERT_NEAR(model.grads()[i], 2 * once[size_t(i)], 1e-12 * (1 + std::fabs(once[size_t(i)])));
}

// Kept layers (model.kept_layers) hold their inputs and sublayer state from
// the forward instead of rebuilding them: the gradients are exact, with
// every layer kept, one (chunked feed-forward, dropout), and attention in
// passes of one head (whose forward the backward reruns; only the residual
// update and the feed-forward are kept); and keeping only the feed-forward
// pre-activation (the activation rebuilt in the backward).
TEST(ModelGrad, KeptLayers) {
  check_model_gradients(small_config({"model.kept_layers=2"}));
  check_model_gradients(small_config({"model.kept_layers=1", "model.dropout=0.25",
                                      "model.ffn_chunk=5", "model.activation=relu"}));
  check_model_gradients(small_config({"model.kept_layers=1", "model.ffn_chunk=5",
                                      "model.kept_ffn=pre_activation"}));
  check_model_gradients(small_config({"model.kept_layers=2", "model.kept_x1=rebuilt",
                                      "model.kept_attention=outputs"}));
  check_model_gradients(small_config({"model.kept_layers=2", "model.kept_ln=rebuilt",
                                      "model.ffn_chunk=5", "model.dropout=0.25"}));
  check_model_gradients(small_config({"model.kept_layers=2", "model.attn_heads_per_pass=1"}));
}

namespace {

// Loss sums and gradients of two steps (different tokens and LSH draws,
// gradients accumulated) of a fresh model of `cfg` on `ops`.
template <class T>
std::pair<std::vector<double>, std::vector<T>> two_steps(const Config& cfg, Ops<T>& ops) {
  ReformerModel<T> model(cfg, ops);
  model.init_params(cfg.training.seed);
  model.zero_grads();
  std::vector<double> losses;
  for (uint64_t step : {3, 4}) {
    std::vector<int32_t> tokens, targets;
    make_tokens(model.seq_len(), cfg.model.vocab_size, 20 + step, &tokens, &targets);
    losses.push_back(
        model.forward_backward(tokens.data(), targets.data(), step, true, true, T(0.1)).loss_sum);
  }
  std::vector<T> grads(size_t(model.num_params()));
  ops.to_host(grads.data(), model.grads(), model.num_params());
  return {losses, grads};
}

// Two steps of a and of b compute the same function: losses equal in
// double to rounding, gradients to 1e-10 in double and 1e-4 in fp32 (the
// layouts round differently). Returns each fp32 run's calls per op.
std::array<std::map<OpId, int64_t>, 2> expect_same_function(const Config& a, const Config& b) {
  CpuOps<double> dops;
  const auto [dl0, dg0] = two_steps<double>(a, dops);
  const auto [dl1, dg1] = two_steps<double>(b, dops);
  for (size_t i = 0; i < dl0.size(); ++i) EXPECT_NEAR(dl1[i], dl0[i], 1e-12 * dl0[i]);
  EXPECT_LE(test::max_rel_err(dg1.data(), dg0.data(), int64_t(dg0.size()), 1e-3), 1e-10);
  CpuOps<float> cpu;
  std::array<std::map<OpId, int64_t>, 2> calls;
  std::vector<double> fg[2];
  for (int k = 0; k < 2; ++k) {
    ProfilingOps ops(cpu, std::make_unique<WallClock>());
    const auto [losses, grads] = two_steps<float>(k ? b : a, ops);
    fg[k].assign(grads.begin(), grads.end());
    for (const OpStats& st : ops.stats()) calls[size_t(k)][st.op] = st.calls;
  }
  EXPECT_LE(test::max_rel_err(fg[1].data(), fg[0].data(), int64_t(fg[0].size()), 1e-2), 1e-4);
  return calls;
}

}  // namespace

// The same function as the rebuilding model: in double to rounding, in fp32
// to the rebuild's rounding of the layer inputs. And the backward really
// skips the rebuild: with every layer kept it runs no feed-forward and no
// attention forward (in passes of one head it reruns the projections only,
// the passes' attention outputs and log-sum-exps kept through Ops::stash).
// Keeping only the feed-forward pre-activation (model.kept_ffn), the
// backward rebuilds the activation once per chunk of each kept layer;
// without x1 (model.kept_x1) it rebuilds x1 as a layer that keeps nothing,
// one output projection per pass of each kept layer (matmul_accumulate);
// without the LayerNorm rows (model.kept_ln) it normalises again, once per
// chunk of each kept layer.
TEST(Model, KeptLayersEqualRebuiltOnesAndSkipTheRebuild) {
  for (const auto& sets : std::vector<std::vector<std::string>>{
           {}, {"model.dropout=0.25", "model.ffn_chunk=5"}, {"model.attn_heads_per_pass=1"},
           {"model.kept_attention=outputs"},
           {"model.kept_ffn=pre_activation", "model.ffn_chunk=5"},
           {"model.kept_x1=rebuilt", "model.attn_heads_per_pass=1", "model.dropout=0.25"},
           {"model.kept_x1=rebuilt", "model.kept_attention=outputs"},
           {"model.kept_ln=rebuilt", "model.ffn_chunk=5", "model.kept_ffn=pre_activation",
            "model.kept_x1=rebuilt"}}) {
    SCOPED_TRACE(sets.empty() ? "defaults" : sets[0]);
    std::vector<std::string> kept_sets = sets;
    kept_sets.push_back("model.kept_layers=2");
    const Config rebuilt = small_config(sets), kept = small_config(kept_sets);
    auto calls = expect_same_function(rebuilt, kept);
    EXPECT_GT(calls[0][OpId::layernorm_ffn_forward], 0);
    EXPECT_EQ(calls[1][OpId::layernorm_ffn_forward] * 2, calls[0][OpId::layernorm_ffn_forward]);
    // Every layer kept: the attention forward runs once, its state kept
    // whole (one pass of heads) or as the passes' outputs and log-sum-exps.
    const int64_t attn = calls[1][OpId::chunked_attention_forward];
    EXPECT_EQ(attn * 2, calls[0][OpId::chunked_attention_forward]);
    const Config kept_cfg = small_config(kept_sets);
    EXPECT_EQ(calls[1][OpId::stash] > 0, keeps_attention_outputs(kept_cfg, 1));
    EXPECT_EQ(keeps_attention(kept_cfg, 1),
              sets.empty() || sets[0] == "model.dropout=0.25" ||
                  sets[0] == "model.kept_ffn=pre_activation" || sets[0] == "model.kept_ln=rebuilt");
    const int64_t L = kept_cfg.model.max_len, fc = std::min<int64_t>(kept_cfg.model.ffn_chunk, L);
    const int64_t chunks = fc > 0 ? (L + fc - 1) / fc : 1;
    const bool pre = kept_cfg.model.kept_ffn == KeptFfn::pre_activation;
    EXPECT_EQ(calls[1][OpId::ffn_rebuild], pre ? 2 * 2 * chunks : 0);  // 2 steps, 2 layers
    EXPECT_EQ(calls[0][OpId::ffn_rebuild], 0);
    EXPECT_EQ(calls[1][OpId::layernorm_ffn_rows], keeps_ln(kept_cfg) ? 0 : 2 * 2 * chunks);
    EXPECT_EQ(calls[0][OpId::layernorm_ffn_rows], 0);
    // x1: the rebuilding model's output projections in the forward and the
    // rebuild, two steps; the kept one's forward, and the rebuild unless kept.
    const int64_t proj = calls[0][OpId::matmul_accumulate];
    EXPECT_EQ(calls[1][OpId::matmul_accumulate], keeps_x1(kept_cfg) ? proj / 2 : proj);
  }
}

// Stashed layers (model.stashed_layers) rebuild their inputs as any layer,
// x1 from the attention outputs their forward stashed: the same function to
// rounding (the forward's outputs and log-sum-exps instead of the rebuilt
// input's), and the backward reruns their projections but not their
// attention forward. Below a kept layer, with dropout, and in passes of
// one head (the stash per pass).
TEST(Model, StashedLayersEqualRebuiltOnesAndSkipTheirAttention) {
  for (const auto& sets : std::vector<std::vector<std::string>>{
           {"model.stashed_layers=2"},
           {"model.kept_layers=1", "model.stashed_layers=1", "model.dropout=0.25"},
           {"model.stashed_layers=1", "model.attn_heads_per_pass=1"}}) {
    SCOPED_TRACE(sets[0] + " " + sets[1 % sets.size()]);
    std::vector<std::string> base_sets;  // the same without the stash
    for (const std::string& s : sets)
      if (s.rfind("model.stashed_layers", 0) != 0) base_sets.push_back(s);
    const Config rebuilt = small_config(base_sets), stashed = small_config(sets);
    const int n_stashed = stashed_layer_count(stashed, 1);
    ASSERT_EQ(n_stashed, stashed.model.stashed_layers);
    auto calls = expect_same_function(rebuilt, stashed);
    // The feed-forward reruns as before; each stashed layer's attention
    // forward does not (one call per head per step fewer, two steps), and
    // every pass of a stashed layer stashes and unstashes once a step.
    EXPECT_EQ(calls[1][OpId::layernorm_ffn_forward], calls[0][OpId::layernorm_ffn_forward]);
    const int heads = stashed.model.n_heads;
    int64_t fewer = 0;
    for (int l = 0; l < stashed.model.n_layers; ++l) {
      const bool is_stashed = l >= stashed.model.n_layers - kept_layer_count(stashed) -
                                       n_stashed && l < stashed.model.n_layers -
                                                            kept_layer_count(stashed);
      if (is_stashed && stashed.attention_kind(l) != AttentionKind::full) fewer += 2 * heads;
    }
    EXPECT_GT(fewer, 0);
    EXPECT_EQ(calls[1][OpId::chunked_attention_forward],
              calls[0][OpId::chunked_attention_forward] - fewer);
    const int passes = heads / attention_heads_per_pass(stashed, 1);
    EXPECT_EQ(calls[1][OpId::stash] - calls[0][OpId::stash], 2 * n_stashed * passes);
    EXPECT_EQ(calls[1][OpId::unstash] - calls[0][OpId::unstash], 2 * n_stashed * passes);
  }
}

// An LSH layer that keeps its bucket ids (model.lsh_saved: buckets, and
// auto where the rounds are attended one at a time) sorts them again into
// the orders it would have kept: the same function bit for bit, the ids
// packed once per hash and sorted again in the rebuild and the backward.
TEST(Model, SavedBucketsEqualSavedOrders) {
  for (const auto& sets : std::vector<std::vector<std::string>>{
           {},
           {"model.attn_heads_per_pass=1"},
           {"model.attn_rounds_per_pass=1"},
           {"model.kept_layers=2", "model.dropout=0.25"}}) {
    SCOPED_TRACE(sets.empty() ? "defaults" : sets[0]);
    std::vector<std::string> orders = sets, buckets = sets;
    orders.push_back("model.lsh_saved=orders");
    buckets.push_back("model.lsh_saved=buckets");
    const Config co = small_config(orders), cb = small_config(buckets);
    ASSERT_FALSE(lsh_saves_buckets(co, 1, 8));
    ASSERT_TRUE(lsh_saves_buckets(cb, 1, 8));
    // auto: buckets exactly where the rounds are attended one at a time.
    EXPECT_EQ(lsh_saves_buckets(small_config(sets), 1, 8), attention_by_round(cb, 1, 8));
    CpuOps<double> dops;
    const auto [dl0, dg0] = two_steps<double>(co, dops);
    const auto [dl1, dg1] = two_steps<double>(cb, dops);
    EXPECT_EQ(dl1, dl0);
    EXPECT_EQ(dg1, dg0);
    std::map<OpId, int64_t> calls[2];
    std::pair<std::vector<double>, std::vector<float>> out[2];
    for (int k = 0; k < 2; ++k) {
      CpuOps<float> cpu;
      ProfilingOps ops(cpu, std::make_unique<WallClock>());
      out[k] = two_steps<float>(k ? cb : co, ops);
      for (const OpStats& st : ops.stats()) calls[k][st.op] = st.calls;
    }
    EXPECT_EQ(out[1].first, out[0].first);
    EXPECT_EQ(out[1].second, out[0].second);
    // Two steps of one LSH layer of 2 heads: 4 hashes of a head. Orders
    // hash and sort once per pass of heads (every head of the pass in one
    // lsh_hash and one lsh_sort, hash_pass); buckets hash and sort once
    // per head, and sort once more in the backward and (unkept) the rebuild.
    const int64_t hashes = calls[1][OpId::lsh_hash];
    EXPECT_EQ(hashes, 4);
    const int64_t passes = hashes / attention_heads_per_pass(co, 1, 8);
    EXPECT_EQ(calls[0][OpId::lsh_hash], passes);
    EXPECT_EQ(calls[0][OpId::lsh_sort], passes);
    EXPECT_EQ(calls[0][OpId::lsh_pack_buckets], 0);
    EXPECT_EQ(calls[1][OpId::lsh_pack_buckets], hashes);
    const bool kept = cb.model.kept_layers == 2;  // no rebuild
    EXPECT_EQ(calls[1][OpId::lsh_sort], hashes * (kept ? 2 : 3));
    EXPECT_EQ(calls[1][OpId::lsh_unpack_buckets], calls[1][OpId::lsh_sort] - hashes);
  }
}

// The CPU ops behind the layouts a CUDA plan assumes for kept layers: the
// feed-forward state as wide as CUDA's (so the plan's hidden-state check
// passes) and, with ln_div 2, the LayerNorm rows in half the floats;
// everything else is the CPU's.
class CudaLayoutsCpu final : public Ops<float> {
 public:
  using T = float;
  explicit CudaLayoutsCpu(int ln_div) : ln_div_(ln_div) {}
  const char* name() const override { return "cpu"; }
  FfnStateCols ffn_state_cols(int C, int F, Activation act) const override {
    return cuda_ffn_state_cols(C, F, act == Activation::relu);
  }
  int64_t layernorm_ffn_ln_cols(int C, int) const override { return C / ln_div_; }
#define CUDA_LAYOUTS_FORWARD(ret, name, params, args) \
  ret name params override { return inner_.name args; }
  REFORMER_OPS(CUDA_LAYOUTS_FORWARD)
#undef CUDA_LAYOUTS_FORWARD

 private:
  CpuOps<float> inner_;
  int ln_div_;
};

// A model whose ops keep kept layers' state wider than the memory plan for
// training.device holds is refused at construction (ConfigError naming
// model.kept_layers), not left to overrun: the feed-forward state (fp32
// where a CUDA plan holds bf16), the LayerNorm rows (likewise), then the
// stashed attention outputs (exact where a CUDA plan holds bf16, in passes
// of one head).
TEST(Model, KeptStateWiderThanThePlanIsRefused) {
  const std::vector<std::string> sets = {"model.d_model=8", "model.d_ff=8",
                                         "model.kept_layers=2", "training.device=cuda",
                                         "model.attn_heads_per_pass=1"};
  const Config cfg = small_config(sets);
  ASSERT_EQ(kept_ln_cols(cfg), 4);
  ASSERT_TRUE(keeps_attention_outputs(cfg, 1));
  for (int ln_div : {0, 1, 2}) {  // 0: the CPU's own layouts
    SCOPED_TRACE("ln_div " + std::to_string(ln_div));
    CudaLayoutsCpu cuda_like(std::max(ln_div, 1));
    CpuOps<float> cpu;
    Ops<float>& ops = ln_div == 0 ? static_cast<Ops<float>&>(cpu) : cuda_like;
    try {
      ReformerModel<float> model(cfg, ops);
      ADD_FAILURE() << "no error";
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("model.kept_layers"), std::string::npos) << what;
      const char* want[] = {"hidden state", "LayerNorm rows", "attention outputs"};
      EXPECT_NE(what.find(want[ln_div]), std::string::npos) << what;
    }
  }
  // Kept layers with their attention state under a CUDA plan keep no qk
  // and v (the backward of the CUDA attention reads its staged operands);
  // ops that keep none, whose backward reads qk and v, are refused.
  Config state = small_config({"model.d_model=8", "model.d_ff=8", "model.kept_layers=2",
                               "training.device=cuda", "model.kept_attention=state"});
  ASSERT_TRUE(keeps_attention(state, 1));
  ASSERT_FALSE(keeps_attention_operands(state));
  ASSERT_TRUE(keeps_attention_operands(state, 8));  // no staging in double
  CpuOps<float> cpu;
  try {
    ReformerModel<float> model(state, cpu);
    ADD_FAILURE() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("attention keeps other operands"), std::string::npos)
        << e.what();
  }
  // Where one layer attends in full, it stages nothing to keep, so qk and v are kept.
  state.attention.kinds = {AttentionKind::lsh, AttentionKind::full};
  EXPECT_TRUE(keeps_attention_operands(state));
  state.attention.kinds = {AttentionKind::lsh};
  state.model.max_len = state.attention.bucket_size;
  EXPECT_TRUE(keeps_attention_operands(state));
}

template <class T>
double max_rebuild_error(const Config& cfg, double* scale) {
  CpuOps<T> ops;
  ReformerModel<T> model(cfg, ops);
  model.init_params(cfg.training.seed);
  std::vector<int32_t> tokens, targets;
  make_tokens(model.seq_len(), cfg.model.vocab_size, 8, &tokens, &targets);
  typename ReformerModel<T>::Trace trace;
  model.trace = &trace;
  model.forward_backward(tokens.data(), targets.data(), 1, true, true, T(0.1));
  double worst = 0;
  *scale = 0;
  for (int l = 0; l < cfg.model.n_layers; ++l) {
    for (size_t i = 0; i < trace.forward_x1[size_t(l)].size(); ++i) {
      worst = std::max(worst, double(std::fabs(trace.forward_x1[size_t(l)][i] -
                                                trace.rebuilt_x1[size_t(l)][i])));
      worst = std::max(worst, double(std::fabs(trace.forward_x2[size_t(l)][i] -
                                                trace.rebuilt_x2[size_t(l)][i])));
      *scale = std::max(*scale, double(std::fabs(trace.forward_x1[size_t(l)][i])));
    }
  }
  return worst;
}

TEST(Reversible, RebuildsLayerInputsToFp32Rounding) {
  // Each rebuild subtracts the same branch output the forward added, so the
  // error is a few fp32 roundings of the stream magnitude per layer.
  const Config cfg = small_config({"model.n_layers=4", "model.dropout=0.1"});
  double scale = 0;
  const double err = max_rebuild_error<float>(cfg, &scale);
  EXPECT_GT(scale, 0.1);
  EXPECT_LE(err, 4 * cfg.model.n_layers * 1.2e-7 * scale);
}

TEST(Reversible, RebuildsLayerInputsInDouble) {
  const Config cfg = small_config({"model.n_layers=3"});
  double scale = 0;
  EXPECT_LE(max_rebuild_error<double>(cfg, &scale), 1e-14 * std::max(1.0, scale));
}

TEST(Attention, LshEqualsFullWhenEveryWindowCoversTheSequence) {
  // max_len = 2 * bucket_size with one chunk of look-back: every query sees
  // every key in every round, so LSH attention is exact attention whatever
  // the hashing.
  const std::vector<std::string> base = {"model.max_len=12", "attention.bucket_size=6",
                                         "model.n_layers=2"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.end(), base.begin(), base.end());
    return small_config(extra);
  };
  const Config lsh = with({"attention.kinds=[lsh]", "attention.n_hashes=4"});
  const Config full = with({"attention.kinds=[full]"});
  CpuOps<double> ops;
  ReformerModel<double> a(lsh, ops), b(full, ops);
  a.init_params(9);
  b.init_params(9);
  std::vector<int32_t> tokens, targets;
  make_tokens(12, 7, 21, &tokens, &targets);
  std::vector<double> la, lb;
  a.forward_logits(tokens.data(), 3, &la);
  b.forward_logits(tokens.data(), 3, &lb);
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) EXPECT_NEAR(la[i], lb[i], 1e-12);
}

namespace {
// Changing the token at position t must leave every logit before t unchanged:
// bitwise when the summation order is fixed (full, local), to `tol` when a
// changed bucket reorders the keys of a window (LSH).
void check_causal(const Config& cfg, float tol) {
  CpuOps<float> ops;
  ReformerModel<float> model(cfg, ops);
  model.init_params(cfg.training.seed);
  const int64_t L = model.seq_len();
  std::vector<int32_t> tokens, targets;
  make_tokens(L, cfg.model.vocab_size, 5, &tokens, &targets);
  std::vector<float> before, after;
  model.forward_logits(tokens.data(), 7, &before);
  for (int64_t t : {int64_t(1), L / 2, L - 1}) {
    // A future change must change something later, or the test proves nothing.
    std::vector<int32_t> changed = tokens;
    changed[size_t(t)] = (changed[size_t(t)] + 3) % cfg.model.vocab_size;
    model.forward_logits(changed.data(), 7, &after);
    const int V = cfg.model.vocab_size;
    for (int64_t i = 0; i < t * V; ++i)
      ASSERT_NEAR(before[size_t(i)], after[size_t(i)], tol * (1 + std::fabs(before[size_t(i)])))
          << "position " << i / V << " changed by " << t;
    bool later_changed = false;
    for (int64_t i = t * V; i < L * V; ++i) later_changed |= before[size_t(i)] != after[size_t(i)];
    EXPECT_TRUE(later_changed) << "the change at " << t << " had no effect at all";
  }
}
}  // namespace

TEST(Causality, FullAndLocalAttention) {
  check_causal(small_config({"attention.kinds=[full, local]", "model.max_len=24"}), 0.0f);
}

TEST(Causality, LshWhenWindowsCoverTheSequence) {
  // LSH chunk membership depends on every position's bucket (as in the
  // paper), so strict token-level causality holds when windows cover the
  // sequence; the kernel-level test checks the mask with fixed buckets.
  check_causal(small_config({"attention.kinds=[lsh]", "model.max_len=12",
                             "attention.bucket_size=6", "attention.n_hashes=3"}),
               1e-5f);
}

TEST(Model, ParameterTableIsContiguousAndNamed) {
  const Config cfg = small_config();
  CpuOps<float> ops;
  ReformerModel<float> model(cfg, ops);
  int64_t next = 0;
  for (const ParamInfo& p : model.table().params()) {
    EXPECT_EQ(p.offset, next) << p.name;
    next += p.size;
  }
  EXPECT_EQ(next, model.num_params());
  EXPECT_EQ(model.table().params().front().name, "embed.tokens");
  EXPECT_EQ(model.table().params().back().name, "head.bias");
}

TEST(Model, SameSeedSameBitsAcrossRuns) {
  const Config cfg = small_config();
  CpuOps<float> ops;
  ReformerModel<float> a(cfg, ops), b(cfg, ops);
  a.init_params(2);
  b.init_params(2);
  std::vector<int32_t> tokens, targets;
  make_tokens(a.seq_len(), 7, 3, &tokens, &targets);
  a.zero_grads();
  b.zero_grads();
  const LossStats sa = a.forward_backward(tokens.data(), targets.data(), 4, true, true, 0.5f);
  const LossStats sb = b.forward_backward(tokens.data(), targets.data(), 4, true, true, 0.5f);
  EXPECT_EQ(sa.loss_sum, sb.loss_sum);
  for (int64_t i = 0; i < a.num_params(); ++i) ASSERT_EQ(a.grads()[i], b.grads()[i]);
}

// Named views reach every tensor of the table exactly once, and refuse a
// table they do not match.
TEST(ModelTensors, BindingMatchesTheTable) {
  const Config cfg = small_config();
  ParamTable t = model_param_table(cfg);
  std::vector<double> buf(size_t(t.total()));
  const ModelTensors<double> v = bind_tensors(t, buf.data(), cfg.model.n_layers);
  EXPECT_EQ(v.tokens, buf.data());
  EXPECT_EQ(v.layers[1].b2 + cfg.model.d_model, v.ln_out_w);
  const ParamRange l1 = layer_range(t, 1), head = head_range(t);
  EXPECT_EQ(l1.offset + l1.count, head.offset);
  EXPECT_EQ(head.offset + head.count, t.total());
  t.add("stray", {3}, InitKind::zeros, 0, false);
  EXPECT_THROW(bind_tensors(t, buf.data(), cfg.model.n_layers), ShapeError);
  EXPECT_THROW(bind_tensors(model_param_table(cfg), buf.data(), 3), ShapeError);
}
