// The NCCL backend of the communicator: device buffers, one process per GPU,
// bootstrapped over MPI. Built only with CUDA, NCCL and MPI
// (REFORMER_HAVE_NCCL).
//
// Streams: the communicator owns a non-blocking communication stream. Each
// call makes it wait for the work issued so far on the compute stream
// (set_compute_stream), enqueues the NCCL operation(s) there and records a
// done event; blocking calls make the compute stream wait for that event
// (the host does not wait), async calls return a Work whose wait() does.
// The compute stream should be the caller's own stream: the legacy default
// stream (null, the default) works but serialises with everything.
//
// Watchdog: every operation in flight is polled (cudaEventQuery on its done
// event, ncclCommGetAsyncError) by the watchdog thread; one older than
// options.timeout_s, or an asynchronous NCCL error, ends the job after
// ncclCommAbort.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/mpi_communicator.h"
#include "distributed/watchdog.h"

namespace reformer {

// Throws CommError "<call> failed: <NCCL error string> (rank R) (at file:line)".
[[noreturn]] void throw_nccl_error(ncclResult_t code, const char* call, const char* file, int line);

}  // namespace reformer

// NCCL_CHECK(call): throws reformer::CommError naming the call, the NCCL error
// and the world rank when `call` does not return ncclSuccess.
#define NCCL_CHECK(call)                                                          \
  do {                                                                            \
    const ncclResult_t nccl_check_code_ = (call);                                 \
    if (nccl_check_code_ != ncclSuccess)                                          \
      ::reformer::throw_nccl_error(nccl_check_code_, #call, __FILE__, __LINE__);  \
  } while (0)

namespace reformer {

class NcclCommunicator final : public Communicator, private WatchSource {
 public:
  // Over every process of the job: makes the MPI communicator of the same
  // ranks (initialising MPI when needed), picks this process's GPU
  // (node-local rank modulo the visible devices) and makes it current, and
  // joins the NCCL communicator (rank 0 makes the id, MPI broadcasts it).
  // Throws CommError (or DeviceError) when a step fails, naming it.
  explicit NcclCommunicator(const CommOptions& options = {});
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  const char* backend() const override { return "nccl"; }
  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  bool device_buffers() const override { return true; }
  Communicator& host() override { return *mpi_; }
  void set_compute_stream(void* stream) override { compute_ = static_cast<cudaStream_t>(stream); }

  // The CUDA device this rank uses, and "rank R on host H uses GPU G (name,
  // bus id)" for the program to print first.
  int local_device() const { return device_; }
  const std::string& description() const { return description_; }

  void allreduce_sum(float* data, int64_t n) override;
  void allreduce_sum(double* data, int64_t n) override;
  std::unique_ptr<Work> allreduce_sum_async(float* data, int64_t n) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void allgather(const void* send, void* recv, int64_t bytes) override;
  void reduce_scatter_sum(const float* send, float* recv, int64_t n) override;
  void alltoall(const void* send, void* recv, int64_t bytes) override;
  void alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_off, void* recv,
                 const int64_t* recv_bytes, const int64_t* recv_off) override;
  void alltoallv_rows(const RowArray* arrays, int n, const int64_t* send_rows,
                      const int64_t* recv_rows) override;
  // Ordered on the communication stream like the collectives; a rank may not
  // send to itself.
  void send(const void* data, int64_t bytes, int peer) override;
  void recv(void* data, int64_t bytes, int peer) override;
  // All ranks have reached it (a host barrier over host()); device work is
  // not waited for.
  void barrier() override;
  // ncclCommSplit, with the MPI twin split alike; the new communicator
  // shares this one's device and compute stream.
  std::unique_ptr<Communicator> split(int color, int key) override;
  // ncclCommAbort, then MPI_Abort on MPI_COMM_WORLD.
  [[noreturn]] void abort(int status) override;

 private:
  NcclCommunicator(std::unique_ptr<MpiCommunicator> mpi, ncclComm_t comm, int device,
                   std::string description, void* compute, const CommOptions& options);
  void start_streams();

  // Orders the communication stream after the compute stream.
  void begin_op();
  // Tracks the operation enqueued since begin_op() for the watchdog (an
  // event from the pool, recorded on the communication stream) and counts it
  // as started on the progress board; reap_locked() counts it completed.
  void end_op(const char* op, int64_t amount, const char* unit);
  // begin_op, enqueue, end_op, and the compute stream waits for the result.
  template <class Enqueue>
  void blocking(const char* op, int64_t amount, const char* unit, Enqueue&& enqueue);
  // Returns the events of completed operations (oldest first) to the pool.
  void reap_locked();

  std::string poll(std::chrono::steady_clock::time_point now) override;
  void abort_now() override;

  struct InFlight {
    WatchedOp op;
    std::chrono::steady_clock::time_point start;
    cudaEvent_t done;
  };

  std::unique_ptr<MpiCommunicator> mpi_;  // the same ranks, for the bootstrap and host()
  std::unique_ptr<ProgressTrack> track_;  // this communicator's counters (mpi_progress.h); may be null
  ncclComm_t comm_ = nullptr;
  int device_ = 0;
  std::string description_;
  CommOptions options_;
  cudaStream_t compute_ = nullptr;  // the caller's; null: the legacy default stream
  cudaStream_t stream_ = nullptr;   // owned: the communication stream
  cudaEvent_t ready_ = nullptr;     // owned: the compute stream's state at a call
  cudaEvent_t done_ = nullptr;      // owned: the end of the last blocking call

  std::mutex mu_;                   // in_flight_, pool_ (the watchdog polls them)
  std::deque<InFlight> in_flight_;  // issue order = completion order (one stream)
  std::vector<cudaEvent_t> pool_;
  std::atomic<bool> aborted_{false};
};

}  // namespace reformer
