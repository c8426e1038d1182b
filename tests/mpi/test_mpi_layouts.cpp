// Every process layout computes the function of one process, run under
// mpirun -np 2 and 4 on CPUs with the MPI backend:
//  - sequence-parallel attention (the head exchange) gives the outputs and,
//    summed over the group, the gradients of the one-process model (double),
//    also with more ranks than heads ((head, hash rounds) pairs), and with
//    kept layers (model.kept_layers) in every mode;
//  - training under every dp x sp layout of the world gives the per-step
//    losses and the final parameters of the one-process run (within 1e-5),
//    for an LSH-only model and for an LSH + local mix;
//  - a checkpoint written under one layout resumes under another;
//  - over a backend that stashes in bf16 (as CUDA does), the exchanges move
//    attention operands in bf16 and the model stays within their rounding.
//
// Every collective in a test is made by every rank in the same order; checks
// are EXPECT_* (never an ASSERT_* that could make one rank skip a collective
// the others wait in). All ranks run on one host and share /tmp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/model.h"
#include "framework/sequence_parallel.h"
#include "framework/trainer.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/errors.h"
#include "kernels/profiling_ops.h"
#include <omp.h>

#include "framework/logging.h"
#include "tests/common/layout_testing.h"
#include "tests/common/mpi_gtest_main.h"
#include "tests/common/narrow_stash_ops.h"
#include "tests/common/sort_mode_cases.h"

namespace fs = std::filesystem;
using namespace reformer;
using reformer::test::SortModeCase;
using reformer::test::sort_mode_cases;

