// The memory plan against what the model really allocates: for several
// configurations (attention kinds, chunking, optimizers, sequence
// parallelism) the bytes the model and the optimizer allocate through the
// Ops equal the plan's allocated_bytes(), and a step allocates nothing more.
// Also the plan's search for the longest length that fits, and size parsing.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "framework/config.h"
#include "framework/memory_plan.h"
#include "framework/model.h"
#include "framework/optimizer.h"
#include "kernels/errors.h"
#include "tests/common/counting_ops.h"

using namespace reformer;

namespace {

// A group of `n` ranks whose collectives are never called: constructing a
// sequence-parallel model asks only for the group's size.
class FakeGroup final : public Communicator {
 public:
  explicit FakeGroup(int n) : n_(n) {}
  const char* backend() const override { return "fake"; }
  int rank() const override { return 0; }
  int size() const override { return n_; }
  void allreduce_sum(float*, int64_t) override { no(); }
  void allreduce_sum(double*, int64_t) override { no(); }
  std::unique_ptr<Work> allreduce_sum_async(float*, int64_t) override { no(); }
  void broadcast(void*, int64_t, int) override { no(); }
  void allgather(const void*, void*, int64_t) override { no(); }
  void reduce_scatter_sum(const float*, float*, int64_t) override { no(); }
  void alltoall(const void*, void*, int64_t) override { no(); }
  void alltoallv(const void*, const int64_t*, const int64_t*, void*, const int64_t*,
                 const int64_t*) override { no(); }
  void send(const void*, int64_t, int) override { no(); }
  void recv(void*, int64_t, int) override { no(); }
  void barrier() override { no(); }
  std::unique_ptr<Communicator> split(int, int) override { no(); }
  [[noreturn]] void abort(int) override { std::abort(); }

 private:
  [[noreturn]] static void no() { throw CommError("FakeGroup: no collectives"); }
  int n_;
};

Config config(const std::vector<std::string>& sets) {
  const char* yaml = R"(
model:
  vocab_size: 11
  d_model: 12
  n_heads: 4
  d_ff: 10
  n_layers: 3
  max_len: 48
attention:
  kinds: [lsh, local, full]
  bucket_size: 4
  n_hashes: 3
data:
  kind: duplication
)";
  return parse_config(yaml, "plan test", sets);
}

// Bytes the model and optimizer of `cfg` allocate on one rank of `sp`,
// after construction and at the peak of a step.
template <class T>
void expect_plan_matches(const Config& cfg, int sp) {
  SCOPED_TRACE("sp " + std::to_string(sp));
  test::CountingOps<T> ops;
  FakeGroup group(sp);
  const SequenceShard shard{sp, 0, sp > 1 ? &group : nullptr};
  const MemoryPlan plan = plan_memory(cfg, sp, int(sizeof(T)));
  ReformerModel<T> model(cfg, ops, shard);
  Optimizer<T> opt(cfg.optimizer, model.table(), ops);
  EXPECT_EQ(ops.live_bytes(), plan.allocated_bytes()) << format_plan(plan);
  if (sp == 1) {  // a step (sp > 1 would exchange)
    std::vector<int32_t> tokens(size_t(cfg.model.max_len), 1), targets(tokens);
    model.init_params(1);
    model.forward_backward(tokens.data(), targets.data(), 0, true, true, T(0.01));
    opt.step(model.params(), model.grads(), 1, 1e-3);
  }
  EXPECT_EQ(ops.peak_bytes(), plan.allocated_bytes());
}

}  // namespace

TEST(MemoryPlan, EqualsTheModelsAllocations) {
  for (const auto& sets : std::vector<std::vector<std::string>>{
           {},
           {"model.ffn_chunk=20", "model.loss_chunk=16"},
           {"model.ffn_chunk=20", "model.proj_chunk=8"},
           {"model.ffn_chunk=12", "model.proj_chunk=40", "model.dropout=0.1"},
           {"model.attn_heads_per_pass=1"},
           {"model.attn_rounds_per_pass=1"},
           {"model.lsh_saved=buckets"},
           {"model.lsh_saved=buckets", "model.attn_heads_per_pass=1", "model.kept_layers=2"},
           {"model.attn_heads_per_pass=1", "model.attn_rounds_per_pass=3"},
           {"attention.kinds=[full]", "optimizer.name=adafactor"},
           {"attention.kinds=[local]", "optimizer.name=adafactor", "optimizer.beta1=0"},
           {"attention.factorize_buckets=true", "model.d_head=5"},
           {"parallel.sp_mode=sort", "attention.kinds=[lsh, local]"},
           {"parallel.sp_mode=sort", "attention.kinds=[local]", "model.n_heads=3"},
           {"model.kept_layers=3"},
           {"model.kept_layers=1", "model.ffn_chunk=20", "model.attn_heads_per_pass=1"},
           {"model.kept_layers=2", "parallel.sp_mode=sort", "attention.kinds=[lsh, local]"},
           {"model.stashed_layers=2"},
           {"model.kept_layers=2", "model.kept_attention=outputs"},
           {"model.kept_layers=2", "model.kept_ffn=pre_activation", "model.ffn_chunk=20"},
           {"model.kept_layers=2", "model.kept_x1=rebuilt", "model.attn_heads_per_pass=1"},
           {"model.kept_layers=2", "model.kept_ln=rebuilt", "model.ffn_chunk=20"},
           {"model.kept_layers=1", "model.stashed_layers=2", "model.attn_heads_per_pass=1"}}) {
    SCOPED_TRACE(sets.empty() ? "defaults" : sets[0]);
    const Config cfg = config(sets);
    expect_plan_matches<float>(cfg, 1);
    expect_plan_matches<double>(cfg, 1);
    expect_plan_matches<float>(cfg, 2);
    expect_plan_matches<float>(cfg, 4);
    expect_plan_matches<float>(cfg, 12);  // pairs: 4 heads x 3 ranks, one hash round each
  }
}

