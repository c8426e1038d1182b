// How far each rank has got, published where the other ranks of its host can
// read it without its help (the watchdog's "who did not arrive", watchdog.h).
//
// One ProgressBoard per process: an MPI-3 shared-memory window over the ranks
// of a host, holding for every rank a heartbeat (advanced by the watchdog
// thread) and one Counters slot per communicator. A ProgressTrack is one
// communicator's view: the slot it counts in (the same index on every
// member) and its members' slots where they share this host.
#pragma once

#include "distributed/mpi_communicator.h"

#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace reformer {

// One rank's collectives on one communicator (in shared memory).
struct ProgressCounters {
  std::atomic<uint64_t> entered{0};       // collectives started (issued, for non-blocking ones)
  std::atomic<uint64_t> completed{0};     // collectives completed
  std::atomic<uint32_t> entered_op{0};    // the last one started: an index of progress_op_names()
  std::atomic<uint32_t> completed_op{0};  // the last one completed
};

// The names ProgressCounters store by index; 0 is "?" (a name not listed).
const std::vector<const char*>& progress_op_names();

class ProgressBoard;

class ProgressTrack final : public PeerProbe {
 public:
  // Counts this rank's collective `op` ("allreduce_sum", ...) as started;
  // returns its number on the communicator (1-based), 0 when untracked.
  uint64_t enter(const char* op);
  // Counts one collective `op` as completed (in the order they started).
  void complete(const char* op);
  std::string missing(uint64_t seq) const override;

 private:
  friend class ProgressBoard;
  struct Member {
    int world_rank = -1;
    const ProgressCounters* counters = nullptr;   // null: on another host
    const std::atomic<int64_t>* alive = nullptr;  // its heartbeat (Clock ns)
  };
  ProgressCounters* mine_ = nullptr;  // null: no slot left (nothing is counted)
  int rank_ = 0;                      // this rank in the communicator
  std::vector<Member> members_;       // by communicator rank
  std::shared_ptr<ProgressBoard> board_;  // keeps the window mapped
};

class ProgressBoard {
 public:
  // Collective over MPI_COMM_WORLD: maps the window and starts this rank's
  // heartbeat. Throws CommError when a call fails.
  ProgressBoard();
  // Stops the heartbeat and frees the window (collective over the host's
  // ranks, as every rank's MPI_Finalize is); nothing after MPI_Finalize.
  ~ProgressBoard();
  ProgressBoard(const ProgressBoard&) = delete;
  ProgressBoard& operator=(const ProgressBoard&) = delete;

  // Collective over `comm`: a slot for it, at the same index on every member
  // (untracked once the slots run out). `self` keeps the board alive.
  static std::unique_ptr<ProgressTrack> track(const std::shared_ptr<ProgressBoard>& self,
                                              MPI_Comm comm);

  static constexpr int kSlots = 32;  // communicators tracked per process

 private:
  struct Segment {  // one rank's part of the window
    std::atomic<int64_t> alive{0};
    ProgressCounters slots[kSlots];
  };
  MPI_Comm node_ = MPI_COMM_NULL;  // the ranks of this host
  MPI_Win win_ = MPI_WIN_NULL;
  Segment* mine_ = nullptr;
  std::vector<Segment*> by_world_;  // by world rank; null for other hosts
  int next_slot_ = 0;               // first slot no communicator of this rank uses
};

}  // namespace reformer

namespace reformer {

// Watches one collective for the scope's lifetime (WatchScope) and counts it
// on `track` (may be null): started on construction, completed when the
// scope ends without an exception.
class CollectiveScope {
 public:
  CollectiveScope(ProgressTrack* track, const WatchedOp& op, double timeout_s)
      : track_(track), op_(counted(track, op)), watch_(op_, timeout_s) {}
  ~CollectiveScope() {
    if (track_ && std::uncaught_exceptions() == exceptions_) track_->complete(op_.op);
  }
  CollectiveScope(const CollectiveScope&) = delete;
  CollectiveScope& operator=(const CollectiveScope&) = delete;

  // `op` with its probe and its number on `track`, counted as started.
  static WatchedOp counted(ProgressTrack* track, WatchedOp op) {
    if (track) {
      op.probe = track;
      op.seq = track->enter(op.op);
    }
    return op;
  }

 private:
  ProgressTrack* track_;
  WatchedOp op_;
  WatchScope watch_;
  int exceptions_ = std::uncaught_exceptions();
};

}  // namespace reformer
