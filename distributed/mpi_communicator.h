// The MPI backend of the communicator: host buffers, one process per rank,
// over a duplicate of MPI_COMM_WORLD (so the framework's messages never mix
// with a caller's own MPI traffic). Built only when CMake finds MPI
// (REFORMER_HAVE_MPI); CPU runs and the tests/mpi suites use it.
#pragma once

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  // the C API only; the deprecated C++ bindings are not used
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <climits>
#include <cstdint>

#include "distributed/communicator.h"

namespace reformer {

// Throws CommError "<call> failed: <MPI error string> (rank R) (at file:line)".
[[noreturn]] void throw_mpi_error(int code, const char* call, const char* file, int line);

}  // namespace reformer

// MPI_CHECK(call): runs an MPI call and throws reformer::CommError naming the
// call, the MPI error, the world rank, the file and the line when it does not
// return MPI_SUCCESS. Errors are only returned (rather than aborting the job)
// on communicators whose error handler is MPI_ERRORS_RETURN, as MpiCommunicator
// sets on its own.
#define MPI_CHECK(call)                                                          \
  do {                                                                           \
    const int mpi_check_code_ = (call);                                          \
    if (mpi_check_code_ != MPI_SUCCESS)                                          \
      ::reformer::throw_mpi_error(mpi_check_code_, #call, __FILE__, __LINE__);   \
  } while (0)

namespace reformer {

class MpiCommunicator final : public Communicator {
 public:
  // Initialises MPI (MPI_THREAD_FUNNELED: only the thread that made the
  // communicator calls MPI) unless the program already did, then duplicates
  // MPI_COMM_WORLD. `max_chunk` bounds the elements (allreduce) or bytes
  // (broadcast) of one MPI call, at most INT_MAX since MPI counts are int;
  // larger buffers go in pieces. Tests shrink it to exercise the splitting.
  // Throws CommError when MPI was already finalized or a call fails.
  explicit MpiCommunicator(int64_t max_chunk = INT_MAX);
  // Frees the duplicate; calls MPI_Finalize only when the constructor
  // initialised MPI.
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  const char* backend() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  // Element sums in an implementation-defined order: results may differ from
  // a sequential sum in the last bits (exact for small integers).
  void allreduce_sum(float* data, int64_t n) override;
  void allreduce_sum(double* data, int64_t n) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void barrier() override;
  // MPI_Abort on MPI_COMM_WORLD: ends every process of the job.
  [[noreturn]] void abort(int status) override;

  MPI_Comm comm() const { return comm_; }

 private:
  template <class T>
  void allreduce(T* data, int64_t n, MPI_Datatype type);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  int64_t max_chunk_ = INT_MAX;
  bool owns_mpi_ = false;  // MPI_Init_thread was called here: finalize on destruction
};

}  // namespace reformer