// The attention outputs in bf16 (attention_output_bf16): on a CUDA device
// attending in bf16 at sp 1, every layer attending in chunks with all its
// rounds per call, "ao" and "kept ao" are half their fp32 size; not on the
// CPU, at fp32 precision, with a full-attention layer or at one chunk,
// with rounds one at a time, under sp, or with
// REFORMER_BF16_ATTENTION_OUTPUT=off. A backend whose attention writes
// fp32 outputs refuses a plan that keeps them in bf16.
TEST(MemoryPlan, AttentionOutputsInBf16WhereTheDeviceKeepsThem) {
  const Config bench =
      load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml",
                  {"model.max_len=65536", "training.device=cuda", "model.kept_layers=6"});
  ASSERT_TRUE(keeps_attention(bench, 1));
  EXPECT_TRUE(attention_output_bf16(bench, 1));
  const int64_t L = 65536, HD = bench.model.d_model;
  EXPECT_EQ(plan_memory(bench, 1).count("ao"), L * HD / 2);
  EXPECT_EQ(plan_memory(bench, 1).count("kept ao"), L * HD / 2);
  EXPECT_EQ(plan_memory(bench, 1).count("dao"), L * HD);
  auto with = [&](std::vector<std::string> sets) {
    sets.insert(sets.begin(), {"model.max_len=65536", "training.device=cuda"});
    return load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml", sets);
  };
  for (const auto& sets : std::vector<std::vector<std::string>>{
           {"training.device=cpu"},
           {"attention.precision=fp32"},
           {"attention.kinds=[lsh, full]"},
           {"model.attn_rounds_per_pass=1"},
           {"model.max_len=64"}}) {
    SCOPED_TRACE(sets[0]);
    const Config c = with(sets);
    EXPECT_FALSE(attention_output_bf16(c, 1));
    EXPECT_EQ(plan_memory(c, 1).count("ao"), plan_memory(c, 1).count("dao"));
  }
  EXPECT_TRUE(attention_output_bf16(with({"attention.kinds=[lsh, local]"}), 1));
  EXPECT_FALSE(attention_output_bf16(bench, 2));
  setenv("REFORMER_BF16_ATTENTION_OUTPUT", "off", 1);
  EXPECT_FALSE(attention_output_bf16(bench, 1));
  EXPECT_EQ(plan_memory(bench, 1).count("ao"), L * HD);
  setenv("REFORMER_BF16_ATTENTION_OUTPUT", "sometimes", 1);
  EXPECT_THROW(attention_output_bf16(bench, 1), ConfigError);
  unsetenv("REFORMER_BF16_ATTENTION_OUTPUT");
  // The CPU attention writes fp32 outputs: a model for such a plan is refused.
  Config small =
      config({"training.device=cuda", "attention.kinds=[lsh, local]", "model.d_model=32"});
  ASSERT_TRUE(attention_output_bf16(small, 1));
  test::CountingOps<float> ops;
  EXPECT_THROW((ReformerModel<float>(small, ops, SequenceShard{1, 0, nullptr})), ConfigError);
}

