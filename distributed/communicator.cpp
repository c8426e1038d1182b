#include "distributed/communicator.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/errors.h"

#ifdef REFORMER_HAVE_MPI
#include "distributed/mpi_communicator.h"
#endif
#ifdef REFORMER_HAVE_NCCL
#include "distributed/nccl_communicator.h"
#endif
#ifdef REFORMER_HAVE_STAGED_MPI
#include "distributed/mpi_staged_communicator.h"
#endif

namespace reformer {

namespace {

// Work that is complete when made.
class DoneWork final : public Work {
 public:
  void wait() override {}
};

void copy_bytes(const void* send, void* recv, int64_t bytes, const char* op) {
  REFORMER_REQUIRE(bytes >= 0, CommError,
                   std::string(op) + ": negative byte count " + std::to_string(bytes));
  if (bytes > 0 && send != recv) std::memmove(recv, send, size_t(bytes));
}

}  // namespace

std::unique_ptr<Work> LocalCommunicator::allreduce_sum_async(float*, int64_t) {
  return std::make_unique<DoneWork>();
}

void LocalCommunicator::allgather(const void* send, void* recv, int64_t bytes) {
  copy_bytes(send, recv, bytes, "allgather");
}

void LocalCommunicator::reduce_scatter_sum(const float* send, float* recv, int64_t n) {
  REFORMER_REQUIRE(n >= 0, CommError, "reduce_scatter_sum: negative element count " + std::to_string(n));
  copy_bytes(send, recv, n * int64_t(sizeof(float)), "reduce_scatter_sum");
}

void Communicator::alltoallv_rows(const RowArray* arrays, int n, const int64_t* send_rows,
                                  const int64_t* recv_rows) {
  const size_t p = size_t(size());
  std::vector<int64_t> sb(p), so(p), rb(p), ro(p);
  for (int a = 0; a < n; ++a) {
    REFORMER_REQUIRE(arrays[a].row_bytes >= 0, CommError,
                     "alltoallv_rows: negative row size " + std::to_string(arrays[a].row_bytes));
    int64_t as = 0, ar = 0;
    for (size_t k = 0; k < p; ++k) {
      REFORMER_REQUIRE(send_rows[k] >= 0 && recv_rows[k] >= 0, CommError,
                       "alltoallv_rows: negative row count for rank " + std::to_string(k));
      sb[k] = send_rows[k] * arrays[a].row_bytes;
      so[k] = as;
      as += sb[k];
      rb[k] = recv_rows[k] * arrays[a].row_bytes;
      ro[k] = ar;
      ar += rb[k];
    }
    alltoallv(arrays[a].send, sb.data(), so.data(), arrays[a].recv, rb.data(), ro.data());
  }
}

void LocalCommunicator::alltoall(const void* send, void* recv, int64_t bytes) {
  copy_bytes(send, recv, bytes, "alltoall");
}

void LocalCommunicator::alltoallv(const void* send, const int64_t* send_bytes,
                                  const int64_t* send_off, void* recv, const int64_t* recv_bytes,
                                  const int64_t* recv_off) {
  REFORMER_REQUIRE(send_bytes[0] == recv_bytes[0], CommError,
                   "alltoallv: rank 0 sends " + std::to_string(send_bytes[0]) +
                       " bytes to itself but expects " + std::to_string(recv_bytes[0]));
  REFORMER_REQUIRE(send_off[0] >= 0 && recv_off[0] >= 0, CommError, "alltoallv: negative offset");
  copy_bytes(static_cast<const char*>(send) + send_off[0], static_cast<char*>(recv) + recv_off[0],
             send_bytes[0], "alltoallv");
}

void LocalCommunicator::send(const void*, int64_t, int peer) {
  throw CommError("send to rank " + std::to_string(peer) +
                  " on the local communicator: one rank has no peer to send to");
}

void LocalCommunicator::recv(void*, int64_t, int peer) {
  throw CommError("recv from rank " + std::to_string(peer) +
                  " on the local communicator: one rank has no peer to receive from");
}

std::unique_ptr<Communicator> LocalCommunicator::split(int, int) {
  return std::make_unique<LocalCommunicator>();
}

void LocalCommunicator::abort(int status) { std::exit(status); }

std::unique_ptr<Communicator> make_communicator(CommBackend backend, const CommOptions& options,
                                                bool device_buffers) {
  const std::string available = std::string("local")
#ifdef REFORMER_HAVE_MPI
                                + ", mpi"
#endif
#ifdef REFORMER_HAVE_NCCL
                                + ", nccl"
#endif
      ;
  switch (backend) {
    case CommBackend::local:
      return std::make_unique<LocalCommunicator>();
    case CommBackend::mpi:
#ifdef REFORMER_HAVE_MPI
      if (!device_buffers) return std::make_unique<MpiCommunicator>(options);
#ifdef REFORMER_HAVE_STAGED_MPI
      return std::make_unique<StagedMpiCommunicator>(options);
#else
      throw CommError(
          "communicator backend 'mpi' for device buffers is not available: this build has no "
          "CUDA path (training.device cpu works with it)");
#endif
#else
      throw CommError(
          "communicator backend 'mpi' is not available: built without MPI (CMake found no MPI "
          "library, or REFORMER_MPI=OFF); available: " + available);
#endif
    case CommBackend::nccl:
#ifdef REFORMER_HAVE_NCCL
      return std::make_unique<NcclCommunicator>(options);
#else
      throw CommError(
          "communicator backend 'nccl' is not available: this build has no NCCL communicator "
          "(it needs CUDA, NCCL and MPI found by CMake); available: " + available);
#endif
  }
  (void)options;
  throw CommError("unknown communicator backend (available: " + available + ")");
}

}  // namespace reformer
