#include "distributed/mpi_communicator.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "kernels/errors.h"

namespace reformer {

namespace {

// The world rank for error messages, or -1 outside an MPI session.
int world_rank() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return -1;
  int r = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

}  // namespace

void throw_mpi_error(int code, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  const std::string msg = std::string(call) + " failed: " +
                          (len > 0 ? std::string(text, size_t(len))
                                   : "MPI error " + std::to_string(code)) +
                          " (rank " + std::to_string(world_rank()) + ")";
  throw CommError(where(msg.c_str(), file, line));
}

MpiCommunicator::MpiCommunicator(int64_t max_chunk)
    : max_chunk_(std::clamp<int64_t>(max_chunk, 1, INT_MAX)) {
  int initialized = 0, finalized = 0;
  MPI_CHECK(MPI_Initialized(&initialized));
  MPI_CHECK(MPI_Finalized(&finalized));
  REFORMER_REQUIRE(!finalized, CommError, "MPI communicator: MPI was already finalized");
  if (!initialized) {
    int provided = 0;
    MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
    owns_mpi_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      throw CommError("MPI communicator: the MPI library does not support MPI_THREAD_FUNNELED");
    }
  }
  try {
    MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MPI_CHECK(MPI_Comm_size(comm_, &size_));
  } catch (...) {
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    if (owns_mpi_) MPI_Finalize();
    throw;
  }
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  if (owns_mpi_) MPI_Finalize();
}

template <class T>
void MpiCommunicator::allreduce(T* data, int64_t n, MPI_Datatype type) {
  REFORMER_REQUIRE(n >= 0, CommError, "allreduce_sum: negative element count " + std::to_string(n));
  for (int64_t off = 0; off < n; off += max_chunk_) {
    const int count = int(std::min(max_chunk_, n - off));
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data + off, count, type, MPI_SUM, comm_));
  }
}

void MpiCommunicator::allreduce_sum(float* data, int64_t n) { allreduce(data, n, MPI_FLOAT); }
void MpiCommunicator::allreduce_sum(double* data, int64_t n) { allreduce(data, n, MPI_DOUBLE); }

void MpiCommunicator::broadcast(void* data, int64_t bytes, int root) {
  REFORMER_REQUIRE(bytes >= 0, CommError, "broadcast: negative byte count " + std::to_string(bytes));
  REFORMER_REQUIRE(root >= 0 && root < size_, CommError,
                   "broadcast: root " + std::to_string(root) + " is not a rank of " +
                       std::to_string(size_));
  char* p = static_cast<char*>(data);
  for (int64_t off = 0; off < bytes; off += max_chunk_) {
    const int count = int(std::min(max_chunk_, bytes - off));
    MPI_CHECK(MPI_Bcast(p + off, count, MPI_BYTE, root, comm_));
  }
}

void MpiCommunicator::barrier() { MPI_CHECK(MPI_Barrier(comm_)); }

void MpiCommunicator::abort(int status) {
  MPI_Abort(MPI_COMM_WORLD, status);
  std::_Exit(status);  // MPI_Abort does not return; this satisfies [[noreturn]]
}

}  // namespace reformer