namespace {

Communicator* g_world = nullptr;
Communicator& world() { return *g_world; }

std::string shared_temp_dir() { return test::shared_temp_dir(world(), "reformer_mpi_layouts"); }

Config make_config(const std::vector<std::string>& sets) {
  return test::layout_config(sets, "<test_mpi_layouts>");
}

struct Layout {
  int dp, sp;
};
std::string text(const Layout& l) {
  return "dp " + std::to_string(l.dp) + " x sp " + std::to_string(l.sp);
}
// Every dp x sp = world size.
std::vector<Layout> layouts() {
  std::vector<Layout> out;
  for (int sp = 1; sp <= world().size(); ++sp)
    if (world().size() % sp == 0) out.push_back({world().size() / sp, sp});
  return out;
}

// |a - b| <= atol + rtol * |b|
bool within(double a, double b, double rtol, double atol = 0) {
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

std::vector<float> flat_params(const Trainer& t) {
  std::vector<float> out;
  for (const CheckpointTensor& p : t.snapshot().model)
    out.insert(out.end(), p.data.begin(), p.data.end());
  return out;
}

struct RunResult {
  std::vector<double> losses;
  std::vector<float> params;
};

RunResult train(const Config& cfg, Communicator& comm) {
  Trainer t(cfg, comm, "");
  t.resume();
  const TrainResult r = t.train();
  return RunResult{r.losses, flat_params(t)};
}

// Compares a layout's run with the one-process run: losses to 1e-5 relative
// (gradients summed over ranks in another order drift by fp32 ulps per step),
// parameters to 1e-5 relative + 1e-5 absolute: AdamW divides by sqrt(v), so
// where a gradient is near zero its ulp-level drift moves the update by a
// fraction of lr (3e-3) per step; 1e-5 is 3.3e-3 lr (measured: 3.6e-6 at
// most, in the sort-mode resume at 4 ranks, whose losses agree to 3e-9).
void expect_same_run(const RunResult& got, const RunResult& ref, const std::string& what) {
  EXPECT_EQ(got.losses.size(), ref.losses.size()) << what;
  for (size_t s = 0; s < std::min(got.losses.size(), ref.losses.size()); ++s)
    EXPECT_PRED4(within, got.losses[s], ref.losses[s], 1e-5, 0.0) << what << ", step " << s + 1;
  EXPECT_EQ(got.params.size(), ref.params.size()) << what;
  int64_t wrong = 0;
  double worst = 0;
  for (size_t i = 0; i < std::min(got.params.size(), ref.params.size()); ++i) {
    wrong += !within(got.params[i], ref.params[i], 1e-5, 1e-5);
    worst = std::max(worst, double(std::fabs(got.params[i] - ref.params[i])));
  }
  EXPECT_EQ(wrong, 0) << what << ": largest parameter difference " << worst;
}

std::vector<std::string> layout_sets(const Layout& l, const std::string& dir) {
  return {"parallel.dp=" + std::to_string(l.dp), "parallel.sp=" + std::to_string(l.sp),
          "parallel.backend=mpi", "checkpoint.dir=" + dir};
}

// ------------------------------------------------------------------ attention

// The whole world as one sequence-parallel group, in double: every rank's
// logits equal its slice of the one-process logits, and the gradients summed
// over the group equal the one-process gradients (of `whole_cfg` when given:
// the same function in another form).
void expect_model_matches_one_process(const Config& cfg, const std::string& kinds,
                                      const Config* whole_cfg = nullptr) {
  CpuOps<double> ops;
  ReformerModel<double> whole(whole_cfg ? *whole_cfg : cfg, ops);
  ReformerModel<double> part(cfg, ops, SequenceShard{world().size(), world().rank(), &world()});
  whole.init_params(7);
  part.init_params(7);
  const int64_t L = cfg.model.max_len, Ll = part.seq_len(), p0 = part.seq_offset();
  EXPECT_EQ(Ll * world().size(), L);
  const auto [tokens, targets] = test::layout_sequence(L, cfg.model.vocab_size);
  const double scale = 1.0 / double(L - 1);
  whole.zero_grads();
  part.zero_grads();
  const LossStats a = whole.forward_backward(tokens.data(), targets.data(), 3, true, true, scale);
  const LossStats b = part.forward_backward(tokens.data() + p0, targets.data() + p0, 3, true,
                                            true, scale);
  double sums[2] = {b.loss_sum, double(b.count)};
  world().allreduce_sum(sums, 2);
  EXPECT_PRED4(within, sums[0], a.loss_sum, 1e-12, 0.0) << kinds;
  EXPECT_EQ(int64_t(sums[1]), a.count) << kinds;
  std::vector<double> g(part.grads(), part.grads() + part.num_params());
  world().allreduce_sum(g.data(), int64_t(g.size()));
  int64_t wrong = 0;
  for (int64_t i = 0; i < whole.num_params(); ++i)
    wrong += !within(g[size_t(i)], whole.grads()[i], 1e-9, 1e-12);
  EXPECT_EQ(wrong, 0) << kinds << ": gradients of " << whole.num_params();
  std::vector<double> la, lb;
  whole.forward_logits(tokens.data(), 3, &la);
  part.forward_logits(tokens.data() + p0, 3, &lb);
  int64_t wrong_logits = 0;
  const int64_t V = cfg.model.vocab_size;
  for (int64_t i = 0; i < Ll * V; ++i)
    wrong_logits += !within(lb[size_t(i)], la[size_t(p0 * V + i)], 1e-12, 1e-12);
  EXPECT_EQ(wrong_logits, 0) << kinds;
}

// Attention in passes of every local head (auto at this size), of one and
// (eight heads) of two.
TEST(SequenceParallel, ModelMatchesOneProcess) {
  struct Case {
    const char* kinds;
    const char* heads_per_pass;
    const char* heads;
    const char* rounds_per_pass = "0";
  };
  for (const Case c : {Case{"[lsh]", "0", "4"}, Case{"[lsh, local]", "0", "4"},
                       Case{"[full, lsh]", "0", "4"}, Case{"[lsh, full]", "1", "4"},
                       Case{"[lsh]", "1", "8"}, Case{"[local, lsh]", "2", "8"},
                       Case{"[lsh, local]", "1", "4", "1"}}) {
    const std::string kinds = std::string(c.kinds) + " heads_per_pass " + c.heads_per_pass +
                              " of " + c.heads + " rounds_per_pass " + c.rounds_per_pass;
    expect_model_matches_one_process(
        make_config({std::string("attention.kinds=") + c.kinds, "model.dropout=0.1",
                     std::string("model.attn_heads_per_pass=") + c.heads_per_pass,
                     std::string("model.n_heads=") + c.heads,
                     std::string("model.attn_rounds_per_pass=") + c.rounds_per_pass}),
        kinds);
  }
}

// More ranks than heads: (head, hash rounds) pairs, g = sp / n_heads ranks
// per head, combined by their log-sum-exps (local and full layers: g replicas
// of the head). np 2: one head of 2 and of 4 rounds; np 4: 2 heads of 2
// rounds (g 2) and one head of 4 rounds (g 4).
TEST(SequenceParallel, PairsMatchOneProcess) {
  struct Case {
    const char* kinds;
    int heads, hashes;
    int rounds_per_pass = 0;  // 1: each rank's rounds one call at a time
  };
  const int sp = world().size();
  const std::vector<Case> cases =
      sp == 4 ? std::vector<Case>{{"[local, lsh]", 2, 2}, {"[lsh, local]", 1, 4},
                                  {"[full, lsh]", 2, 2}, {"[lsh, local]", 1, 8, 1}}
              : std::vector<Case>{{"[local, lsh]", 1, 2}, {"[lsh, full]", 1, 4},
                                  {"[lsh, full]", 1, 4, 1}};
  for (const Case& c : cases) {
    const std::string what = std::string(c.kinds) + " " + std::to_string(c.heads) + " heads x " +
                             std::to_string(c.hashes) + " hashes at sp " + std::to_string(sp) +
                             (c.rounds_per_pass == 1 ? ", rounds one at a time" : "");
    expect_model_matches_one_process(
        make_config({std::string("attention.kinds=") + c.kinds, "model.dropout=0.1",
                     "model.n_heads=" + std::to_string(c.heads),
                     "attention.n_hashes=" + std::to_string(c.hashes),
                     "model.attn_rounds_per_pass=" + std::to_string(c.rounds_per_pass)}),
        what);
  }
}

// Sort mode (tests/common/sort_mode_cases.h).
TEST(SequenceParallel, SortModeMatchesOneProcess) {
  for (const SortModeCase& c : sort_mode_cases())
    expect_model_matches_one_process(make_config(settings(c)),
                                     describe(c) + " at sp " + std::to_string(world().size()));
}

// ---------------------------------------------------------------- the bf16 wire

// The head exchange over a backend whose stash is bf16
// (tests/common/narrow_stash_ops.h): an operand exchange gives the exact
// exchange's values rounded to bf16, bit for bit, both ways; an odd block,
// or a backend that stashes exactly, travels exact.
TEST(SequenceParallel, HeadExchangeRoundsOperandsOnly) {
  test::NarrowStashOps narrow_ops;
  CpuOps<float> exact_ops;
  EXPECT_EQ(test::operand_wire_wrong(narrow_ops, world(), 9, 6, true), 0);
  EXPECT_EQ(test::operand_wire_wrong(narrow_ops, world(), 9, 5, false), 0);  // an odd block
  EXPECT_EQ(test::operand_wire_wrong(exact_ops, world(), 9, 6, false), 0);
  world().barrier();
}

// An exchange that holds no staging refuses a call that names none, before
// any rank sends (so no rank waits on the others).
TEST(SequenceParallel, HeadExchangeWithoutStagingRefusesCallsThatNameNone) {
  CpuOps<float> ops;
  HeadExchange<float> lean(ops, world(), 3, 2, 0, false, /*own_staging*/ false);
  const int64_t n = 3 * 2 * world().size();
  Buffer<float> a(ops, n), b(ops, n);
  EXPECT_THROW(lean.to_heads(a.data(), b.data(), Wire::operand), ShapeError);
  EXPECT_THROW(lean.to_sequence(a.data(), b.data(), Wire::exact), ShapeError);
  EXPECT_THROW(lean.to_sequence(a.data(), b.data(), 2), ShapeError);
  world().barrier();
}

// The model over that backend, the whole world one sequence-parallel group,
// against one process: qk, v, outputs and their gradients cross the wire in
// bf16 (heads, pairs and sort modes; kept layers), which the CPU's fp32
// attention does not round to itself, so the two differ by bf16 roundings
// of those values; a row sent to the wrong rank or slot would differ by the
// values themselves (sort mode reading its received rows half a row off:
// loss 1.7e-3, logits 2.5e-2). Measured at np 2 and 4: loss <= 1.9e-7
// relative, logits <= 2.5e-5 and summed gradients <= 1.5e-5 of the largest.
TEST(SequenceParallel, Bf16WireMatchesOneProcess) {
  const int sp = world().size();
  std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"heads", {"attention.kinds=[lsh, local]"}},
      {"heads, kept layers", {"attention.kinds=[lsh, local]", "model.kept_layers=2"}},
      {"pairs", {"attention.kinds=[lsh, local]", "model.n_heads=" + std::to_string(sp / 2),
                 "attention.n_hashes=4"}},
      {"sort", {"attention.kinds=[lsh, local]", "parallel.sp_mode=sort"}},
      {"sort, kept layers",
       {"attention.kinds=[local, lsh]", "parallel.sp_mode=sort", "attention.chunks_after=1",
        "attention.causal=false", "model.kept_layers=2"}}};
  for (auto& [what, sets] : cases) {
    sets.push_back("model.dropout=0.1");
    const Config cfg = make_config(sets);
    test::NarrowStashOps ops;
    ReformerModel<float> whole(cfg, ops);
    ReformerModel<float> part(cfg, ops, SequenceShard{sp, world().rank(), &world()});
    whole.init_params(7);
    part.init_params(7);
    const int64_t L = cfg.model.max_len, Ll = part.seq_len(), p0 = part.seq_offset();
    const auto [tokens, targets] = test::layout_sequence(L, cfg.model.vocab_size);
    const float scale = 1.0f / float(L - 1);
    whole.zero_grads();
    part.zero_grads();
    const LossStats a =
        whole.forward_backward(tokens.data(), targets.data(), 3, true, true, scale);
    const LossStats b =
        part.forward_backward(tokens.data() + p0, targets.data() + p0, 3, true, true, scale);
    double sums[2] = {b.loss_sum, double(b.count)};
    world().allreduce_sum(sums, 2);
    const double loss = std::fabs(sums[0] - a.loss_sum) / std::fabs(a.loss_sum);
    std::vector<float> g(part.grads(), part.grads() + part.num_params());
    world().allreduce_sum(g.data(), int64_t(g.size()));
    const double grads = test::relative_max_diff(g.data(), whole.grads(), whole.num_params());
    std::vector<float> la, lb;
    whole.forward_logits(tokens.data(), 3, &la);
    part.forward_logits(tokens.data() + p0, 3, &lb);
    const int64_t V = cfg.model.vocab_size;
    const double logits = test::relative_max_diff(lb.data(), la.data() + p0 * V, Ll * V);
    if (world().rank() == 0)
      std::printf("bf16 wire, %s at sp %d: loss %.2e, logits %.2e, gradients %.2e (relative)\n",
                  what.c_str(), sp, loss, logits, grads);
    EXPECT_LT(loss, 1e-5) << what;
    EXPECT_LT(logits, 3e-4) << what;
    EXPECT_LT(grads, 3e-4) << what;
    EXPECT_GT(logits, 0.0) << what << ": the wire did not round";
  }
  world().barrier();
}