// The attention's gradients and operands in bf16 (attention_gradients_bf16,
// attention_operands_bf16, each with its own switch): where the outputs
// may be (the same device, precision and layout) and every layer is an LSH
// layer of several hash rounds with d_model a multiple of 8 of at most
// 2048: dqk and dv share "dqk" (no "dv"), "qk" and "v" are half their fp32
// size; not with a local or full layer, one hash round, rounds one at a
// time, wider d_model, on the CPU, at fp32, under sp or with
// REFORMER_BF16_ATTENTION_GRADIENTS / _OPERANDS=off. A backend whose
// attention writes fp32 gradients or reads fp32 operands refuses such a
// plan.
TEST(MemoryPlan, AttentionGradientsAndOperandsInBf16WhereTheDeviceKeepsThem) {
  auto with = [&](std::vector<std::string> sets) {
    sets.insert(sets.begin(), {"model.max_len=65536", "training.device=cuda"});
    return load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml", sets);
  };
  const Config bench = with({});
  ASSERT_TRUE(attention_gradients_bf16(bench, 1));
  ASSERT_TRUE(attention_operands_bf16(bench, 1));
  const int64_t L = 65536, HD = bench.model.d_model;
  const MemoryPlan plan = plan_memory(bench, 1);
  EXPECT_EQ(plan.count("dqk"), L * HD);
  EXPECT_EQ(plan.count("dao"), L * HD);
  EXPECT_EQ(plan.count("qk"), L * HD / 2);
  EXPECT_EQ(plan.count("v"), L * HD / 2);
  EXPECT_THROW(plan.count("dv"), ShapeError);  // not in the plan
  for (const auto& sets : std::vector<std::vector<std::string>>{
           {"training.device=cpu"},
           {"attention.precision=fp32"},
           {"attention.kinds=[lsh, local]"},
           {"attention.kinds=[lsh, full]"},
           {"attention.n_hashes=1"},
           {"model.attn_rounds_per_pass=1"},
           {"model.d_model=2560", "model.n_heads=20"},
           {"model.max_len=64"}}) {
    SCOPED_TRACE(sets[0]);
    const Config c = with(sets);
    EXPECT_FALSE(attention_gradients_bf16(c, 1));
    EXPECT_FALSE(attention_operands_bf16(c, 1));
    EXPECT_EQ(plan_memory(c, 1).count("dv"), plan_memory(c, 1).count("dqk"));
    EXPECT_EQ(plan_memory(c, 1).count("qk"), plan_memory(c, 1).count("dqk"));
  }
  EXPECT_FALSE(attention_gradients_bf16(bench, 2));
  EXPECT_FALSE(attention_operands_bf16(bench, 2));
  for (const char* env : {"REFORMER_BF16_ATTENTION_GRADIENTS", "REFORMER_BF16_ATTENTION_OPERANDS"}) {
    SCOPED_TRACE(env);
    const bool grads = std::string(env).find("GRADIENTS") != std::string::npos;
    setenv(env, "off", 1);
    EXPECT_NE(attention_gradients_bf16(bench, 1), grads);  // each a switch of its own
    EXPECT_EQ(attention_operands_bf16(bench, 1), grads);
    EXPECT_TRUE(attention_output_bf16(bench, 1));
    EXPECT_EQ(plan_memory(bench, 1).count(grads ? "dv" : "v"), L * HD);
    setenv(env, "sometimes", 1);
    EXPECT_THROW(plan_memory(bench, 1), ConfigError);
    unsetenv(env);
  }
  // The CPU attention writes fp32 gradients and reads fp32 operands: a
  // model for a plan with either in bf16 is refused (with the outputs in
  // fp32, so that this is what refuses it).
  setenv("REFORMER_BF16_ATTENTION_OUTPUT", "off", 1);
  Config small = config({"training.device=cuda", "attention.kinds=[lsh]", "model.d_model=32"});
  for (const char* off : {"REFORMER_BF16_ATTENTION_OPERANDS", "REFORMER_BF16_ATTENTION_GRADIENTS"}) {
    setenv(off, "off", 1);
    ASSERT_NE(attention_gradients_bf16(small, 1), attention_operands_bf16(small, 1));
    test::CountingOps<float> ops;
    try {
      ReformerModel<float> m(small, ops, SequenceShard{1, 0, nullptr});
      ADD_FAILURE() << "a plan with bf16 attention buffers accepted by an fp32 backend";
    } catch (const ConfigError& e) {
      const std::string want = attention_gradients_bf16(small, 1) ? "gradients" : "operands";
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
    unsetenv(off);
  }
  unsetenv("REFORMER_BF16_ATTENTION_OUTPUT");
}

// Under sp the exchanges' sequence side and staging live in idle operand
// buffers (exchange_in_operands), except in pairs mode where a part's
// log-sum-exp rows (n_hashes / g = 4 here) are wider than an operand's rows
// (dh = 3): then the exchange holds buffers of its own, as the plan says.
TEST(MemoryPlan, ExchangeKeepsItsOwnBuffersOnlyWhereLseRowsAreWider) {
  const Config wide = config({"attention.n_hashes=8"});
  EXPECT_FALSE(exchange_in_operands(wide, 8));  // pairs, g = 2
  EXPECT_TRUE(exchange_in_operands(wide, 4));   // whole heads
  EXPECT_TRUE(exchange_in_operands(config({}), 12));  // pairs, one round a part
  EXPECT_FALSE(exchange_in_operands(config({}), 1));
  EXPECT_GT(plan_memory(wide, 8).count("lqk"), 0);
  EXPECT_THROW(plan_memory(wide, 4).count("lqk"), ShapeError);  // not in the plan
  expect_plan_matches<float>(wide, 8);
  expect_plan_matches<float>(wide, 4);
}

// Beyond n_heads, sp must be n_heads * g with g dividing n_hashes; the error
// lists the sp values that work.
TEST(MemoryPlan, RefusesSpThatNeitherHeadsNorPairsFit) {
  const Config cfg = config({"model.n_heads=2", "attention.n_hashes=2"});
  EXPECT_NO_THROW(plan_memory(cfg, 4));  // 2 heads x 2 rounds
  try {
    plan_memory(cfg, 8);
    FAIL() << "sp 8 with 2 heads and 2 hash rounds accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("use sp in {1, 2, 4}"), std::string::npos) << e.what();
  }
}

// Under sequence parallelism a pass holds some of a rank's n_heads / sp
// heads: the key must divide them, and the error names it.
TEST(MemoryPlan, HeadsPerPassDivideTheRanksHeads) {
  EXPECT_EQ(attention_heads_per_pass(config({"model.attn_heads_per_pass=1"}), 2), 1);
  EXPECT_EQ(attention_heads_per_pass(config({}), 2), 2);  // auto: all local heads fit
  try {
    plan_memory(config({"model.attn_heads_per_pass=2"}), 4);
    FAIL() << "2 heads per pass of 1 local head accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.attn_heads_per_pass"), std::string::npos)
        << e.what();
  }
}

