// The MPI communicator and data parallelism, run under mpirun -np 2 and 4:
//  - collectives with exactly representable results (small integers in fp32 and
//    fp64), counting wrong elements as nccl-tests does, at odd sizes and with
//    the buffer split into many MPI calls;
//  - a dp = world-size training run gives the losses and parameters of the same
//    run in one process; its checkpoint resumes in one process; evaluation
//    under dp equals evaluation in one process.
//
// The program has its own main() (tests/common/mpi_gtest_main.h).
//
// Every collective in a test is made by every rank in the same order; checks
// are EXPECT_* (never an ASSERT_* that could make one rank skip a collective
// the others wait in). All ranks run on one host and share /tmp.
#include <gtest/gtest.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/mpi_communicator.h"
#include "framework/checkpoint.h"
#include "framework/config.h"
#include "kernels/errors.h"
#include "framework/logging.h"
#include "framework/trainer.h"
#include "tests/common/collective_checks.h"
#include "tests/common/layout_testing.h"
#include "tests/common/mpi_gtest_main.h"

namespace fs = std::filesystem;
using namespace reformer;

namespace {

MpiCommunicator* g_comm = nullptr;  // made by main() around RUN_ALL_TESTS

MpiCommunicator& world() { return *g_comm; }

// ------------------------------------------------------------------ collectives

// The exact checks of tests/common/collective_checks.h on host buffers.
const test::Memory kHost = test::host_memory();

template <class T>
int64_t allreduce_wrong(Communicator& comm, int64_t n) {
  return test::allreduce_wrong<T>(comm, kHost, n);
}

int64_t broadcast_wrong(Communicator& comm, int64_t bytes, int root) {
  return test::broadcast_wrong(comm, kHost, bytes, root);
}

const int64_t kSizes[] = {1, 2, 97, 1025, 65536 + 3};

TEST(MpiCommunicator, MatchesWorld) {
  int r = -1, p = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  EXPECT_EQ(world().rank(), r);
  EXPECT_EQ(world().size(), p);
  EXPECT_STREQ(world().backend(), "mpi");
  int cmp = MPI_UNEQUAL;
  MPI_Comm_compare(world().comm(), MPI_COMM_WORLD, &cmp);
  EXPECT_EQ(cmp, MPI_CONGRUENT) << "a duplicate of MPI_COMM_WORLD, not the world itself";
}

TEST(MpiCommunicator, MakeCommunicatorMpi) {
  // MPI is already initialised: the new communicator must not finalize it.
  {
    auto c = make_communicator(CommBackend::mpi);
    EXPECT_STREQ(c->backend(), "mpi");
    EXPECT_EQ(c->rank(), world().rank());
    EXPECT_EQ(c->size(), world().size());
    EXPECT_EQ(allreduce_wrong<float>(*c, 1025), 0);
    c->barrier();
  }
  int finalized = 1;
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0);
}

#ifndef REFORMER_HAVE_NCCL
TEST(MpiCommunicator, NcclIsAnErrorNamingWhatIsMissing) {
  try {
    make_communicator(CommBackend::nccl);
    ADD_FAILURE() << "make_communicator(CommBackend::nccl) did not throw";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("NCCL"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(parse_comm_backend("gloo").has_value());
}
#endif

TEST(MpiCommunicator, AllreduceFloatExact) {
  for (int64_t n : kSizes) EXPECT_EQ(allreduce_wrong<float>(world(), n), 0) << "n = " << n;
}

TEST(MpiCommunicator, AllreduceDoubleExact) {
  for (int64_t n : kSizes) EXPECT_EQ(allreduce_wrong<double>(world(), n), 0) << "n = " << n;
}

TEST(MpiCommunicator, ZeroLengthIsANoOp) {
  world().allreduce_sum(static_cast<float*>(nullptr), 0);
  world().allreduce_sum(static_cast<double*>(nullptr), 0);
  world().broadcast(nullptr, 0, 0);
  EXPECT_EQ(allreduce_wrong<float>(world(), 5), 0);  // still in step afterwards
}

TEST(MpiCommunicator, BroadcastFromFirstAndLastRank) {
  for (int root : {0, world().size() - 1})
    for (int64_t n : kSizes) EXPECT_EQ(broadcast_wrong(world(), n, root), 0) << "root " << root << ", n " << n;
}

// Buffers longer than one MPI call allows (INT_MAX) go in pieces; a small
// max_chunk exercises the same code with sizes a test can afford, including a
// last piece shorter than the others and an exact multiple.
TEST(MpiCommunicator, LargeBuffersGoInPieces) {
  MpiCommunicator small(CommOptions{.max_chunk = 100});
  for (int64_t n : {int64_t(99), int64_t(100), int64_t(1025), int64_t(2000)}) {
    EXPECT_EQ(allreduce_wrong<float>(small, n), 0) << "n = " << n;
    EXPECT_EQ(allreduce_wrong<double>(small, n), 0) << "n = " << n;
    EXPECT_EQ(broadcast_wrong(small, n, small.size() - 1), 0) << "n = " << n;
  }
}

TEST(MpiCommunicator, BadArgumentsThrowCommError) {
  float x = 1;
  EXPECT_THROW(world().allreduce_sum(&x, -1), CommError);
  EXPECT_THROW(world().broadcast(&x, 4, world().size()), CommError);
  EXPECT_THROW(world().broadcast(&x, 4, -1), CommError);
}

TEST(MpiCommunicator, MpiCheckNamesCallRankFileAndLine) {
  try {
    MPI_CHECK(MPI_ERR_ARG);
    ADD_FAILURE() << "MPI_CHECK did not throw";
  } catch (const CommError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("MPI_ERR_ARG failed"), std::string::npos) << m;
    EXPECT_NE(m.find("(rank " + std::to_string(world().rank()) + ")"), std::string::npos) << m;
    EXPECT_NE(m.find("test_mpi_dp.cpp:"), std::string::npos) << m;
  }
  // An error returned by a real call on the communicator's handle (here an
  // invalid count, caught by MPI's argument checks on every rank alike).
  float x = 0;
  EXPECT_THROW(MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &x, -1, MPI_FLOAT, MPI_SUM, world().comm())),
               CommError);
}

