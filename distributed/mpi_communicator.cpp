#include "distributed/mpi_communicator.h"

#include "distributed/mpi_progress.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "kernels/errors.h"

namespace reformer {

NodeRanks node_ranks(MPI_Comm comm) {
  MPI_Comm node = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
  NodeRanks n;
  int rc = MPI_Comm_rank(node, &n.rank);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_size(node, &n.size);
  MPI_Comm_free(&node);
  MPI_CHECK(rc);
  return n;
}

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

namespace {

// Tags of the point-to-point messages (they never meet collectives).
constexpr int kSendTag = 1;
constexpr int kAlltoallvTag = 2;

// A datatype of `len` bytes whose extent is `stride` bytes: with a count of 1
// per rank, rank r's piece sits at buffer + r * stride (chunked gathers and
// exchanges of blocks longer than one call).
class StridedBytes {
 public:
  StridedBytes(int len, int64_t stride) {
    MPI_Datatype piece = MPI_DATATYPE_NULL;
    MPI_CHECK(MPI_Type_contiguous(len, MPI_BYTE, &piece));
    const int rc = MPI_Type_create_resized(piece, 0, MPI_Aint(stride), &type);
    MPI_Type_free(&piece);
    MPI_CHECK(rc);
    MPI_CHECK(MPI_Type_commit(&type));
  }
  ~StridedBytes() {
    if (type != MPI_DATATYPE_NULL) MPI_Type_free(&type);
  }
  StridedBytes(const StridedBytes&) = delete;
  StridedBytes& operator=(const StridedBytes&) = delete;
  MPI_Datatype type = MPI_DATATYPE_NULL;
};

void require_count(int64_t n, const char* op, const char* unit) {
  REFORMER_REQUIRE(n >= 0, CommError,
                   std::string(op) + ": negative " + unit + " count " + std::to_string(n));
}

// Requests of non-blocking calls; wait() completes them all under the
// watchdog. Destroying it unwaited waits; a failure there ends the job (the
// other ranks would wait for this one for ever).
class MpiWork final : public Work {
 public:
  // `op` is counted as started on `track` (may be null); wait() completes it.
  MpiWork(std::vector<MPI_Request> requests, const WatchedOp& op, ProgressTrack* track,
          double timeout_s)
      : requests_(std::move(requests)), op_(op), track_(track), timeout_s_(timeout_s) {}
  ~MpiWork() override {
    try {
      wait();
    } catch (const std::exception& e) {
      watchdog::end_job(describe(op_) + " failed: " + e.what());
    }
  }
  void wait() override {
    if (requests_.empty()) return;
    WatchScope watch(op_, timeout_s_);
    std::vector<MPI_Request> r = std::move(requests_);
    requests_.clear();
    MPI_CHECK(MPI_Waitall(int(r.size()), r.data(), MPI_STATUSES_IGNORE));
    if (track_) track_->complete(op_.op);
  }

 private:
  std::vector<MPI_Request> requests_;
  WatchedOp op_;
  ProgressTrack* track_;
  double timeout_s_;
};

}  // namespace

MpiCommunicator::MpiCommunicator(const CommOptions& options)
    : options_(options), max_chunk_(std::clamp<int64_t>(options.max_chunk, 1, INT_MAX)) {
  int initialized = 0, finalized = 0;
  MPI_CHECK(MPI_Initialized(&initialized));
  MPI_CHECK(MPI_Finalized(&finalized));
  REFORMER_REQUIRE(!finalized, CommError, "MPI communicator: MPI was already finalized");
  if (!initialized) {
    int provided = 0;
    MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
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
    if (options_.timeout_s > 0) {  // the board serves the watchdog alone
      board_ = std::make_shared<ProgressBoard>();
      track_ = ProgressBoard::track(board_, comm_);
    }
  } catch (...) {
    track_.reset();
    board_.reset();
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    if (owns_mpi_) MPI_Finalize();
    throw;
  }
  watchdog::set_rank(rank_);
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, const CommOptions& options,
                                 std::shared_ptr<ProgressBoard> board)
    : comm_(comm), options_(options), max_chunk_(std::clamp<int64_t>(options.max_chunk, 1, INT_MAX)),
      board_(std::move(board)) {
  MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MPI_CHECK(MPI_Comm_size(comm_, &size_));
  if (board_) track_ = ProgressBoard::track(board_, comm_);
}

MpiCommunicator::~MpiCommunicator() {
  track_.reset();
  board_.reset();  // the last holder frees the window, before MPI_Finalize
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  if (owns_mpi_) MPI_Finalize();
}

template <class T>
void MpiCommunicator::allreduce(T* data, int64_t n, MPI_Datatype type) {
  require_count(n, "allreduce_sum", "element");
  CollectiveScope watch(track(), watched("allreduce_sum", n, "elements"), options_.timeout_s);
  for (int64_t off = 0; off < n; off += max_chunk_) {
    const int count = int(std::min(max_chunk_, n - off));
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data + off, count, type, MPI_SUM, comm_));
  }
}

