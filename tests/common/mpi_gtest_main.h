// main() of the suites that run as whole programs under mpirun: MPI is
// initialised once around all tests (MPI_THREAD_MULTIPLE, so the
// communicator watchdog may end the job from its own thread), only rank 0
// prints gtest's report (other ranks print their failures prefixed with the
// rank), and every rank exits with the same status.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <functional>

namespace reformer::test {

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

// Runs `run_all` (which makes the suite's communicators and returns
// RUN_ALL_TESTS()) between MPI_Init_thread and MPI_Finalize; returns the
// status every rank exits with: failed anywhere is failed everywhere.
inline int mpi_gtest_main(int argc, char** argv, const std::function<int()>& run_all) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // A rank left waiting in a collective (a bug) ends the job instead of the
  // CTest timeout: mpirun aborts every rank when one is killed.
  alarm(300);
  ::testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int failed = run_all() != 0 ? 1 : 0;
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any && !failed) std::fprintf(stderr, "[rank 0] some other rank failed (see above)\n");
  MPI_Finalize();
  return any;
}

}  // namespace reformer::test