// Rounds one at a time: by default when a pass holds one head and that
// would save more than kRoundSavingThreshold; the key forces either way;
// one round at a time needs less op workspace (one round's output, no
// per-round gradients) where attention's is the largest (1M), and nothing
// more in the model; values other than auto, 1 and n_hashes are refused,
// naming the key.
TEST(MemoryPlan, RoundsPerPass) {
  EXPECT_FALSE(attention_by_round(config({}), 1));
  EXPECT_FALSE(attention_by_round(config({"model.attn_heads_per_pass=1"}), 1));
  EXPECT_TRUE(attention_by_round(config({"model.attn_rounds_per_pass=1"}), 1));
  EXPECT_FALSE(attention_by_round(
      config({"model.attn_heads_per_pass=1", "model.attn_rounds_per_pass=3"}), 1));
  EXPECT_FALSE(attention_by_round(config({"model.attn_rounds_per_pass=1"}), 12));  // 1 round/rank
  // 3 rounds of dh 128: the op's round outputs and gradient scratch, less
  // one round's output, save more than kRoundSavingThreshold over 16M
  // positions, less over 1M.
  const std::vector<std::string> long_seq = {"model.max_len=16777216", "model.d_head=128",
                                             "model.attn_heads_per_pass=1"};
  EXPECT_TRUE(attention_by_round(config(long_seq), 1));
  EXPECT_FALSE(attention_by_round(config({"model.max_len=1048576", "model.d_head=128",
                                          "model.attn_heads_per_pass=1"}), 1));
  const MemoryPlan all = plan_memory(config({"model.max_len=1048576", "model.d_head=128"}), 1);
  const MemoryPlan one = plan_memory(
      config({"model.max_len=1048576", "model.d_head=128", "model.attn_rounds_per_pass=1"}), 1);
  EXPECT_EQ(one.bytes(PlanGroup::activations), all.bytes(PlanGroup::activations));
  EXPECT_LT(one.bytes(PlanGroup::workspace), all.bytes(PlanGroup::workspace));
  EXPECT_LT(one.total_bytes(), all.total_bytes());
  const MemoryPlan all32 = plan_memory(
      config({"model.max_len=65536", "model.d_head=128", "attention.precision=fp32"}), 1);
  const MemoryPlan one32 =
      plan_memory(config({"model.max_len=65536", "model.d_head=128", "attention.precision=fp32",
                          "model.attn_rounds_per_pass=1"}), 1);
  EXPECT_LT(one32.bytes(PlanGroup::workspace), all32.bytes(PlanGroup::workspace));
  try {
    plan_memory(config({"model.attn_rounds_per_pass=2"}), 1);
    FAIL() << "2 rounds per call of 3 accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.attn_rounds_per_pass"), std::string::npos)
        << e.what();
  }
}