// The model times its exchanges on a clock it is given (the bench's column
// "ms sp exchanges"): some time in heads and sort mode, none once taken,
// none without a clock.
TEST(SequenceParallel, ExchangesAreTimedOnTheGivenClock) {
  for (const char* mode : {"heads", "sort"}) {
    const Config cfg = make_config({"attention.kinds=[lsh, local]",
                                    std::string("parallel.sp_mode=") + mode});
    CpuOps<float> ops;
    ReformerModel<float> part(cfg, ops, SequenceShard{world().size(), world().rank(), &world()});
    part.init_params(7);
    const auto [tokens, targets] = test::layout_sequence(cfg.model.max_len, cfg.model.vocab_size);
    const int64_t p0 = part.seq_offset();
    WallClock clock;
    part.set_exchange_clock(&clock);
    part.forward_backward(tokens.data() + p0, targets.data() + p0, 3, true, true, 1.0f);
    EXPECT_GT(part.take_exchange_ms(), 0.0) << mode;
    EXPECT_EQ(part.take_exchange_ms(), 0.0) << mode;
    part.set_exchange_clock(nullptr);
    part.forward_backward(tokens.data() + p0, targets.data() + p0, 3, true, true, 1.0f);
    EXPECT_EQ(part.take_exchange_ms(), 0.0) << mode;
  }
  world().barrier();
}

