#include "distributed/mpi_progress.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <new>

#include "kernels/errors.h"

namespace reformer {

namespace {

// A heartbeat older than this says the rank is not running (frozen or dead):
// the watchdog thread advances it every 50 ms.
constexpr double kStaleHeartbeatS = 1.0;

uint32_t op_index(const char* op) {
  const auto& names = progress_op_names();
  for (size_t i = 1; i < names.size(); ++i)
    if (std::strcmp(op, names[i]) == 0) return uint32_t(i);
  return 0;
}

std::string collective(uint64_t n, uint32_t op) {
  const auto& names = progress_op_names();
  std::string s = "#";
  s += std::to_string(n);
  s += ' ';
  return s + names[op < names.size() ? op : 0];
}

}  // namespace

const std::vector<const char*>& progress_op_names() {
  static const std::vector<const char*> names = {
      "?", "allreduce_sum", "allreduce_sum_async", "broadcast", "allgather", "reduce_scatter_sum",
      "alltoall", "alltoallv", "barrier", "split", "ncclCommSplit"};
  return names;
}

// ------------------------------------------------------------------ track

uint64_t ProgressTrack::enter(const char* op) {
  if (!mine_) return 0;
  mine_->entered_op.store(op_index(op), std::memory_order_relaxed);
  return mine_->entered.fetch_add(1, std::memory_order_release) + 1;
}

void ProgressTrack::complete(const char* op) {
  if (!mine_) return;
  mine_->completed_op.store(op_index(op), std::memory_order_relaxed);
  mine_->completed.fetch_add(1, std::memory_order_release);
}

std::string ProgressTrack::missing(uint64_t seq) const {
  if (!mine_) return "";
  const int64_t now = watchdog::heartbeat_now();
  std::string out;
  for (size_t r = 0; r < members_.size(); ++r) {
    const Member& m = members_[r];
    if (int(r) == rank_ || !m.counters) continue;
    const uint64_t entered = m.counters->entered.load(std::memory_order_acquire);
    const uint64_t completed = m.counters->completed.load(std::memory_order_acquire);
    const double quiet_s = double(now - m.alive->load(std::memory_order_relaxed)) * 1e-9;
    const bool stopped = quiet_s > kStaleHeartbeatS;
    const bool arrived = entered >= seq;
    if (arrived && !stopped) continue;
    char quiet[64];
    std::snprintf(quiet, sizeof quiet, "no heartbeat for %.1f s", quiet_s);
    std::string what = "rank " + std::to_string(m.world_rank) +
                       (arrived ? " entered it but is not running" : " did not arrive") +
                       (stopped && !arrived ? " and is not running" : "") + " (";
    if (stopped) what += std::string(quiet) + "; ";
    what += completed == 0 ? std::string("it has completed no collective on this communicator")
                           : "its last completed collective is " +
                                 collective(completed, m.counters->completed_op.load());
    if (entered > completed)
      what += ", it waits in " + collective(entered, m.counters->entered_op.load());
    what += "; this rank waits in #" + std::to_string(seq) + ")";
    out += (out.empty() ? "" : "; ") + what;
  }
  return out;
}

// ------------------------------------------------------------------ board

ProgressBoard::ProgressBoard() {
  int world_rank = 0, world_size = 1, node_rank = 0, node_size = 1;
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_size));
  MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL,
                                &node_));
  try {
    MPI_CHECK(MPI_Comm_set_errhandler(node_, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(node_, &node_rank));
    MPI_CHECK(MPI_Comm_size(node_, &node_size));
    void* base = nullptr;
    MPI_CHECK(MPI_Win_allocate_shared(MPI_Aint(sizeof(Segment)), 1, MPI_INFO_NULL, node_, &base,
                                      &win_));
    mine_ = new (base) Segment();
    std::vector<int> world_of(static_cast<size_t>(node_size));
    MPI_CHECK(MPI_Allgather(&world_rank, 1, MPI_INT, world_of.data(), 1, MPI_INT, node_));
    MPI_CHECK(MPI_Barrier(node_));  // every Segment is constructed
    by_world_.assign(static_cast<size_t>(world_size), nullptr);
    for (int n = 0; n < node_size; ++n) {
      MPI_Aint bytes = 0;
      int unit = 0;
      void* peer = nullptr;
      MPI_CHECK(MPI_Win_shared_query(win_, n, &bytes, &unit, &peer));
      by_world_[size_t(world_of[size_t(n)])] = static_cast<Segment*>(peer);
    }
  } catch (...) {
    if (win_ != MPI_WIN_NULL) MPI_Win_free(&win_);
    MPI_Comm_free(&node_);
    throw;
  }
  watchdog::add_heartbeat(&mine_->alive);
}

ProgressBoard::~ProgressBoard() {
  watchdog::remove_heartbeat(&mine_->alive);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  MPI_Win_free(&win_);
  MPI_Comm_free(&node_);
}

std::unique_ptr<ProgressTrack> ProgressBoard::track(const std::shared_ptr<ProgressBoard>& self,
                                                    MPI_Comm comm) {
  auto t = std::make_unique<ProgressTrack>();
  int slot = self->next_slot_, size = 1;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &slot, 1, MPI_INT, MPI_MAX, comm));
  MPI_CHECK(MPI_Comm_rank(comm, &t->rank_));
  MPI_CHECK(MPI_Comm_size(comm, &size));
  if (slot >= kSlots) return t;  // untracked: timeouts give the generic message
  self->next_slot_ = slot + 1;
  // The members' world ranks.
  MPI_Group group = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
  std::vector<int> ranks(static_cast<size_t>(size)), world_ranks(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) ranks[size_t(r)] = r;
  MPI_CHECK(MPI_Comm_group(comm, &group));
  MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world));
  const int rc = MPI_Group_translate_ranks(group, size, ranks.data(), world, world_ranks.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world);
  MPI_CHECK(rc);
  for (int w : world_ranks) {
    ProgressTrack::Member m;
    m.world_rank = w;
    if (const Segment* s = w >= 0 ? self->by_world_[size_t(w)] : nullptr) {
      m.counters = &s->slots[slot];
      m.alive = &s->alive;
    }
    t->members_.push_back(m);
  }
  t->mine_ = &self->mine_->slots[slot];
  t->board_ = self;
  return t;
}

}  // namespace reformer