// Sort mode takes any sp whose shards hold whole chunks and the halo, and
// refuses full-attention layers, saying what to use instead.
TEST(MemoryPlan, SortModeLayouts) {
  const Config lsh = config({"parallel.sp_mode=sort", "attention.kinds=[lsh, local]"});
  EXPECT_NO_THROW(plan_memory(lsh, 3));  // 4 heads over 3 ranks: no head count limits it
  EXPECT_NO_THROW(plan_memory(lsh, 12));
  for (const auto& [sets, sp, says] :
       std::vector<std::tuple<std::vector<std::string>, int, std::string>>{
           {{"parallel.sp_mode=sort"}, 2, "layer 2 is full attention"},
           {{"parallel.sp_mode=sort", "attention.kinds=[lsh]", "model.max_len=40"}, 4,
            "multiple of attention.bucket_size"}}) {
    try {
      plan_memory(config(sets), sp);
      FAIL() << "sort mode accepted at sp " << sp;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  }
}

// The 16M-token recipe for 4 GPUs (sort mode) fits a 141 GiB H200 by the plan.
TEST(MemoryPlan, SortRecipeFitsFourH200s) {
  const Config cfg =
      load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/long-16m-sort-sp4.yaml");
  ASSERT_EQ(cfg.parallel.sp_mode, SpMode::sort);
  const MemoryPlan plan = plan_memory(cfg, cfg.parallel.sp);
  EXPECT_LE(plan.total_bytes(), int64_t(141) << 30);
  EXPECT_GT(plan.total_bytes(), int64_t(100) << 30);  // it is the big one
}

TEST(MemoryPlan, LongestLengthThatFits) {
  const Config cfg = config({});
  // With the heads per pass set, a budget of exactly the plan at 48 fits 48,
  // and nothing longer.
  const Config one = config({"model.attn_heads_per_pass=1"});
  EXPECT_EQ(longest_length_that_fits(one, 1, plan_memory(one, 1).total_bytes()), 48);
  // Auto heads per pass are fitted to the budget at every length.
  const int64_t GiB = int64_t(1) << 30;
  auto fitted = [&](const Config& c, int64_t len, int sp) {
    return plan_memory(fit_heads_per_pass(with_length(c, len, "t"), sp, GiB), sp).total_bytes();
  };
  const int64_t big = longest_length_that_fits(cfg, 1, GiB);
  EXPECT_GT(big, 48);
  EXPECT_EQ(big % 4, 0);
  EXPECT_LE(fitted(cfg, big, 1), GiB);
  EXPECT_GT(fitted(cfg, big + 4, 1), GiB);
  // Under sp 4 the length stays a multiple of 4 * bucket_size's lcm.
  EXPECT_EQ(longest_length_that_fits(cfg, 4, int64_t(1) << 30) % 4, 0);
  EXPECT_EQ(longest_length_that_fits(cfg, 1, 1000), 0);
  // Sort mode: whole chunks per rank, so steps of sp * bucket_size; the
  // search finds the same kind of boundary.
  const Config sort = config({"parallel.sp_mode=sort", "attention.kinds=[lsh, local]"});
  const int64_t s4 = longest_length_that_fits(sort, 4, int64_t(1) << 30);
  EXPECT_GT(s4, 48);
  EXPECT_EQ(s4 % 16, 0);
  EXPECT_LE(fitted(sort, s4, 4), GiB);
  EXPECT_GT(fitted(sort, s4 + 16, 4), GiB);
}

// The out-of-memory advice of ranks sharing a GPU: the longest length that
// fits in each rank's share, named as such.
TEST(MemoryPlan, AdviceForRanksSharingAGpu) {
  const Config cfg = config({});
  const int64_t GiB = int64_t(1) << 30;
  const std::string one = plan_advice(cfg, 1, GiB);
  const std::string four = plan_advice(cfg, 1, 4 * GiB, 4);
  const std::string fits = std::to_string(longest_length_that_fits(cfg, 1, GiB));
  EXPECT_NE(one.find("needs "), std::string::npos) << one;
  EXPECT_NE(one.find(" per GPU; the longest max_len that fits in 1.00 GiB is " + fits),
            std::string::npos)
      << one;
  EXPECT_NE(four.find(" per rank; the longest max_len that fits in 1.00 GiB (the GPU's 4.00 GiB "
                      "shared by 4 ranks) is " + fits),
            std::string::npos)
      << four;
}

TEST(MemoryPlan, ParsesSizes) {
  EXPECT_EQ(parse_bytes("141GiB", "m"), int64_t(141) << 30);
  EXPECT_EQ(parse_bytes("80G", "m"), int64_t(80) << 30);
  EXPECT_EQ(parse_bytes("512MiB", "m"), int64_t(512) << 20);
  EXPECT_EQ(parse_bytes("1.5TiB", "m"), int64_t(3) << 39);
  EXPECT_EQ(parse_bytes("1000", "m"), 1000);
  for (const char* bad : {"", "GiB", "-1G", "12X", "1GiBs", "nan", "0"})
    EXPECT_THROW(parse_bytes(bad, "m"), ConfigError) << bad;
}

// Auto heads per pass on a device of a given size: the most heads (a
// divisor of n_heads; the pass budget, which decides without a device, does
// not bound it) whose whole plan takes at most 90% of the device, else one;
// a set key and an unknown device leave the config alone. The peers' model
// at 1M with 16K chunks. Kept layers set by count are planned in their
// smallest forms where the forms are auto (fitted after the heads).
TEST(MemoryPlan, HeadsPerPassFitTheDevice) {
  const Config cfg = load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml",
                                 {"model.max_len=1048576", "model.ffn_chunk=16384",
                                  "model.loss_chunk=16384"});
  const int64_t GiB = int64_t(1) << 30;
  auto fitted = [&](const Config& c, int64_t bytes) {
    return fit_heads_per_pass(c, 1, bytes).model.attn_heads_per_pass;
  };
  auto planned = [&](int g) {
    Config c = cfg;
    c.model.attn_heads_per_pass = g;
    return double(plan_memory(c, 1).total_bytes());
  };
  EXPECT_EQ(attention_heads_per_pass(cfg, 1), 4);  // the 24 GiB pass budget, no device
  EXPECT_EQ(fitted(cfg, 139 * GiB), 8);            // a device: beyond the budget
  EXPECT_EQ(fitted(cfg, 0), 0);                    // no device: the budget rule decides
  std::vector<int> seen;
  // Planned: 8 heads 47.39 GiB, 4 heads 35.27, 2 heads 29.20, 1 head 26.17.
  for (int64_t gib : {139, 45, 34, 30, 20}) {
    SCOPED_TRACE(std::to_string(gib) + " GiB");
    const int g = fitted(cfg, gib * GiB);
    seen.push_back(g);
    if (g > 1) EXPECT_LE(planned(g), 0.9 * double(gib * GiB));
    for (int more : {2, 4, 8})
      if (more > g) EXPECT_GT(planned(more), 0.9 * double(gib * GiB)) << more;
  }
  EXPECT_EQ(seen, (std::vector<int>{8, 4, 2, 1, 1}));
  Config set = cfg;
  set.model.attn_heads_per_pass = 2;
  EXPECT_EQ(fitted(set, 139 * GiB), 2);
  // 3 kept and 3 stashed on an H200 (as it reports its memory): 8 heads fit
  // with the kept layers' outputs and pre-activations and x1 rebuilt, not
  // with their whole attention state and both halves and x1 kept.
  Config counts = cfg;
  counts.training.device = DeviceKind::cuda;
  counts.model.kept_layers = 3;
  counts.model.stashed_layers = 3;
  const int64_t h200 = int64_t(143771) << 20;
  EXPECT_EQ(fitted(counts, h200), 8);
  Config state = counts;
  state.model.kept_attention = KeptAttention::state;
  state.model.kept_ffn = KeptFfn::both;
  state.model.kept_x1 = KeptPart::kept;
  state.model.kept_ln = KeptPart::kept;
  EXPECT_LT(fitted(state, h200), 8);
  const Config f = fit_to_device(counts, 1, h200);
  EXPECT_LE(double(plan_memory(f, 1).total_bytes()), 0.9 * double(h200));
}

// With heads per pass fitted at every length, the longest length that fits
// is a length whose fitted plan fits, and one unit more does not.
TEST(MemoryPlan, LongestFitUsesTheFittedPlan) {
  const Config cfg = load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml");
  const int64_t budget = int64_t(80) << 30;
  const int64_t L = longest_length_that_fits(cfg, 1, budget);
  ASSERT_GT(L, 1048576);
  auto total = [&](int64_t len) {
    return plan_memory(fit_heads_per_pass(with_length(cfg, len, "test"), 1, budget), 1)
        .total_bytes();
  };
  EXPECT_LE(total(L), budget);
  EXPECT_GT(total(L + 128), budget);  // bench-peer.yaml: lengths in steps of 128
}

