// main() for the MPI suites (tests/mpi): MPI is initialised once around all
// tests, only rank 0 prints gtest's report (other ranks print their failures
// prefixed with the rank), and every rank exits with the same status.
// A suite defines REFORMER_MPI_TEST_SETUP(world) before including this, to
// keep the world communicator the tests use, or leaves it undefined.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>
#include <omp.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "framework/logging.h"

namespace reformer_test {

// Prints failures of a rank other than 0 (whose report gtest prints in full)
// as "[rank r] file:line: message".
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.message());
  }
  void OnTestEnd(const ::testing::TestInfo& t) override {
    if (t.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, t.test_suite_name(), t.name());
  }

 private:
  int rank_;
};

// Runs every test with MPI initialised; `run` wraps RUN_ALL_TESTS (so a suite
// can hold a communicator around it) and returns its status.
template <class Run>
int mpi_test_main(int argc, char** argv, Run run) {
  // One OpenMP thread per rank: the ranks share 2 cores in CI. The variable
  // covers threads created later; omp_set_num_threads the runtime, which may
  // have read its environment already when the library was loaded.
  setenv("OMP_NUM_THREADS", "1", 1);
  omp_set_num_threads(1);
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // A rank left waiting in a collective (a bug) ends the job instead of the
  // CTest timeout: mpirun aborts every rank when one is killed.
  alarm(300);
  reformer::set_log_sink([](const std::string&) {});
  ::testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int failed = run() != 0 ? 1 : 0;
  // Every rank returns the same status: failed anywhere is failed everywhere.
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any && !failed) std::fprintf(stderr, "[rank 0] some other rank failed (see above)\n");
  MPI_Finalize();
  return any;
}

}  // namespace reformer_test
