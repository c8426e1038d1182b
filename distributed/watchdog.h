// The communicator watchdog: turns a collective that does not complete within
// its timeout into the end of the whole job, with a message naming the rank
// and the operation, instead of a job that hangs for ever.
//
// One background thread per process (started by the first watched call whose
// timeout is positive). Host-blocking calls register for their duration
// (WatchScope); device backends register a WatchSource that the thread polls
// for operations still in flight and for asynchronous errors. On a timeout
// the thread prints
//   reformer: [rank R] <operation> did not complete within T s (a rank is frozen, dead or out of step)
// to stderr, aborts every registered source (ncclCommAbort), and ends the job
// (MPI_Abort on MPI_COMM_WORLD when MPI is running, else _Exit(1)). The
// blocked thread itself usually sits inside MPI or NCCL, which is why this
// is a separate thread.
//
// Cost of a watched call: one mutex lock and one clock read on entry, one
// lock on exit; the operation's text is formatted only on a timeout.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace reformer {

// What is being waited for; formatted as
// "<backend> <op> (<amount> <unit>, <size> ranks)" (amount < 0: no amount).
struct WatchedOp {
  const char* backend = "";  // "mpi", "nccl"
  const char* op = "";       // "allreduce_sum", "barrier", ...
  int64_t amount = -1;       // elements or bytes
  const char* unit = "";     // "elements", "bytes"
  int ranks = 0;             // size of the communicator
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

// The message printed on a timeout (shared with sources that time out).
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