// Auto kept layers on a device of a given size: the most whose whole plan
// takes at most 90% of it; none without a device; a set value stays. On
// CUDA (fused feed-forward) a kept layer holds its pre-activation and
// activation in bf16 (the CPU: fp32), the activation not under
// model.kept_ffn: pre_activation; with every head in one pass its attention
// state is kept too, else not.
TEST(MemoryPlan, KeptLayersFitTheDevice) {
  Config cfg = load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml",
                           {"model.max_len=65536", "training.device=cuda"});
  const int64_t GiB = int64_t(1) << 30;
  ASSERT_EQ(cfg.model.kept_layers, kKeptLayersAuto);
  EXPECT_EQ(kept_layer_count(cfg), 0);
  cfg.model.stashed_layers = 0;  // kept layers alone (StashedLayersFitBesideKeptOnes)
  EXPECT_TRUE(keeps_attention(cfg, 1));
  EXPECT_FALSE(keeps_attention(cfg, 2));
  const int64_t F = cfg.model.d_ff;
  auto ffn_cols = [&](const Config& c, KeptFfn form, int real_bytes = 4) {
    Config f = c;
    f.model.kept_ffn = form;
    const FfnStateCols cols = kept_ffn_cols(f, real_bytes);
    return std::pair{cols.h, cols.a};
  };
  EXPECT_EQ(ffn_cols(cfg, KeptFfn::auto_), std::pair(F / 2, F / 2));
  EXPECT_EQ(ffn_cols(cfg, KeptFfn::both), std::pair(F / 2, F / 2));
  EXPECT_EQ(ffn_cols(cfg, KeptFfn::pre_activation), std::pair(F / 2, int64_t(0)));
  Config relu = cfg;  // ReLU's activation is its own state, in h
  relu.model.activation = Activation::relu;
  EXPECT_EQ(ffn_cols(relu, KeptFfn::both), std::pair(F / 2, int64_t(0)));
  Config on_cpu = cfg;
  on_cpu.training.device = DeviceKind::cpu;
  EXPECT_EQ(ffn_cols(on_cpu, KeptFfn::both), std::pair(F, F));
  EXPECT_EQ(ffn_cols(on_cpu, KeptFfn::pre_activation), std::pair(F, int64_t(0)));
  EXPECT_EQ(ffn_cols(cfg, KeptFfn::both, 8), std::pair(F, F));
  EXPECT_EQ(fit_to_device(cfg, 1, 139 * GiB).model.kept_layers, 6);
  EXPECT_EQ(fit_kept_layers(cfg, 1, 0).model.kept_layers, 0);
  for (int64_t gib : {139, 24, 12, 6}) {
    const Config f = fit_kept_layers(cfg, 1, gib * GiB);
    const int k = f.model.kept_layers;
    SCOPED_TRACE(std::to_string(gib) + " GiB: " + std::to_string(k) + " kept");
    if (k > 0) EXPECT_LE(double(plan_memory(f, 1).total_bytes()), 0.9 * double(gib * GiB));
    if (k < 6) {
      Config more = f;
      more.model.kept_layers = k + 1;
      EXPECT_GT(double(plan_memory(more, 1).total_bytes()), 0.9 * double(gib * GiB));
    }
  }
  // Each kept layer adds the same bytes; at 1M (4 heads per pass) without attention state.
  Config k1 = cfg, k2 = cfg;
  k1.model.kept_layers = 1;
  k2.model.kept_layers = 2;
  const int64_t per_layer = plan_memory(k2, 1).total_bytes() - plan_memory(k1, 1).total_bytes();
  EXPECT_EQ(per_layer, plan_memory(k1, 1).total_bytes() - plan_memory(cfg, 1).total_bytes());
  const Config long1 = with_length(k1, 1048576, "test");
  EXPECT_FALSE(keeps_attention(long1, 1));
  // A kept layer's LayerNorm rows: bf16 on CUDA (half the floats), fp32 on
  // the CPU and in the double-precision checks.
  const int64_t D = cfg.model.d_model;
  EXPECT_EQ(kept_ln_cols(cfg), D / 2);
  EXPECT_EQ(kept_ln_cols(on_cpu), D);
  EXPECT_EQ(kept_ln_cols(cfg, 8), D);
  EXPECT_EQ(plan_memory(k1, 1).count("kept fln"), 65536 * D / 2);
  Config k1_cpu = k1;
  k1_cpu.training.device = DeviceKind::cpu;
  EXPECT_EQ(plan_memory(k1_cpu, 1).count("kept fln"), 65536 * D);
  Config wide = k1;  // rows wider than the bf16 LayerNorm takes: fp32
  wide.model.d_model = 4096;
  wide.model.n_heads = 32;
  EXPECT_EQ(kept_ln_cols(wide), 4096);
  Config set = cfg;
  set.model.kept_layers = 2;
  EXPECT_EQ(fit_kept_layers(set, 1, 6 * GiB).model.kept_layers, 2);
}

