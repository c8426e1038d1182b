#include "distributed/nccl_communicator.h"


#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "distributed/mpi_node_gpu.h"
#include "distributed/mpi_progress.h"
#include "kernels/cuda/check.h"
#include "kernels/errors.h"

namespace reformer {

namespace {

int world_rank_or_minus_one() {
  int initialized = 0, finalized = 0, r = -1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// Runs `enqueue` between ncclGroupStart and ncclGroupEnd (the group is closed
// even when enqueue throws).
template <class F>
void nccl_group(F&& enqueue) {
  NCCL_CHECK(ncclGroupStart());
  try {
    enqueue();
  } catch (...) {
    ncclGroupEnd();
    throw;
  }
  NCCL_CHECK(ncclGroupEnd());
}

// The compute stream waits for `done` at wait(); the event is the Work's own.
class NcclWork final : public Work {
 public:
  NcclWork(cudaEvent_t done, cudaStream_t compute, const WatchedOp& op)
      : done_(done), compute_(compute), op_(op) {}
  ~NcclWork() override {
    try {
      wait();
    } catch (const std::exception& e) {
      watchdog::end_job(describe(op_) + " failed: " + e.what());
    }
    cudaEventDestroy(done_);
  }
  void wait() override {
    if (waited_) return;
    waited_ = true;
    CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
  }

 private:
  cudaEvent_t done_;
  cudaStream_t compute_;
  WatchedOp op_;
  bool waited_ = false;
};

}  // namespace

void throw_nccl_error(ncclResult_t code, const char* call, const char* file, int line) {
  std::string msg = std::string(call) + " failed: " + ncclGetErrorString(code);
  const char* last = ncclGetLastError(nullptr);
  if (last && *last) msg += std::string(" (") + last + ")";
  msg += " (rank " + std::to_string(world_rank_or_minus_one()) + ")";
  throw CommError(where(msg.c_str(), file, line));
}

NcclCommunicator::NcclCommunicator(const CommOptions& options)
    : mpi_(std::make_unique<MpiCommunicator>(options)), options_(options) {
  NodeGpu gpu = choose_node_gpu(*mpi_, "nccl");
  // NCCL refuses two ranks of a communicator on one GPU ("Duplicate GPU
  // detected") only inside ncclCommInitRank: say what would work first.
  if (gpu.sharers > 1)
    throw CommError(gpu.description + " with " + std::to_string(gpu.sharers - 1) +
                    " other rank(s) of this host: NCCL needs a GPU per rank; start at most one "
                    "rank per GPU, or use parallel.backend mpi (collectives through host "
                    "memory) to run this layout on fewer GPUs");
  device_ = gpu.device;
  description_ = std::move(gpu.description);

  ncclUniqueId id{};
  if (rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  mpi_->broadcast(&id, sizeof id, 0);
  {
    WatchScope watch({"nccl", "ncclCommInitRank", -1, "", size()}, options_.timeout_s);
    NCCL_CHECK(ncclCommInitRank(&comm_, size(), id, rank()));
  }
  try {
    start_streams();
  } catch (...) {
    ncclCommDestroy(comm_);
    throw;
  }
}

NcclCommunicator::NcclCommunicator(std::unique_ptr<MpiCommunicator> mpi, ncclComm_t comm, int device,
                                   std::string description, void* compute,
                                   const CommOptions& options)
    : mpi_(std::move(mpi)), comm_(comm), device_(device), description_(std::move(description)),
      options_(options), compute_(static_cast<cudaStream_t>(compute)) {
  try {
    start_streams();
  } catch (...) {
    ncclCommDestroy(comm_);
    throw;
  }
}

void NcclCommunicator::start_streams() {
  // The highest priority: a gradient bucket's reduction is scheduled as soon
  // as SMs free up rather than queueing behind the compute stream's kernels.
  int least = 0, greatest = 0;
  CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
  CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  // Collective over the ranks: the NCCL operations get their own counters,
  // apart from those of the MPI twin's host calls.
  if (mpi_->board()) track_ = ProgressBoard::track(mpi_->board(), mpi_->comm());
  if (options_.timeout_s > 0) watchdog::add_source(this);
}

NcclCommunicator::~NcclCommunicator() {
  if (options_.timeout_s > 0) watchdog::remove_source(this);
  if (aborted_) return;
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  for (const InFlight& f : in_flight_) cudaEventDestroy(f.done);
  for (cudaEvent_t e : pool_) cudaEventDestroy(e);
  if (ready_) cudaEventDestroy(ready_);
  if (done_) cudaEventDestroy(done_);
  if (stream_) cudaStreamDestroy(stream_);
  if (comm_) ncclCommDestroy(comm_);
}

// ------------------------------------------------------------------ ordering

void NcclCommunicator::begin_op() {
  CUDA_CHECK(cudaEventRecord(ready_, compute_));
  CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
}

void NcclCommunicator::reap_locked() {
  while (!in_flight_.empty() && cudaEventQuery(in_flight_.front().done) == cudaSuccess) {
    if (track_ && in_flight_.front().op.seq > 0) track_->complete(in_flight_.front().op.op);
    pool_.push_back(in_flight_.front().done);
    in_flight_.pop_front();
  }
}

void NcclCommunicator::end_op(const char* op, int64_t amount, const char* unit) {
  if (!(options_.timeout_s > 0)) return;
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  cudaEvent_t e = nullptr;
  if (!pool_.empty()) {
    e = pool_.back();
    pool_.pop_back();
  } else {
    CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  const cudaError_t rc = cudaEventRecord(e, stream_);
  if (rc != cudaSuccess) pool_.push_back(e);
  CUDA_CHECK(rc);
  // Point-to-point calls involve two ranks: only collectives are counted.
  const WatchedOp w{"nccl", op, amount, unit, size()};
  const bool collective = std::strcmp(op, "send") != 0 && std::strcmp(op, "recv") != 0;
  in_flight_.push_back({collective ? CollectiveScope::counted(track_.get(), w) : w,
                        std::chrono::steady_clock::now(), e});
}

template <class Enqueue>
void NcclCommunicator::blocking(const char* op, int64_t amount, const char* unit, Enqueue&& enqueue) {
  begin_op();
  enqueue();
  end_op(op, amount, unit);
  CUDA_CHECK(cudaEventRecord(done_, stream_));
  CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
}

// ------------------------------------------------------------------ watchdog

std::string NcclCommunicator::poll(std::chrono::steady_clock::time_point now) {
  if (aborted_) return "";
  ncclResult_t async = ncclSuccess;
  if (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess &&
      async != ncclInProgress)
    return std::string("nccl communicator of ") + std::to_string(size()) +
           " ranks failed asynchronously: " + ncclGetErrorString(async);
  cudaSetDevice(device_);  // the watchdog thread's own current device
  std::lock_guard<std::mutex> lock(mu_);
  reap_locked();
  if (in_flight_.empty()) return "";
  const InFlight& f = in_flight_.front();
  const cudaError_t q = cudaEventQuery(f.done);
  if (q != cudaSuccess && q != cudaErrorNotReady)
    return describe(f.op) + " failed on the device: " + cudaGetErrorName(q) + ": " +
           cudaGetErrorString(q);
  if (std::chrono::duration<double>(now - f.start).count() > options_.timeout_s)
    return watchdog::timeout_message(f.op, options_.timeout_s);
  return "";
}

void NcclCommunicator::abort_now() {
  if (aborted_.exchange(true)) return;
  ncclCommAbort(comm_);
}

void NcclCommunicator::abort(int status) {
  abort_now();
  mpi_->abort(status);
}

// ------------------------------------------------------------------ calls

void NcclCommunicator::allreduce_sum(float* data, int64_t n) {
  REFORMER_REQUIRE(n >= 0, CommError, "allreduce_sum: negative element count " + std::to_string(n));
  if (n == 0) return;
  blocking("allreduce_sum", n, "elements", [&] {
    NCCL_CHECK(ncclAllReduce(data, data, size_t(n), ncclFloat, ncclSum, comm_, stream_));
  });
}

void NcclCommunicator::allreduce_sum(double* data, int64_t n) {
  REFORMER_REQUIRE(n >= 0, CommError, "allreduce_sum: negative element count " + std::to_string(n));
  if (n == 0) return;
  blocking("allreduce_sum", n, "elements", [&] {
    NCCL_CHECK(ncclAllReduce(data, data, size_t(n), ncclDouble, ncclSum, comm_, stream_));
  });
}

std::unique_ptr<Work> NcclCommunicator::allreduce_sum_async(float* data, int64_t n) {
  REFORMER_REQUIRE(n >= 0, CommError,
                   "allreduce_sum_async: negative element count " + std::to_string(n));
  const WatchedOp op{"nccl", "allreduce_sum_async", n, "elements", size()};
  begin_op();
  if (n > 0) NCCL_CHECK(ncclAllReduce(data, data, size_t(n), ncclFloat, ncclSum, comm_, stream_));
  end_op(op.op, n, op.unit);
  cudaEvent_t done = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  const cudaError_t rc = cudaEventRecord(done, stream_);
  if (rc != cudaSuccess) cudaEventDestroy(done);
  CUDA_CHECK(rc);
  return std::make_unique<NcclWork>(done, compute_, op);
}

void NcclCommunicator::broadcast(void* data, int64_t bytes, int root) {
  REFORMER_REQUIRE(bytes >= 0, CommError, "broadcast: negative byte count " + std::to_string(bytes));
  REFORMER_REQUIRE(root >= 0 && root < size(), CommError,
                   "broadcast: root " + std::to_string(root) + " is not a rank of " +
                       std::to_string(size()));
  if (bytes == 0) return;
  blocking("broadcast", bytes, "bytes", [&] {
    NCCL_CHECK(ncclBroadcast(data, data, size_t(bytes), ncclChar, root, comm_, stream_));
  });
}

void NcclCommunicator::allgather(const void* send, void* recv, int64_t bytes) {
  REFORMER_REQUIRE(bytes >= 0, CommError, "allgather: negative byte count " + std::to_string(bytes));
  if (bytes == 0) return;
  blocking("allgather", bytes, "bytes", [&] {
    NCCL_CHECK(ncclAllGather(send, recv, size_t(bytes), ncclChar, comm_, stream_));
  });
}

void NcclCommunicator::reduce_scatter_sum(const float* send, float* recv, int64_t n) {
  REFORMER_REQUIRE(n >= 0, CommError,
                   "reduce_scatter_sum: negative element count " + std::to_string(n));
  if (n == 0) return;
  blocking("reduce_scatter_sum", n, "elements", [&] {
    NCCL_CHECK(ncclReduceScatter(send, recv, size_t(n), ncclFloat, ncclSum, comm_, stream_));
  });
}

void NcclCommunicator::alltoall(const void* send, void* recv, int64_t bytes) {
  REFORMER_REQUIRE(bytes >= 0, CommError, "alltoall: negative byte count " + std::to_string(bytes));
  if (bytes == 0) return;
  const char* s = static_cast<const char*>(send);
  char* r = static_cast<char*>(recv);
  blocking("alltoall", bytes, "bytes", [&] {
    nccl_group([&] {
      for (int peer = 0; peer < size(); ++peer) {
        NCCL_CHECK(ncclSend(s + int64_t(peer) * bytes, size_t(bytes), ncclChar, peer, comm_, stream_));
        NCCL_CHECK(ncclRecv(r + int64_t(peer) * bytes, size_t(bytes), ncclChar, peer, comm_, stream_));
      }
    });
  });
}

void NcclCommunicator::alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_off,
                                 void* recv, const int64_t* recv_bytes, const int64_t* recv_off) {
  int64_t total = 0;
  for (int r = 0; r < size(); ++r) {
    for (int64_t v : {send_bytes[r], send_off[r], recv_bytes[r], recv_off[r]})
      REFORMER_REQUIRE(v >= 0, CommError,
                       "alltoallv: negative count or offset " + std::to_string(v) + " for rank " +
                           std::to_string(r));
    total += send_bytes[r];
  }
  const char* s = static_cast<const char*>(send);
  char* d = static_cast<char*>(recv);
  // Zero counts are left out on both sides of a pair (counts agree pairwise).
  blocking("alltoallv", total, "bytes sent", [&] {
    nccl_group([&] {
      for (int peer = 0; peer < size(); ++peer) {
        if (send_bytes[peer] > 0)
          NCCL_CHECK(ncclSend(s + send_off[peer], size_t(send_bytes[peer]), ncclChar, peer, comm_,
                              stream_));
        if (recv_bytes[peer] > 0)
          NCCL_CHECK(ncclRecv(d + recv_off[peer], size_t(recv_bytes[peer]), ncclChar, peer, comm_,
                              stream_));
      }
    });
  });
}

void NcclCommunicator::alltoallv_rows(const RowArray* arrays, int n, const int64_t* send_rows,
                                      const int64_t* recv_rows) {
  int64_t total = 0;
  for (int a = 0; a < n; ++a) {
    REFORMER_REQUIRE(arrays[a].row_bytes >= 0, CommError,
                     "alltoallv_rows: negative row size " + std::to_string(arrays[a].row_bytes));
    for (int r = 0; r < size(); ++r) {
      REFORMER_REQUIRE(send_rows[r] >= 0 && recv_rows[r] >= 0, CommError,
                       "alltoallv_rows: negative row count for rank " + std::to_string(r));
      total += send_rows[r] * arrays[a].row_bytes;
    }
  }
  // Zero counts are left out on both sides of a pair (counts agree pairwise);
  // sends to one peer meet its receives in issue order.
  blocking("alltoallv", total, "bytes sent", [&] {
    nccl_group([&] {
      for (int a = 0; a < n; ++a) {
        const char* s = static_cast<const char*>(arrays[a].send);
        char* d = static_cast<char*>(arrays[a].recv);
        const int64_t w = arrays[a].row_bytes;
        int64_t so = 0, ro = 0;
        for (int peer = 0; peer < size(); ++peer) {
          const int64_t sb = send_rows[peer] * w, rb = recv_rows[peer] * w;
          if (sb > 0) NCCL_CHECK(ncclSend(s + so, size_t(sb), ncclChar, peer, comm_, stream_));
          if (rb > 0) NCCL_CHECK(ncclRecv(d + ro, size_t(rb), ncclChar, peer, comm_, stream_));
          so += sb;
          ro += rb;
        }
      }
    });
  });
}

void NcclCommunicator::send(const void* data, int64_t bytes, int peer) {
  REFORMER_REQUIRE(bytes >= 0 && peer >= 0 && peer < size() && peer != rank(), CommError,
                   "send: " + std::to_string(bytes) + " bytes to peer " + std::to_string(peer) +
                       " (rank " + std::to_string(rank()) + " of " + std::to_string(size()) + ")");
  if (bytes == 0) return;
  blocking("send", bytes, "bytes", [&] {
    NCCL_CHECK(ncclSend(data, size_t(bytes), ncclChar, peer, comm_, stream_));
  });
}

void NcclCommunicator::recv(void* data, int64_t bytes, int peer) {
  REFORMER_REQUIRE(bytes >= 0 && peer >= 0 && peer < size() && peer != rank(), CommError,
                   "recv: " + std::to_string(bytes) + " bytes from peer " + std::to_string(peer) +
                       " (rank " + std::to_string(rank()) + " of " + std::to_string(size()) + ")");
  if (bytes == 0) return;
  blocking("recv", bytes, "bytes", [&] {
    NCCL_CHECK(ncclRecv(data, size_t(bytes), ncclChar, peer, comm_, stream_));
  });
}

void NcclCommunicator::barrier() { mpi_->barrier(); }

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  REFORMER_REQUIRE(color >= 0, CommError, "split: negative color " + std::to_string(color));
  std::unique_ptr<MpiCommunicator> twin(static_cast<MpiCommunicator*>(mpi_->split(color, key).release()));
  ncclComm_t sub = nullptr;
  {
    WatchScope watch({"nccl", "ncclCommSplit", -1, "", size()}, options_.timeout_s);
    NCCL_CHECK(ncclCommSplit(comm_, color, key, &sub, nullptr));
  }
  return std::unique_ptr<Communicator>(
      new NcclCommunicator(std::move(twin), sub, device_, description_, compute_, options_));
}

}  // namespace reformer