void MpiCommunicator::allreduce_sum(float* data, int64_t n) { allreduce(data, n, MPI_FLOAT); }
void MpiCommunicator::allreduce_sum(double* data, int64_t n) { allreduce(data, n, MPI_DOUBLE); }

std::unique_ptr<Work> MpiCommunicator::allreduce_sum_async(float* data, int64_t n) {
  require_count(n, "allreduce_sum_async", "element");
  const WatchedOp op =
      CollectiveScope::counted(track(), watched("allreduce_sum_async", n, "elements"));
  std::vector<MPI_Request> requests;
  for (int64_t off = 0; off < n; off += max_chunk_) {
    const int count = int(std::min(max_chunk_, n - off));
    MPI_Request r = MPI_REQUEST_NULL;
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data + off, count, MPI_FLOAT, MPI_SUM, comm_, &r));
    requests.push_back(r);
  }
  return std::make_unique<MpiWork>(std::move(requests), op, track(), options_.timeout_s);
}

void MpiCommunicator::broadcast(void* data, int64_t bytes, int root) {
  require_count(bytes, "broadcast", "byte");
  REFORMER_REQUIRE(root >= 0 && root < size_, CommError,
                   "broadcast: root " + std::to_string(root) + " is not a rank of " +
                       std::to_string(size_));
  CollectiveScope watch(track(), watched("broadcast", bytes, "bytes"), options_.timeout_s);
  char* p = static_cast<char*>(data);
  for (int64_t off = 0; off < bytes; off += max_chunk_) {
    const int count = int(std::min(max_chunk_, bytes - off));
    MPI_CHECK(MPI_Bcast(p + off, count, MPI_BYTE, root, comm_));
  }
}

void MpiCommunicator::allgather(const void* send, void* recv, int64_t bytes) {
  require_count(bytes, "allgather", "byte");
  CollectiveScope watch(track(), watched("allgather", bytes, "bytes"), options_.timeout_s);
  if (bytes <= max_chunk_) {
    MPI_CHECK(MPI_Allgather(send, int(bytes), MPI_BYTE, recv, int(bytes), MPI_BYTE, comm_));
    return;
  }
  const char* s = static_cast<const char*>(send);
  char* r = static_cast<char*>(recv);
  for (int64_t off = 0; off < bytes; off += max_chunk_) {
    const int len = int(std::min(max_chunk_, bytes - off));
    StridedBytes piece(len, bytes);
    MPI_CHECK(MPI_Allgather(s + off, len, MPI_BYTE, r + off, 1, piece.type, comm_));
  }
}

void MpiCommunicator::reduce_scatter_sum(const float* send, float* recv, int64_t n) {
  require_count(n, "reduce_scatter_sum", "element");
  CollectiveScope watch(track(), watched("reduce_scatter_sum", n, "elements"), options_.timeout_s);
  if (n <= max_chunk_) {
    MPI_CHECK(MPI_Reduce_scatter_block(send, recv, int(n), MPI_FLOAT, MPI_SUM, comm_));
    return;
  }
  // Blocks longer than one call: one reduction to each rank per piece.
  for (int root = 0; root < size_; ++root)
    for (int64_t off = 0; off < n; off += max_chunk_) {
      const int len = int(std::min(max_chunk_, n - off));
      MPI_CHECK(MPI_Reduce(send + int64_t(root) * n + off, root == rank_ ? recv + off : nullptr, len,
                           MPI_FLOAT, MPI_SUM, root, comm_));
    }
}

void MpiCommunicator::alltoall(const void* send, void* recv, int64_t bytes) {
  require_count(bytes, "alltoall", "byte");
  CollectiveScope watch(track(), watched("alltoall", bytes, "bytes"), options_.timeout_s);
  if (bytes <= max_chunk_) {
    MPI_CHECK(MPI_Alltoall(send, int(bytes), MPI_BYTE, recv, int(bytes), MPI_BYTE, comm_));
    return;
  }
  const char* s = static_cast<const char*>(send);
  char* r = static_cast<char*>(recv);
  for (int64_t off = 0; off < bytes; off += max_chunk_) {
    const int len = int(std::min(max_chunk_, bytes - off));
    StridedBytes piece(len, bytes);
    MPI_CHECK(MPI_Alltoall(s + off, 1, piece.type, r + off, 1, piece.type, comm_));
  }
}