// Auto kept and stashed layers together: of the counts whose whole plan
// takes at most 90% of the device, the one that saves the backward most (a
// kept layer weighing kKeptOverStashed stashed ones). At 1M tokens in
// passes of 4 heads on an H200 that is 3 kept and 3 stashed (with the
// attention's outputs, operands and gradients in bf16); on 137 GiB, where
// 3 and 3 do not, 3 and 2. At 2M in passes of 2, 1 kept and 3 stashed. A
// stashed layer holds every pass's outputs (bf16 on CUDA) and log-sum-exps;
// none under sp or where rounds are attended one at a time; a set count
// stays, at most the layers below the kept ones.
TEST(MemoryPlan, StashedLayersFitBesideKeptOnes) {
  const Config cfg = load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml",
                                 {"model.max_len=1048576", "training.device=cuda",
                                  "model.attn_heads_per_pass=4", "model.kept_ffn=both",
                                  "model.kept_x1=kept", "model.kept_ln=kept"});
  const int64_t GiB = int64_t(1) << 30, h200 = int64_t(143771) << 20;  // as an H200 reports
  ASSERT_EQ(cfg.model.stashed_layers, kStashedLayersAuto);
  EXPECT_EQ(stashed_layer_count(cfg, 1), 0);
  const Config f = fit_to_device(cfg, 1, h200);
  EXPECT_EQ(f.model.kept_layers, 3);
  EXPECT_EQ(f.model.stashed_layers, 3);
  EXPECT_EQ(stashed_layer_count(f, 1), 3);
  const Config f137 = fit_to_device(cfg, 1, 137 * GiB);
  EXPECT_EQ(f137.model.kept_layers, 3);
  EXPECT_EQ(stashed_layer_count(f137, 1), 2);
  const double budget = 0.9 * double(h200);
  EXPECT_LE(double(plan_memory(f, 1).total_bytes()), budget);
  const int n = cfg.model.n_layers;
  const double chosen = kKeptOverStashed * 3 + 3;
  for (int k = 0; k <= n; ++k)
    for (int st = 0; st <= n - k; ++st) {
      Config c = f;
      c.model.kept_layers = k;
      c.model.stashed_layers = st;
      if (double(plan_memory(c, 1).total_bytes()) <= budget)
        EXPECT_LE(kKeptOverStashed * k + st, chosen) << k << " kept, " << st << " stashed";
    }
  // What a stashed layer holds: its passes' outputs in bf16 and log-sum-exps.
  const MemoryPlan plan = plan_memory(f, 1);
  const int64_t Hp = attention_heads_per_pass(f, 1), passes = f.model.n_heads / Hp;
  const int64_t n_out = int64_t(f.model.max_len) * Hp * f.head_dim();
  EXPECT_EQ(plan.count("stashed ao"), passes * stash_elems(f, n_out));
  EXPECT_LT(stash_elems(f, n_out), n_out);
  EXPECT_EQ(plan.count("stashed lse"), passes * plan.count("lse"));
  Config one = f, none = f;
  one.model.stashed_layers = 1;
  none.model.stashed_layers = 0;
  EXPECT_EQ(plan_memory(one, 1).total_bytes() - plan_memory(none, 1).total_bytes(),
            4 * (plan.count("stashed ao") + plan.count("stashed lse")));
  // At 2M in passes of 2 one is kept and three are stashed.
  Config two = with_length(cfg, 2097152, "test");
  two.model.attn_heads_per_pass = 2;
  const Config f2 = fit_to_device(two, 1, h200);
  EXPECT_EQ(f2.model.kept_layers, 1);
  EXPECT_EQ(stashed_layer_count(f2, 1), 3);
  // None under sp, none with one round per call, none without a device.
  EXPECT_EQ(stashed_layer_count(f, 2), 0);
  Config by_round = f;
  by_round.model.attn_rounds_per_pass = 1;
  EXPECT_EQ(stashed_layer_count(by_round, 1), 0);
  EXPECT_EQ(fit_kept_layers(cfg, 1, 0).model.stashed_layers, 0);
  // A set count stays (the kept layers fitted beside it); at most the rest.
  Config set = cfg;
  set.model.stashed_layers = 6;
  const Config fs = fit_to_device(set, 1, h200);
  EXPECT_EQ(fs.model.stashed_layers, 6);
  EXPECT_EQ(stashed_layer_count(fs, 1), n - fs.model.kept_layers);
  // At 64K every layer is kept, so none is stashed.
  const Config short_f = fit_to_device(with_length(cfg, 65536, "test"), 1, h200);
  EXPECT_EQ(short_f.model.kept_layers, 6);
  EXPECT_EQ(stashed_layer_count(short_f, 1), 0);
}