// Kept layers under sequence parallelism: each rank keeps its shard's
// inputs and feed-forward state from the forward to the backward (the
// attention state only at sp 1), in the head exchange, pairs and sort modes,
// every layer or the top one; the gradients equal those of one process that
// keeps nothing and rebuilds every layer.
TEST(SequenceParallel, KeptLayersMatchOneProcess) {
  struct Case {
    const char* kinds;
    int heads, hashes, kept;
    const char* mode;
  };
  const int sp = world().size();
  for (const Case& c : {Case{"[lsh, local]", 4, 2, 2, "heads"}, Case{"[lsh]", 4, 2, 1, "heads"},
                        Case{"[lsh, local]", sp / 2, 2, 2, "heads"},
                        Case{"[lsh]", 4, 2, 2, "sort"}}) {
    const std::vector<std::string> sets = {
        std::string("attention.kinds=") + c.kinds, "model.dropout=0.1",
        "model.n_heads=" + std::to_string(c.heads),
        "attention.n_hashes=" + std::to_string(c.hashes),
        std::string("parallel.sp_mode=") + c.mode};
    std::vector<std::string> kept = sets;
    kept.push_back("model.kept_layers=" + std::to_string(c.kept));
    std::vector<std::string> none = sets;
    none.push_back("model.kept_layers=0");
    const Config ref = make_config(none);
    const std::string what = std::string(c.kinds) + " " + std::to_string(c.heads) +
                             " heads (" + c.mode + " mode" +
                             (c.heads < sp ? ", pairs" : "") + "), " + std::to_string(c.kept) +
                             " of 2 layers kept at sp " + std::to_string(sp);
    expect_model_matches_one_process(make_config(kept), what, &ref);
  }
}

