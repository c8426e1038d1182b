// The communicator seam of the trainer and the model.
//
// The trainer reduces gradients, losses and gradient norms, and the model
// exchanges sequence shards, only through this interface, so a one-process
// run and a multi-process run share one code path. Backends: local (one rank,
// here), MPI (host buffers) and NCCL (device buffers) implement the same calls.
//
// Memory: every buffer argument lives in the backend's memory space
// (device_buffers(): device memory for NCCL and for MPI staged through the
// host, mpi_staged_communicator.h; host memory otherwise). Small
// host-side values (loss sums, votes) go through host(), which every backend
// provides.
//
// Ordering: a backend with device buffers orders its work after everything
// issued on the compute stream (set_compute_stream) before the call, and
// orders later compute-stream work after the collective; the host does not
// block. Host backends complete blocking calls before returning.
//
// Counts are elements for typed reductions and bytes for data movement.
// Send and receive buffers of one call must not overlap (except in-place
// calls, which take one buffer).
// Collective calls must be made by every rank of the communicator in the
// same order; a call that does not complete within the timeout ends the whole
// job with a message naming the rank and the operation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "distributed/backend.h"

namespace reformer {

// An operation in flight (the *_async calls). wait() returns once the result
// may be used: host backends block until it is complete; device backends
// order the compute stream after it. Destroying a Work that was not waited
// for waits.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
};

struct CommOptions {
  double timeout_s = 600;          // a collective that takes longer ends the job; <= 0: never
  int64_t max_chunk = 2147483647;  // elements or bytes per underlying call (MPI counts are int)
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const char* backend() const = 0;
  virtual int rank() const = 0;  // 0 .. size()-1
  virtual int size() const = 0;
  // True when buffers are device pointers (NCCL, staged MPI).
  virtual bool device_buffers() const { return false; }
  // Ranks of this host computing on this rank's GPU (itself included): they
  // share its memory. 1 for host backends and NCCL (one GPU per rank).
  virtual int ranks_on_device() const { return 1; }
  // The communicator for host buffers over the same ranks (itself when
  // device_buffers() is false).
  virtual Communicator& host() { return *this; }
  // Device backends: the stream the caller computes on (a cudaStream_t).
  virtual void set_compute_stream(void* /*stream*/) {}

  // In-place sum over all ranks of n elements; every rank gets the result.
  virtual void allreduce_sum(float* data, int64_t n) = 0;
  virtual void allreduce_sum(double* data, int64_t n) = 0;
  virtual std::unique_ptr<Work> allreduce_sum_async(float* data, int64_t n) = 0;
  // Copies `bytes` bytes from rank `root` to every rank.
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  // recv[r * bytes .. (r+1) * bytes) = rank r's send[0 .. bytes).
  virtual void allgather(const void* send, void* recv, int64_t bytes) = 0;
  // recv[0 .. n) = sum over ranks of their send[rank() * n .. (rank()+1) * n).
  virtual void reduce_scatter_sum(const float* send, float* recv, int64_t n) = 0;
  // Block r of send (bytes each) goes to rank r and arrives as block
  // rank() there: recv[s * bytes ..] = rank s's send[rank() * bytes ..].
  virtual void alltoall(const void* send, void* recv, int64_t bytes) = 0;
  // Variable blocks: send_bytes[r] bytes at send + send_off[r] go to rank r,
  // and recv_bytes[s] bytes from rank s land at recv + recv_off[s]. Arrays
  // have size() entries (host memory); counts must agree pairwise.
  virtual void alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_off,
                         void* recv, const int64_t* recv_bytes, const int64_t* recv_off) = 0;
  // Several alltoallv with the same row counts as one operation: for each
  // of the n arrays, send_rows[r] rows of arrays[a].row_bytes bytes (blocks
  // packed from the front in rank order) go to rank r, and recv_rows[s] rows
  // from rank s land packed in rank order. The default makes one alltoallv
  // per array; NCCL issues every array's sends and receives as one group.
  struct RowArray {
    const void* send;
    void* recv;
    int64_t row_bytes;
  };
  virtual void alltoallv_rows(const RowArray* arrays, int n, const int64_t* send_rows,
                              const int64_t* recv_rows);
  // Point to point; each send must meet the matching recv on the peer.
  virtual void send(const void* data, int64_t bytes, int peer) = 0;
  virtual void recv(void* data, int64_t bytes, int peer) = 0;
  // Returns once every rank has reached it (a host-side barrier: device
  // backends do not wait for device work).
  virtual void barrier() = 0;
  // The ranks with the same `color` (>= 0) form a new communicator, ordered
  // by (key, rank). Collective over this communicator. The new communicator
  // has this one's options, device and compute stream.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
  // Ends every rank of the job with a non-zero status (a failing rank must not
  // leave the others hanging in a collective).
  [[noreturn]] virtual void abort(int status) = 0;
};

// One process, no communication: sums are identities, gathers and exchanges
// are copies (host memory), split() gives another local communicator, and
// send/recv (which would need a peer) throw CommError.
class LocalCommunicator final : public Communicator {
 public:
  const char* backend() const override { return "local"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(float*, int64_t) override {}
  void allreduce_sum(double*, int64_t) override {}
  std::unique_ptr<Work> allreduce_sum_async(float* data, int64_t n) override;
  void broadcast(void*, int64_t, int) override {}
  void allgather(const void* send, void* recv, int64_t bytes) override;
  void reduce_scatter_sum(const float* send, float* recv, int64_t n) override;
  void alltoall(const void* send, void* recv, int64_t bytes) override;
  void alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_off, void* recv,
                 const int64_t* recv_bytes, const int64_t* recv_off) override;
  void send(const void* data, int64_t bytes, int peer) override;
  void recv(void* data, int64_t bytes, int peer) override;
  void barrier() override {}
  std::unique_ptr<Communicator> split(int color, int key) override;
  [[noreturn]] void abort(int status) override;
};

// The communicator of `backend` over every process of the job, for buffers
// in device memory when `device_buffers` (mpi: staged through the host,
// mpi_staged_communicator.h; nccl always). Throws CommError when the
// backend was not built in or cannot start.
std::unique_ptr<Communicator> make_communicator(CommBackend backend,
                                                const CommOptions& options = {},
                                                bool device_buffers = false);

}  // namespace reformer