// Auto kept forms: with every head in one pass a kept layer may keep its
// whole attention state (weighing kKeptStateOverStashed stashed layers) or
// only its outputs (kKeptOverStashed), its feed-forward activation or only
// the pre-activation (weighing kActivationRebuildInStashed less), x1 or not
// (kX1RebuildInStashed less) and its LayerNorm rows or not
// (kLnRebuildInStashed less); the fit takes the forms with the best counts
// that fit. On an H200 (the attention's outputs, operands and gradients in
// bf16): at 64K and 512K every layer keeps everything; at 1M, 8 heads a
// pass, 4 their state and pre-activations, x1 and the LayerNorm rows
// rebuilt, and 2 stashed. A set form stays;
// without a device auto reads as state, both and kept.
TEST(MemoryPlan, KeptFormsFitTheDevice) {
  const Config cfg = load_config(std::string(REFORMER_SOURCE_DIR) + "/configs/bench-peer.yaml",
                                 {"training.device=cuda"});
  const int64_t h200 = int64_t(143771) << 20;
  ASSERT_EQ(cfg.model.kept_attention, KeptAttention::auto_);
  ASSERT_EQ(cfg.model.kept_ffn, KeptFfn::auto_);
  Config k2 = with_length(cfg, 65536, "test");
  k2.model.kept_layers = 2;
  EXPECT_TRUE(keeps_attention(k2, 1));  // auto reads as state
  EXPECT_GT(plan_memory(k2, 1).count("kept fa"), 0);  // and as both
  // The state form keeps the staged operands and not qk, v on CUDA; on the
  // CPU qk and v (its backward reads them) and nothing staged.
  EXPECT_GT(plan_memory(k2, 1).count("kept attention staging"), 0);
  EXPECT_GT(plan_memory(k2, 1).count("kept ao"), 0);
  for (const char* name : {"kept qk", "kept v"})
    EXPECT_THROW(plan_memory(k2, 1).count(name), ShapeError) << name;
  Config k2_cpu = k2;
  k2_cpu.training.device = DeviceKind::cpu;
  EXPECT_EQ(plan_memory(k2_cpu, 1).count("kept qk"), plan_memory(k2_cpu, 1).count("kept ao"));
  EXPECT_EQ(plan_memory(k2_cpu, 1).count("kept attention staging"), 0);
  k2.model.kept_attention = KeptAttention::outputs;
  EXPECT_FALSE(keeps_attention(k2, 1));
  EXPECT_TRUE(keeps_attention_outputs(k2, 1));
  EXPECT_THROW(plan_memory(k2, 1).count("kept qk"), ShapeError);
  EXPECT_GT(plan_memory(k2, 1).count("kept ao stash"), 0);
  k2.model.kept_ffn = KeptFfn::pre_activation;
  EXPECT_THROW(plan_memory(k2, 1).count("kept fa"), ShapeError);
  EXPECT_GT(plan_memory(k2, 1).count("kept x1"), 0);  // auto reads as kept
  k2.model.kept_x1 = KeptPart::rebuilt;
  EXPECT_THROW(plan_memory(k2, 1).count("kept x1"), ShapeError);
  EXPECT_GT(plan_memory(k2, 1).count("kept fln"), 0);  // auto reads as kept
  k2.model.kept_ln = KeptPart::rebuilt;
  for (const char* name : {"kept fln", "kept fmean", "kept frstd"})
    EXPECT_THROW(plan_memory(k2, 1).count(name), ShapeError) << name;
  EXPECT_EQ(plan_memory(k2, 1).count("kept fh"), int64_t(65536) * cfg.model.d_ff / 2);  // a copy
  struct Want {
    int64_t L;
    KeptAttention form;
    KeptFfn ffn;
    bool x1, ln;  // kept
    int kept, stashed, heads;
  };
  using A = KeptAttention;
  using F = KeptFfn;
  for (const Want& w : {Want{65536, A::state, F::both, true, true, 6, 0, 8},
                        Want{524288, A::state, F::both, true, true, 6, 0, 8},
                        Want{1048576, A::state, F::pre_activation, false, false, 4, 2, 8}}) {
    SCOPED_TRACE(w.L);
    const Config f = fit_to_device(with_length(cfg, w.L, "test"), 1, h200);
    EXPECT_EQ(f.model.kept_attention, w.form);
    EXPECT_EQ(f.model.kept_ffn, w.ffn);
    EXPECT_EQ(keeps_x1(f), w.x1);
    EXPECT_EQ(keeps_ln(f), w.ln);
    EXPECT_EQ(f.model.kept_layers, w.kept);
    EXPECT_EQ(stashed_layer_count(f, 1), w.stashed);
    EXPECT_EQ(attention_heads_per_pass(f, 1), w.heads);
    const double budget = 0.9 * double(h200);
    auto score = [&](const Config& c) {
      return ((keeps_attention(c, 1) ? kKeptStateOverStashed : kKeptOverStashed) -
              (c.model.kept_ffn == F::pre_activation ? kActivationRebuildInStashed : 0) -
              (keeps_x1(c) ? 0 : kX1RebuildInStashed) -
              (keeps_ln(c) ? 0 : kLnRebuildInStashed)) *
                 c.model.kept_layers + stashed_layer_count(c, 1);
    };
    EXPECT_LE(double(plan_memory(f, 1).total_bytes()), budget);
    for (A form : {A::state, A::outputs})
      for (F ffn : {F::both, F::pre_activation})
        for (KeptPart x1 : {KeptPart::kept, KeptPart::rebuilt})
        for (KeptPart ln : {KeptPart::kept, KeptPart::rebuilt})
          for (int k = 0; k <= 6; ++k)
            for (int st = 0; st <= 6 - k; ++st) {
              Config c = f;
              c.model.kept_attention = form;
              c.model.kept_ffn = ffn;
              c.model.kept_x1 = x1;
              c.model.kept_ln = ln;
              c.model.kept_layers = k;
              c.model.stashed_layers = st;
              if (double(plan_memory(c, 1).total_bytes()) <= budget)
                EXPECT_LE(score(c), score(f)) << k << " kept, " << st << " stashed";
            }
  }
  Config set = with_length(cfg, 1048576, "test");
  set.model.kept_attention = KeptAttention::state;
  set.model.kept_ffn = KeptFfn::both;
  set.model.kept_x1 = KeptPart::kept;
  set.model.kept_ln = KeptPart::kept;
  const Config fs = fit_to_device(set, 1, h200);
  EXPECT_EQ(fs.model.kept_attention, KeptAttention::state);
  EXPECT_EQ(fs.model.kept_ffn, KeptFfn::both);
  EXPECT_TRUE(keeps_attention(fs, 1));
  EXPECT_EQ(fs.model.kept_layers, 2);  // 34 GiB each (no fp32 qk and v, ao in bf16)
  EXPECT_EQ(fit_to_device(set, 1, 0).model.kept_ffn, KeptFfn::both);
  Config no_device = set;
  no_device.model.kept_ffn = KeptFfn::auto_;
  EXPECT_EQ(fit_to_device(no_device, 1, 0).model.kept_ffn, KeptFfn::auto_);
}
