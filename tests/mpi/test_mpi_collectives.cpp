// Every call of the MPI communicator, the local one and the process grid, run
// under mpirun -np 2 and 4:
//  - collectives on inputs whose results are exact (tests/common/
//    collective_checks.h), at odd sizes, and again with max_chunk shrunk so
//    that every call goes in pieces (including derived datatypes for blocks
//    and point-to-point messages for alltoallv);
//  - alltoallv with uneven and zero counts, send/recv around a ring, split
//    into groups, async allreduce;
//  - ProcessGrid for every layout of the world size, its group membership,
//    and the ConfigError of a layout that does not fit.
//
// Every collective in a test is made by every rank in the same order; checks
// are EXPECT_* (never an ASSERT_* that could make one rank skip a collective).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/mpi_communicator.h"
#include "distributed/process_grid.h"
#include "kernels/errors.h"
#include "tests/common/collective_checks.h"
#include "tests/common/mpi_gtest_main.h"

using namespace reformer;
using namespace reformer::test;

namespace {

MpiCommunicator* g_world = nullptr;  // made by main() around RUN_ALL_TESTS
MpiCommunicator& world() { return *g_world; }

const Memory kHost = host_memory();
const int64_t kSizes[] = {0, 1, 2, 97, 1025, 65536 + 3};

// All checks on one communicator; `what` names it in failures.
// Sizes above `max_n` are left out (a tiny max_chunk makes them slow).
void check_all(Communicator& c, const std::string& what, int64_t max_n = kSizes[5]) {
  for (int64_t n : kSizes) {
    if (n > max_n) continue;
    SCOPED_TRACE(what + ", n = " + std::to_string(n));
    EXPECT_EQ(allreduce_wrong<float>(c, kHost, n), 0);
    EXPECT_EQ(allreduce_wrong<double>(c, kHost, n), 0);
    EXPECT_EQ(allreduce_async_wrong(c, kHost, n), 0);
    EXPECT_EQ(broadcast_wrong(c, kHost, n, 0), 0);
    EXPECT_EQ(broadcast_wrong(c, kHost, n, c.size() - 1), 0);
    EXPECT_EQ(allgather_wrong(c, kHost, n), 0);
    EXPECT_EQ(reduce_scatter_wrong(c, kHost, n), 0);
    EXPECT_EQ(alltoall_wrong(c, kHost, n), 0);
    EXPECT_EQ(alltoallv_wrong(c, kHost, n), 0);
    EXPECT_EQ(alltoallv_rows_wrong(c, kHost, n), 0);
    if (c.size() > 1) EXPECT_EQ(ring_wrong(c, kHost, n), 0);
  }
  EXPECT_EQ(split_wrong(c, kHost), 0) << what;
  c.barrier();
}

TEST(MpiCollectives, ExactResults) { check_all(world(), "world"); }

// max_chunk 97 puts each call of the sizes above into many pieces, with a
// short last piece and an exact multiple (97); max_chunk 7 (coprime with
// every size) takes the smaller sizes into pieces of a few bytes.
TEST(MpiCollectives, ExactResultsInPieces) {
  for (int64_t chunk : {int64_t(97), int64_t(7)}) {
    MpiCommunicator small(CommOptions{.max_chunk = chunk});
    check_all(small, "max_chunk " + std::to_string(chunk), chunk == 7 ? 1025 : kSizes[5]);
    EXPECT_EQ(alltoallv_wrong(small, kHost, 250), 0) << "max_chunk " << chunk;
  }
}

TEST(MpiCollectives, AsyncWorkWaitsOnceAndOnDestruction) {
  std::vector<float> x = contribution<float>(world().rank(), 1025);
  std::unique_ptr<Work> w = world().allreduce_sum_async(x.data(), 1025);
  w->wait();
  w->wait();  // a second wait is a no-op
  EXPECT_EQ(count_wrong_sum(x, world().size()), 0);
}

TEST(MpiCollectives, SplitGroupsAreIndependent) {
  // Groups of consecutive pairs, then a collective in each group and in the
  // world interleaved: each stays in its own communicator.
  std::unique_ptr<Communicator> pair = world().split(world().rank() / 2, world().rank());
  EXPECT_EQ(pair->size(), std::min(2, world().size() - world().rank() / 2 * 2));
  EXPECT_EQ(pair->rank(), world().rank() % 2);
  EXPECT_STREQ(pair->backend(), "mpi");
  EXPECT_EQ(allreduce_wrong<float>(*pair, kHost, 97), 0);
  EXPECT_EQ(allreduce_wrong<float>(world(), kHost, 97), 0);
  EXPECT_EQ(alltoall_wrong(*pair, kHost, 33), 0);
  std::unique_ptr<Communicator> nested = pair->split(0, 0);
  EXPECT_EQ(nested->size(), pair->size());
  EXPECT_EQ(split_wrong(*nested, kHost), 0);
}

TEST(MpiCollectives, BadArgumentsThrowCommError) {
  float x = 1;
  EXPECT_THROW(world().allgather(&x, &x, -1), CommError);
  EXPECT_THROW(world().send(&x, 4, world().rank()), CommError);  // to itself
  EXPECT_THROW(world().recv(&x, 4, world().size()), CommError);
  EXPECT_THROW(world().split(-1, 0), CommError);
  std::vector<int64_t> counts(static_cast<size_t>(world().size()), 0), offs(counts);
  counts[0] = -1;
  EXPECT_THROW(world().alltoallv(&x, counts.data(), offs.data(), &x, offs.data(), offs.data()),
               CommError);
  world().barrier();
}

TEST(LocalCommunicator, CopiesAndIdentities) {
  LocalCommunicator local;
  EXPECT_EQ(local.rank(), 0);
  EXPECT_EQ(local.size(), 1);
  for (int64_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    EXPECT_EQ(allreduce_wrong<float>(local, kHost, n), 0);
    EXPECT_EQ(allreduce_async_wrong(local, kHost, n), 0);
    EXPECT_EQ(broadcast_wrong(local, kHost, n, 0), 0);
    EXPECT_EQ(allgather_wrong(local, kHost, n), 0);
    EXPECT_EQ(reduce_scatter_wrong(local, kHost, n), 0);
    EXPECT_EQ(alltoall_wrong(local, kHost, n), 0);
    EXPECT_EQ(alltoallv_wrong(local, kHost, n), 0);
    EXPECT_EQ(alltoallv_rows_wrong(local, kHost, n), 0);
  }
  EXPECT_EQ(split_wrong(local, kHost), 0);
  float x = 0;
  EXPECT_THROW(local.send(&x, 4, 0), CommError);
  EXPECT_THROW(local.recv(&x, 4, 0), CommError);
  EXPECT_STREQ(make_communicator(CommBackend::local)->backend(), "local");
}

// ------------------------------------------------------------------ process grid

// Every rank's coordinates and both of its groups, checked by gathering the
// world ranks of each group's members.
void check_grid(ProcessGrid& g, int dp, int sp) {
  const int me = world().rank();
  SCOPED_TRACE("dp " + std::to_string(dp) + " x sp " + std::to_string(sp));
  EXPECT_EQ(g.dp(), dp);
  EXPECT_EQ(g.sp(), sp);
  EXPECT_EQ(g.world_rank(), me);
  EXPECT_EQ(&g.world(), &world());
  EXPECT_EQ(g.dp_rank(), me / sp);
  EXPECT_EQ(g.sp_rank(), me % sp);
  EXPECT_EQ(g.sp_group().size(), sp);
  EXPECT_EQ(g.dp_group().size(), dp);
  EXPECT_EQ(g.sp_group().rank(), g.sp_rank());
  EXPECT_EQ(g.dp_group().rank(), g.dp_rank());
  std::vector<int> sp_members(static_cast<size_t>(sp), -1), dp_members(static_cast<size_t>(dp), -1);
  g.sp_group().allgather(&me, sp_members.data(), sizeof me);
  g.dp_group().allgather(&me, dp_members.data(), sizeof me);
  for (int k = 0; k < sp; ++k) EXPECT_EQ(sp_members[size_t(k)], g.dp_rank() * sp + k) << "sp member " << k;
  for (int k = 0; k < dp; ++k) EXPECT_EQ(dp_members[size_t(k)], k * sp + g.sp_rank()) << "dp member " << k;
}

TEST(ProcessGrid, EveryLayoutOfTheWorld) {
  const int n = world().size();
  for (int sp = 1; sp <= n; ++sp) {
    if (n % sp != 0) continue;
    ProcessGrid explicit_dp(world(), n / sp, sp);
    check_grid(explicit_dp, n / sp, sp);
    ProcessGrid auto_dp(world(), /*dp auto*/ 0, sp);
    check_grid(auto_dp, n / sp, sp);
  }
}

TEST(ProcessGrid, LayoutsThatDoNotFitSayWhatWould) {
  const int n = world().size();
  const int sp = n % 2 == 0 ? 2 : 1;
  try {
    ProcessGrid g(world(), n + 1, sp);
    ADD_FAILURE() << "dp " << n + 1 << " x sp " << sp << " was accepted";
  } catch (const ConfigError& e) {
    const std::string m = e.what(), s = std::to_string(sp);
    EXPECT_NE(m.find("parallel.dp " + std::to_string(n + 1) + " x parallel.sp " + s + " = " +
                     std::to_string(sp * (n + 1)) + " != " + std::to_string(n) + " processes"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("with sp " + s + " use dp " + std::to_string(n / sp) + " (or dp: auto)"),
              std::string::npos)
        << m;
  }
  EXPECT_THROW(ProcessGrid(world(), 0, n + 1), ConfigError);  // sp does not divide the world
  EXPECT_THROW(ProcessGrid(world(), 1, 0), ConfigError);
  EXPECT_THROW(ProcessGrid(world(), -1, 1), ConfigError);
  EXPECT_THROW(ProcessGrid(world(), n, n), ConfigError);
  world().barrier();
}

TEST(ProcessGrid, OneProcess) {
  LocalCommunicator local;
  ProcessGrid g(local, 0, 1);
  EXPECT_EQ(g.dp(), 1);
  EXPECT_EQ(g.sp_group().size(), 1);
  EXPECT_EQ(g.dp_group().size(), 1);
  EXPECT_THROW(ProcessGrid(local, 2, 1), ConfigError);
}

}  // namespace

int main(int argc, char** argv) {
  return mpi_gtest_main(argc, argv, [] {
    MpiCommunicator comm;
    g_world = &comm;
    const int status = RUN_ALL_TESTS();
    g_world = nullptr;
    return status;
  });
}