// ------------------------------------------------------------------ training

class Layouts : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { dir_ = new std::string(shared_temp_dir()); }
  static void TearDownTestSuite() {
    world().barrier();
    if (world().rank() == 0 && !dir_->empty()) fs::remove_all(*dir_);
    delete dir_;
  }
  static inline std::string* dir_ = nullptr;
};

TEST_F(Layouts, TrainingMatchesOneProcess) {
  for (const char* kinds : {"[lsh]", "[lsh, local]"}) {
    const std::string k = std::string("attention.kinds=") + kinds;
    auto local = make_communicator(CommBackend::local);
    const RunResult ref = train(make_config({k, "checkpoint.dir=" + *dir_ + "/ref" +
                                              std::to_string(world().rank())}),
                          *local);
    for (const Layout& l : layouts()) {
      std::vector<std::string> sets = layout_sets(l, *dir_ + "/run");
      sets.push_back(k);
      expect_same_run(train(make_config(sets), world()), ref, text(l) + " " + kinds);
    }
  }
}

// All data-parallel with buckets of a few hundred elements that start two
// reported ranges late: every gradient is summed exactly once, in time for
// the clip (the same run as one process).
TEST_F(Layouts, SmallLaggedBucketsMatchOneProcess) {
  auto local = make_communicator(CommBackend::local);
  const RunResult ref = train(
      make_config({"checkpoint.dir=" + *dir_ + "/lag-ref" + std::to_string(world().rank())}),
      *local);
  for (const char* lag : {"0", "2"}) {
    std::vector<std::string> sets =
        layout_sets(Layout{world().size(), 1}, *dir_ + "/lag" + lag);
    sets.push_back("parallel.bucket_mb=0.001");
    sets.push_back(std::string("parallel.bucket_lag=") + lag);
    expect_same_run(train(make_config(sets), world()), ref, std::string("bucket_lag ") + lag);
  }
}

