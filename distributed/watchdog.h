// The communicator watchdog: turns a collective that does not complete within
// its timeout into the end of the whole job, with a message naming the rank,
// the operation and, where it can tell, the ranks that did not arrive,
// instead of a job that hangs for ever.
//
// One background thread per process (started by the first watched call whose
// timeout is positive, or by the first heartbeat). Host-blocking calls
// register for their duration (WatchScope); device backends register a
// WatchSource that the thread polls for operations still in flight and for
// asynchronous errors. On a timeout the thread prints
//   reformer: [rank R] <operation> did not complete within T s: rank P did not arrive (...)
// or, when it cannot tell who is missing,
//   reformer: [rank R] <operation> did not complete within T s (a rank is frozen, dead or out of step)
// to stderr, aborts every registered source (ncclCommAbort), and ends the job
// (MPI_Abort on MPI_COMM_WORLD when MPI is running, else _Exit(1)). The
// blocked thread itself usually sits inside MPI or NCCL, which is why this
// is a separate thread.
//
// Who did not arrive. A rank that times out must learn what its peers are
// doing without their help: a frozen process (SIGSTOP, a hung driver call)
// and a dead one answer nothing, and any question that needs an answer
// (a message, an MPI one-sided get whose progress needs the target over TCP)
// could hang the watchdog itself. So every rank publishes, per communicator,
// how many collectives it has entered and completed (and the last of each),
// plus a heartbeat that this thread advances every period, in memory it
// shares with the other ranks of its host (an MPI-3 shared-memory window,
// distributed/mpi_progress.h). On a timeout the thread only reads that
// memory: the probe is bounded, needs no MPI call (so no MPI thread level
// beyond the one the communicator already has: the thread calls MPI only to
// abort) and cannot hang. Peers on other hosts cannot be read this way; when
// no peer it can read explains the wait, the message falls back to the
// generic one. The window is released by MPI with the job, so nothing is left
// behind when a rank is killed.
//
// Cost of a watched call: one mutex lock and one clock read on entry, one
// lock on exit, and two relaxed stores to the shared counters; the
// operation's text is formatted only on a timeout.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace reformer {

class PeerProbe;

// What is being waited for; formatted as
// "<backend> <op> (<amount> <unit>, <size> ranks)" (amount < 0: no amount).
struct WatchedOp {
  const char* backend = "";  // "mpi", "nccl"
  const char* op = "";       // "allreduce_sum", "barrier", ...
  int64_t amount = -1;       // elements or bytes
  const char* unit = "";     // "elements", "bytes"
  int ranks = 0;             // size of the communicator
  const PeerProbe* probe = nullptr;  // the communicator's peers' progress; null: none
  uint64_t seq = 0;          // this rank's number of the collective on it (1-based); 0: none
};

// Reads how far the other ranks of one communicator have got, from memory
// they publish it in, without their participation.
class PeerProbe {
 public:
  virtual ~PeerProbe() = default;
  // Called on a timeout of this rank's collective number `seq` (1-based) on
  // the communicator: text naming each rank that did not enter it or no
  // longer runs, e.g. "rank 1 did not arrive (...)", or "" when the ranks it
  // can read explain nothing. Only reads memory: never blocks.
  virtual std::string missing(uint64_t seq) const = 0;
};

std::string describe(const WatchedOp& op);

// A device backend's operations in flight, polled by the watchdog thread
// (never from the thread that issues them: implementations lock their own
// state).
class WatchSource {
 public:
  virtual ~WatchSource() = default;
  // An empty string when all is well; otherwise the complete reason to end
  // the job (an operation older than its timeout, an asynchronous error).
  virtual std::string poll(std::chrono::steady_clock::time_point now) = 0;
  // Called from the watchdog thread just before the job is ended; must not
  // block on the operations in flight (ncclCommAbort).
  virtual void abort_now() = 0;
};

namespace watchdog {

using Clock = std::chrono::steady_clock;

// The rank named in messages (the world rank; set by the first communicator).
void set_rank(int rank);

// Registers a blocking operation; returns a token for end(), or 0 when
// timeout_s <= 0 (not watched).
uint64_t begin(const WatchedOp& op, double timeout_s);
void end(uint64_t token);

void add_source(WatchSource* source);
void remove_source(WatchSource* source);

// Advances `*alive` to the current Clock time in nanoseconds every period
// (starting the thread) until remove_heartbeat(alive), which returns once
// the thread no longer touches it.
void add_heartbeat(std::atomic<int64_t>* alive);
void remove_heartbeat(std::atomic<int64_t>* alive);
// The current Clock time as a heartbeat stores it.
int64_t heartbeat_now();

// The message printed on a timeout (shared with sources that time out); it
// names the missing ranks when op.probe tells them.
std::string timeout_message(const WatchedOp& op, double timeout_s);

// Prints `message` as "reformer: [rank R] <message>", aborts every source and
// ends the job. Used by the watchdog thread; callable from any thread.
[[noreturn]] void end_job(const std::string& message);

}  // namespace watchdog

// Watches one blocking call for the lifetime of the scope.
class WatchScope {
 public:
  WatchScope(const WatchedOp& op, double timeout_s) : token_(watchdog::begin(op, timeout_s)) {}
  ~WatchScope() { watchdog::end(token_); }
  WatchScope(const WatchScope&) = delete;
  WatchScope& operator=(const WatchScope&) = delete;

 private:
  uint64_t token_;
};

}  // namespace reformer