// ------------------------------------------------------------------ data parallel


// configs/tiny.yaml with a batch that 2 and 4 ranks divide, the rsqrt schedule
// (whose learning rate does not depend on training.steps, so a 6-step run
// resumed to 10 steps sees the rates of a 10-step run), and no logging.
const char* kTinyYaml = R"(
model:
  vocab_size: 16
  d_model: 32
  n_heads: 2
  d_ff: 64
  n_layers: 2
  max_len: 32
attention:
  kinds: [lsh]
  bucket_size: 8
  n_hashes: 2
optimizer:
  name: adamw
  lr: 3.0e-3
  warmup_steps: 5
  schedule: rsqrt
training:
  steps: 6
  batch_size: 4
  device: cpu
  log_every: 100
  eval_every: 0
  eval_batches: 2
data:
  kind: duplication
checkpoint:
  resume: none
)";

Config tiny(int dp, const std::string& backend, const std::string& ckpt_dir,
            std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = {"parallel.dp=" + std::to_string(dp), "parallel.backend=" + backend,
                                   "checkpoint.dir=" + ckpt_dir};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return parse_config(kTinyYaml, "<test_mpi_dp tiny>", sets);
}

std::vector<float> flat_params(const Trainer& t) {
  std::vector<float> out;
  for (const CheckpointTensor& p : t.snapshot().model) out.insert(out.end(), p.data.begin(), p.data.end());
  return out;
}

// |a - b| <= atol + rtol * |b|
bool within(double a, double b, double rtol, double atol = 0) {
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

// Loss tolerance: the dp run sums fp32 gradients over ranks in another order
// than one process sums them over samples, so parameters drift apart by a few
// fp32 ulps per step; the mean loss then differs by ~1e-7 relative.
constexpr double kLossRtol = 1e-6;
// Parameters after 6 AdamW steps: the same ulp-level drift, scaled by Adam's
// normalisation for weights whose gradient sum nearly cancels (measured: at
// most 6e-8 absolute at -np 2 and 4; loss drift 5e-9 relative).
constexpr double kParamAtol = 1e-6, kParamRtol = 1e-5;

// One dp = world-size run and its one-process reference, shared by the tests
// of the suite (training is the expensive part).
class DataParallel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    MpiCommunicator& comm = world();
    dir_ = new std::string(test::shared_temp_dir(comm, "reformer_mpi_dp"));
    dp_ = new Run;
    ref_ = new Run;
    {
      Trainer t(tiny(comm.size(), "mpi", *dir_ + "/dp"), comm, "");
      const TrainResult r = t.train();  // writes ckpt-00000006.h5 on rank 0, then a barrier
      *dp_ = Run{r.losses, r.eval, flat_params(t)};
    }
    {
      LocalCommunicator local;
      Trainer t(tiny(1, "local", *dir_ + "/ref-rank" + std::to_string(comm.rank())), local, "");
      const TrainResult r = t.train();
      *ref_ = Run{r.losses, r.eval, flat_params(t)};
    }
  }
  static void TearDownTestSuite() {
    world().barrier();
    if (world().rank() == 0 && !dir_->empty()) fs::remove_all(*dir_);
    delete dir_;
    delete dp_;
    delete ref_;
  }

  struct Run {
    std::vector<double> losses;  // per step
    EvalResult eval;             // at the end of training
    std::vector<float> params;   // every parameter, in table order
  };
  static inline std::string* dir_ = nullptr;
  static inline Run* dp_ = nullptr;
  static inline Run* ref_ = nullptr;
};