void MpiCommunicator::alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_off,
                                void* recv, const int64_t* recv_bytes, const int64_t* recv_off) {
  bool fits = true;
  int64_t total = 0;
  for (int r = 0; r < size_; ++r) {
    for (int64_t v : {send_bytes[r], send_off[r], recv_bytes[r], recv_off[r]})
      REFORMER_REQUIRE(v >= 0, CommError,
                       "alltoallv: negative count or offset " + std::to_string(v) + " for rank " +
                           std::to_string(r));
    fits = fits && send_bytes[r] <= max_chunk_ && recv_bytes[r] <= max_chunk_ &&
           send_off[r] <= INT_MAX && recv_off[r] <= INT_MAX;
    total += send_bytes[r];
  }
  CollectiveScope watch(track(), watched("alltoallv", total, "bytes sent"), options_.timeout_s);
  if (fits) {
    const size_t p = static_cast<size_t>(size_);
    std::vector<int> sc(p), so(p), rc(p), ro(p);
    for (int r = 0; r < size_; ++r) {
      sc[size_t(r)] = int(send_bytes[r]);
      so[size_t(r)] = int(send_off[r]);
      rc[size_t(r)] = int(recv_bytes[r]);
      ro[size_t(r)] = int(recv_off[r]);
    }
    MPI_CHECK(MPI_Alltoallv(send, sc.data(), so.data(), MPI_BYTE, recv, rc.data(), ro.data(),
                            MPI_BYTE, comm_));
    return;
  }
  // Counts or offsets beyond one call: messages of at most max_chunk bytes
  // (non-overtaking between a pair, so the pieces arrive in order).
  std::vector<MPI_Request> requests;
  for (int r = 0; r < size_; ++r)
    for (int64_t off = 0; off < recv_bytes[r]; off += max_chunk_) {
      MPI_Request q = MPI_REQUEST_NULL;
      MPI_CHECK(MPI_Irecv(static_cast<char*>(recv) + recv_off[r] + off,
                          int(std::min(max_chunk_, recv_bytes[r] - off)), MPI_BYTE, r,
                          kAlltoallvTag, comm_, &q));
      requests.push_back(q);
    }
  for (int r = 0; r < size_; ++r)
    for (int64_t off = 0; off < send_bytes[r]; off += max_chunk_) {
      MPI_Request q = MPI_REQUEST_NULL;
      MPI_CHECK(MPI_Isend(static_cast<const char*>(send) + send_off[r] + off,
                          int(std::min(max_chunk_, send_bytes[r] - off)), MPI_BYTE, r,
                          kAlltoallvTag, comm_, &q));
      requests.push_back(q);
    }
  MPI_CHECK(MPI_Waitall(int(requests.size()), requests.data(), MPI_STATUSES_IGNORE));
}

void MpiCommunicator::check_peer(int peer, const char* op) const {
  REFORMER_REQUIRE(peer >= 0 && peer < size_ && peer != rank_, CommError,
                   std::string(op) + ": peer " + std::to_string(peer) + " is not another rank of " +
                       std::to_string(size_) + " (this is rank " + std::to_string(rank_) + ")");
}

void MpiCommunicator::send(const void* data, int64_t bytes, int peer) {
  require_count(bytes, "send", "byte");
  check_peer(peer, "send");
  WatchScope watch(watched("send", bytes, "bytes"), options_.timeout_s);
  const char* p = static_cast<const char*>(data);
  for (int64_t off = 0; off < bytes; off += max_chunk_)
    MPI_CHECK(MPI_Send(p + off, int(std::min(max_chunk_, bytes - off)), MPI_BYTE, peer, kSendTag, comm_));
}

void MpiCommunicator::recv(void* data, int64_t bytes, int peer) {
  require_count(bytes, "recv", "byte");
  check_peer(peer, "recv");
  WatchScope watch(watched("recv", bytes, "bytes"), options_.timeout_s);
  char* p = static_cast<char*>(data);
  for (int64_t off = 0; off < bytes; off += max_chunk_)
    MPI_CHECK(MPI_Recv(p + off, int(std::min(max_chunk_, bytes - off)), MPI_BYTE, peer, kSendTag,
                       comm_, MPI_STATUS_IGNORE));
}

void MpiCommunicator::barrier() {
  CollectiveScope watch(track(), watched("barrier", -1, ""), options_.timeout_s);
  MPI_CHECK(MPI_Barrier(comm_));
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  REFORMER_REQUIRE(color >= 0, CommError, "split: negative color " + std::to_string(color));
  MPI_Comm sub = MPI_COMM_NULL;
  {
    CollectiveScope watch(track(), watched("split", -1, ""), options_.timeout_s);
    MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  }
  try {
    return std::make_unique<MpiCommunicator>(sub, options_, board_);
  } catch (...) {
    MPI_Comm_free(&sub);
    throw;
  }
}

void MpiCommunicator::abort(int status) {
  MPI_Abort(MPI_COMM_WORLD, status);
  std::_Exit(status);  // MPI_Abort does not return; this satisfies [[noreturn]]
}

}  // namespace reformer
