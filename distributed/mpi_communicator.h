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
#include <memory>

#include "distributed/communicator.h"
#include "distributed/watchdog.h"

namespace reformer {

// Throws CommError "<call> failed: <MPI error string> (rank R) (at file:line)".
[[noreturn]] void throw_mpi_error(int code, const char* call, const char* file, int line);

// This process's rank among the processes of `comm` on its host, and their
// number (MPI_Comm_split_type, MPI_COMM_TYPE_SHARED; collective over comm).
struct NodeRanks {
  int rank = 0;
  int size = 1;
};
NodeRanks node_ranks(MPI_Comm comm);

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

class ProgressBoard;
class ProgressTrack;

// Host buffers; every call is watched (watchdog.h) with options.timeout_s and
// split into calls of at most options.max_chunk elements or bytes (MPI
// counts are int). Send and receive buffers must not overlap.
class MpiCommunicator final : public Communicator {
 public:
  // Initialises MPI unless the program already did (MPI_THREAD_MULTIPLE when
  // the library has it, else MPI_THREAD_FUNNELED: only the thread that made
  // the communicator calls MPI, the watchdog thread only MPI_Abort), then
  // duplicates MPI_COMM_WORLD and maps the progress board the watchdog reads
  // peers' progress from (mpi_progress.h). Throws CommError when MPI was
  // already finalized, lacks thread support, or a call fails.
  explicit MpiCommunicator(const CommOptions& options = {});
  // Adopts `comm` (from MPI_Comm_split; freed on destruction) without owning
  // MPI's initialisation; with a `board`, its collectives are counted there
  // (collective over `comm`).
  MpiCommunicator(MPI_Comm comm, const CommOptions& options,
                  std::shared_ptr<ProgressBoard> board = nullptr);
  // Frees the communicator; calls MPI_Finalize only when the constructor
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
  // MPI_Iallreduce per chunk; the Work's wait() is MPI_Waitall (watched).
  std::unique_ptr<Work> allreduce_sum_async(float* data, int64_t n) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void allgather(const void* send, void* recv, int64_t bytes) override;
  void reduce_scatter_sum(const float* send, float* recv, int64_t n) override;
  void alltoall(const void* send, void* recv, int64_t bytes) override;
  // MPI_Alltoallv when every count fits in one call and every offset in an
  // int; otherwise non-blocking point-to-point messages of at most max_chunk
  // bytes. Throws CommError on negative counts or offsets.
  void alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_off, void* recv,
                 const int64_t* recv_bytes, const int64_t* recv_off) override;
  // Throws CommError for peer == rank() (it would wait for itself).
  void send(const void* data, int64_t bytes, int peer) override;
  void recv(void* data, int64_t bytes, int peer) override;
  void barrier() override;
  // MPI_Comm_split; color must be >= 0.
  std::unique_ptr<Communicator> split(int color, int key) override;
  // MPI_Abort on MPI_COMM_WORLD: ends every process of the job.
  [[noreturn]] void abort(int status) override;

  MPI_Comm comm() const { return comm_; }
  const CommOptions& options() const { return options_; }
  // Throws CommError unless peer is another rank of this communicator (a
  // send or receive's peer).
  void check_peer(int peer, const char* op) const;
  // The process's progress board (null when this communicator has none).
  const std::shared_ptr<ProgressBoard>& board() const { return board_; }

 private:
  template <class T>
  void allreduce(T* data, int64_t n, MPI_Datatype type);
  WatchedOp watched(const char* op, int64_t amount, const char* unit) const {
    return {"mpi", op, amount, unit, size_};
  }
  ProgressTrack* track() const { return track_.get(); }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  CommOptions options_;
  int64_t max_chunk_ = INT_MAX;  // options_.max_chunk clamped to 1 .. INT_MAX
  bool owns_mpi_ = false;  // MPI_Init_thread was called here: finalize on destruction
  std::shared_ptr<ProgressBoard> board_;  // shared with the communicators split from this one
  std::unique_ptr<ProgressTrack> track_;  // this communicator's counters on board_
};

}  // namespace reformer