TEST_F(DataParallel, LossesAndParametersMatchOneProcess) {
  ASSERT_EQ(dp_->losses.size(), 6u);
  ASSERT_EQ(ref_->losses.size(), 6u);
  for (size_t s = 0; s < 6; ++s)
    EXPECT_PRED4(within, dp_->losses[s], ref_->losses[s], kLossRtol, 0.0) << "step " << s + 1;
  ASSERT_EQ(dp_->params.size(), ref_->params.size());
  int64_t wrong = 0;
  double max_diff = 0;
  for (size_t i = 0; i < dp_->params.size(); ++i) {
    wrong += !within(dp_->params[i], ref_->params[i], kParamRtol, kParamAtol);
    max_diff = std::max(max_diff, double(std::fabs(dp_->params[i] - ref_->params[i])));
  }
  EXPECT_EQ(wrong, 0) << "of " << dp_->params.size() << " parameters; largest difference " << max_diff;
  // The parameters are those of the run, not a copy of rank 0's: every rank
  // holds the same values bit for bit (they all applied the same summed gradient).
  std::vector<float> p0 = dp_->params;
  world().broadcast(p0.data(), int64_t(p0.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(p0.data(), dp_->params.data(), p0.size() * sizeof(float)), 0);
}

TEST_F(DataParallel, EvalMatchesOneProcess) {
  // After training: the models differ by the ulp-level drift above.
  EXPECT_EQ(dp_->eval.tokens, ref_->eval.tokens);
  EXPECT_PRED4(within, dp_->eval.loss, ref_->eval.loss, kLossRtol, 0.0);
  // Same parameters (fresh from the seed): only the fp64 sum order differs.
  // 3 batches of 4 sequences, split over the ranks.
  MpiCommunicator& comm = world();
  LocalCommunicator local;
  Trainer a(tiny(comm.size(), "mpi", *dir_ + "/unused"), comm, "");
  Trainer b(tiny(1, "local", *dir_ + "/unused"), local, "");
  for (Split split : {Split::valid, Split::test}) {
    const EvalResult ea = a.evaluate(split, 3), eb = b.evaluate(split, 3);
    EXPECT_EQ(ea.tokens, eb.tokens);
    EXPECT_GT(ea.tokens, 0);
    EXPECT_PRED4(within, ea.loss, eb.loss, 1e-12, 0.0);
    EXPECT_PRED4(within, ea.bpc, eb.bpc, 1e-12, 0.0);
    EXPECT_EQ(ea.accuracy, eb.accuracy);  // counts of exact predictions: integers
  }
}

TEST_F(DataParallel, CheckpointResumesInOneProcess) {
  MpiCommunicator& comm = world();
  const std::string ckpt = checkpoint_path(*dir_ + "/dp", 6);
  if (comm.rank() == 0) {
    LocalCommunicator local;
    Trainer resumed(tiny(1, "local", *dir_ + "/resumed",
                         {"training.steps=10", "checkpoint.resume=" + ckpt}),
                    local, "");
    EXPECT_EQ(resumed.resume(), ckpt);
    EXPECT_EQ(resumed.step(), 6);
    const TrainResult r = resumed.train();
    Trainer straight(tiny(1, "local", *dir_ + "/straight", {"training.steps=10"}), local, "");
    const TrainResult u = straight.train();
    EXPECT_EQ(r.losses.size(), 4u);
    EXPECT_EQ(u.losses.size(), 10u);
    for (size_t k = 0; k < 4 && k < r.losses.size() && u.losses.size() == 10; ++k)
      EXPECT_PRED4(within, r.losses[k], u.losses[6 + k], kLossRtol, 0.0) << "step " << 7 + k;
  }
  comm.barrier();
}

}  // namespace

int main(int argc, char** argv) {
  // One OpenMP thread per rank: the ranks share 2 cores in CI. The variable
  // covers threads created later; omp_set_num_threads the runtime, which may
  // have read its environment already when the library was loaded.
  setenv("OMP_NUM_THREADS", "1", 1);
  omp_set_num_threads(1);
  set_log_sink([](const std::string&) {});
  return reformer::test::mpi_gtest_main(argc, argv, [] {
    MpiCommunicator comm;
    g_comm = &comm;
    const int status = RUN_ALL_TESTS();
    g_comm = nullptr;
    return status;
  });
}