// 6 steps under the last layout (all sequence-parallel), then on to 10 under
// the first (all data-parallel): the same losses and parameters as 10 steps
// of one process.
TEST_F(Layouts, CheckpointResumesUnderAnotherLayout) {
  const std::vector<Layout> ls = layouts();
  const std::string dir = *dir_ + "/resume";
  std::vector<std::string> a = layout_sets(ls.back(), dir);
  a.push_back("training.steps=6");
  train(make_config(a), world());
  std::vector<std::string> b = layout_sets(ls.front(), dir);
  b.insert(b.end(), {"training.steps=10", "checkpoint.resume=auto"});
  const RunResult resumed = train(make_config(b), world());
  auto local = make_communicator(CommBackend::local);
  RunResult ref = train(make_config({"training.steps=10", "checkpoint.dir=" + *dir_ + "/straight" +
                                                        std::to_string(world().rank())}),
                  *local);
  ref.losses.erase(ref.losses.begin(), ref.losses.begin() + 6);
  expect_same_run(resumed, ref, text(ls.back()) + " -> " + text(ls.front()));
}

// 6 steps with the world as one sequence-parallel group (`first` added to
// the config), then on to 10 steps all data-parallel: the same losses and
// parameters as 10 steps of one process with `model`.
void expect_resumes_under_data_parallel(const std::string& dir,
                                        const std::vector<std::string>& model,
                                        const std::vector<std::string>& first,
                                        const std::string& what) {
  const int n = world().size();
  std::vector<std::string> a = layout_sets(Layout{1, n}, dir);
  a.insert(a.end(), model.begin(), model.end());
  a.insert(a.end(), first.begin(), first.end());
  a.push_back("training.steps=6");
  train(make_config(a), world());
  std::vector<std::string> b = layout_sets(Layout{n, 1}, dir);
  b.insert(b.end(), model.begin(), model.end());
  b.insert(b.end(), {"training.steps=10", "checkpoint.resume=auto"});
  const RunResult resumed = train(make_config(b), world());
  auto local = make_communicator(CommBackend::local);
  std::vector<std::string> c = model;
  c.insert(c.end(), {"training.steps=10", "checkpoint.dir=" + dir + "_straight" +
                                              std::to_string(world().rank())});
  RunResult ref = train(make_config(c), *local);
  ref.losses.erase(ref.losses.begin(), ref.losses.begin() + 6);
  expect_same_run(resumed, ref, what + " dp 1 x sp " + std::to_string(n) + " -> dp " +
                                    std::to_string(n) + " x sp 1");
}

// Pairs mode: fewer heads than ranks, each rank one head's share of the hash rounds.
TEST_F(Layouts, PairsCheckpointResumesUnderDataParallel) {
  expect_resumes_under_data_parallel(
      *dir_ + "/pairs",
      {"model.n_heads=" + std::to_string(world().size() / 2), "attention.n_hashes=2",
       "attention.kinds=[lsh, local]"},
      {}, "pairs");
}

// Sort mode: one head (no head cap) and three hash rounds over the whole world.
TEST_F(Layouts, SortModeTrainsAndResumesUnderDataParallel) {
  expect_resumes_under_data_parallel(
      *dir_ + "/sort", {"model.n_heads=1", "attention.n_hashes=3", "attention.kinds=[lsh, local]"},
      {"parallel.sp_mode=sort"}, "sort");
}

}  // namespace

int main(int argc, char** argv) {
  // One OpenMP thread per rank: the ranks share 2 cores in CI.
  setenv("OMP_NUM_THREADS", "1", 1);
  omp_set_num_threads(1);
  set_log_sink([](const std::string&) {});
  return reformer::test::mpi_gtest_main(argc, argv, [] {
    auto comm = make_communicator(CommBackend::mpi);
    g_world = comm.get();
    const int status = RUN_ALL_TESTS();
    g_world = nullptr;
    return status;
  });
}
