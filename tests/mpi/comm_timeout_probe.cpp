// A job with a frozen rank: rank 1 sleeps 30 s before a collective that the
// other ranks wait in with a 2 s timeout. The watchdog must end the whole job
// (status 1) with a message naming the waiting rank, the operation and rank 1
// as the one that did not arrive, long before rank 1 wakes. Run by CTest through tests/mpi/expect_job_failure.sh.
//
// usage: comm_timeout_probe barrier|allreduce|async
#include <unistd.h>

#include <cstdio>
#include <string>

#include "distributed/mpi_communicator.h"

int main(int argc, char** argv) {
  using namespace reformer;
  const std::string op = argc > 1 ? argv[1] : "barrier";
  MpiCommunicator comm(CommOptions{.timeout_s = 2});
  if (comm.rank() == 1) sleep(30);
  float x[3] = {1, 2, 3};
  if (op == "barrier") {
    comm.barrier();
  } else if (op == "allreduce") {
    comm.allreduce_sum(x, 3);
  } else {
    comm.allreduce_sum_async(x, 3)->wait();
  }
  std::printf("rank %d: the collective completed: the watchdog did not end the job\n", comm.rank());
  return 0;
}
