// The NCCL communicator over device buffers, run under mpirun -np 2 (one GPU
// per rank): the exact checks of tests/common/collective_checks.h on every
// call, split groups, the process grid, the ordering of collectives after
// the compute stream, and the head exchange's bf16 wire
// (tests/common/wire_checks.h). Skips itself where fewer GPUs than ranks are
// visible (every rank decides alike), so it passes on CPU machines.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "distributed/nccl_communicator.h"
#include "distributed/process_grid.h"
#include "framework/device.h"
#include "kernels/errors.h"
#include "tests/common/collective_checks.h"
#include "tests/common/cuda_memory.h"
#include "tests/common/mpi_gtest_main.h"
#include "tests/common/wire_checks.h"

using namespace reformer;
using namespace reformer::test;

namespace {

NcclCommunicator* g_nccl = nullptr;  // null: skipped (fewer GPUs than ranks)
std::string g_skip_reason;
cudaStream_t g_stream = nullptr;     // the compute stream of the tests

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!g_nccl) GTEST_SKIP() << g_skip_reason;
  }
  NcclCommunicator& comm() { return *g_nccl; }
  const Memory mem_ = device_memory(&g_stream);
};

const int64_t kSizes[] = {0, 1, 2, 97, 1025, 65536 + 3, (int64_t(1) << 20) + 7};

TEST_F(Nccl, DescribesItsDevice) {
  EXPECT_TRUE(comm().device_buffers());
  EXPECT_STREQ(comm().backend(), "nccl");
  EXPECT_STREQ(comm().host().backend(), "mpi");
  EXPECT_EQ(comm().host().rank(), comm().rank());
  const std::string d = comm().description();
  EXPECT_EQ(d.find("rank " + std::to_string(comm().rank()) + " on host "), 0u) << d;
  EXPECT_NE(d.find(" uses GPU " + std::to_string(comm().local_device()) + " ("), std::string::npos) << d;
  int current = -1;
  cudaGetDevice(&current);
  EXPECT_EQ(current, comm().local_device());
}

TEST_F(Nccl, ExactResults) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    EXPECT_EQ(allreduce_wrong<float>(comm(), mem_, n), 0);
    EXPECT_EQ(allreduce_wrong<double>(comm(), mem_, n), 0);
    EXPECT_EQ(allreduce_async_wrong(comm(), mem_, n), 0);
    EXPECT_EQ(broadcast_wrong(comm(), mem_, n, 0), 0);
    EXPECT_EQ(broadcast_wrong(comm(), mem_, n, comm().size() - 1), 0);
    EXPECT_EQ(allgather_wrong(comm(), mem_, n), 0);
    EXPECT_EQ(reduce_scatter_wrong(comm(), mem_, n), 0);
    EXPECT_EQ(alltoall_wrong(comm(), mem_, n), 0);
    EXPECT_EQ(alltoallv_wrong(comm(), mem_, n), 0);
    EXPECT_EQ(alltoallv_rows_wrong(comm(), mem_, n), 0);
    EXPECT_EQ(ring_wrong(comm(), mem_, n), 0);
  }
  comm().barrier();
}

TEST_F(Nccl, SplitAndProcessGrid) {
  EXPECT_EQ(split_wrong(comm(), mem_), 0);
  const int n = comm().size();
  for (int sp = 1; sp <= n; ++sp) {
    if (n % sp != 0) continue;
    ProcessGrid g(comm(), 0, sp);
    EXPECT_EQ(g.sp_group().size(), sp);
    EXPECT_EQ(g.dp_group().size(), n / sp);
    EXPECT_EQ(g.sp_group().rank(), comm().rank() % sp);
    EXPECT_TRUE(g.sp_group().device_buffers());
    EXPECT_EQ(allreduce_wrong<float>(g.sp_group(), mem_, 1025), 0) << "sp " << sp;
    EXPECT_EQ(alltoall_wrong(g.sp_group(), mem_, 97), 0) << "sp " << sp;
    EXPECT_EQ(allreduce_wrong<float>(g.dp_group(), mem_, 1025), 0) << "sp " << sp;
  }
}

// Values written on the compute stream just before the call are the ones
// reduced, and work queued after it sees the result, without a host wait in
// between.
TEST_F(Nccl, OrderedAfterAndBeforeTheComputeStream) {
  const int64_t n = 1 << 22;
  const std::vector<float> ones(size_t(n), 1.f);
  test::Buffer<float> x(mem_, std::vector<float>(size_t(n), 0.f)), y(mem_, n);
  cudaMemcpyAsync(x.get(), ones.data(), size_t(n) * sizeof(float), cudaMemcpyHostToDevice, g_stream);
  std::unique_ptr<Work> w = comm().allreduce_sum_async(x.get(), n);
  w->wait();
  cudaMemcpyAsync(y.get(), x.get(), size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, g_stream);
  int64_t wrong = 0;
  for (float v : y.read()) wrong += v != float(comm().size());
  EXPECT_EQ(wrong, 0);
}

// The head exchange on the CUDA ops: operands arrive as the exact
// exchange's values rounded to bf16, bit for bit, both ways; an odd block
// travels exact.
TEST_F(Nccl, HeadExchangeRoundsOperandsOnly) {
  std::unique_ptr<Ops<float>> ops = make_ops(DeviceKind::cuda);
  comm().set_compute_stream(ops->stream());
  EXPECT_EQ(operand_wire_wrong(*ops, comm(), 37, 24, true), 0);
  EXPECT_EQ(operand_wire_wrong(*ops, comm(), 37, 5, false), 0);
  ops->synchronize();
  comm().set_compute_stream(g_stream);
  comm().barrier();
}

TEST_F(Nccl, BadArgumentsThrowCommError) {
  EXPECT_THROW(comm().send(nullptr, 4, comm().rank()), CommError);
  EXPECT_THROW(comm().broadcast(nullptr, 4, comm().size()), CommError);
  EXPECT_THROW(comm().allreduce_sum(static_cast<float*>(nullptr), -1), CommError);
  comm().barrier();
}

}  // namespace

int main(int argc, char** argv) {
  return mpi_gtest_main(argc, argv, [] {
    int size = 1, devices = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
    int enough = devices >= size ? 1 : 0, all = 0;
    MPI_Allreduce(&enough, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all) {
      g_skip_reason = std::to_string(size) + " ranks need as many GPUs; this rank sees " +
                      std::to_string(devices);
      return RUN_ALL_TESTS();
    }
    NcclCommunicator comm(CommOptions{.timeout_s = 120});
    std::printf("%s\n", comm.description().c_str());
    cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
    comm.set_compute_stream(g_stream);
    g_nccl = &comm;
    const int status = RUN_ALL_TESTS();
    g_nccl = nullptr;
    cudaStreamSynchronize(g_stream);
    cudaStreamDestroy(g_stream);
    return status;
  });
}
