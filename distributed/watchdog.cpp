#include "distributed/watchdog.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#ifdef REFORMER_HAVE_MPI
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>
#endif

namespace reformer {

std::string describe(const WatchedOp& op) {
  std::string s = std::string(op.backend) + " " + op.op + " (";
  if (op.amount >= 0) s += std::to_string(op.amount) + " " + op.unit + ", ";
  return s + std::to_string(op.ranks) + " ranks)";
}

namespace watchdog {
namespace {

// How often the thread looks at the registered calls: a timeout is noticed
// at most this late.
constexpr auto kPeriod = std::chrono::milliseconds(50);

struct Entry {
  uint64_t token;
  WatchedOp op;
  Clock::time_point start;
  double timeout_s;
};

class State {
 public:
  ~State() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  uint64_t begin(const WatchedOp& op, double timeout_s) {
    const Clock::time_point now = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    start_locked();
    const uint64_t token = ++next_token_;
    entries_.push_back({token, op, now, timeout_s});
    return token;
  }

  void end(uint64_t token) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < entries_.size(); ++i)
      if (entries_[i].token == token) {
        entries_[i] = entries_.back();
        entries_.pop_back();
        return;
      }
  }

  void add_source(WatchSource* s) {
    std::lock_guard<std::mutex> lock(mu_);
    start_locked();
    sources_.push_back(s);
  }

  // Waits for a poll in progress, so the source is never used after this.
  void remove_source(WatchSource* s) {
    std::lock_guard<std::mutex> polling(poll_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    sources_.erase(std::remove(sources_.begin(), sources_.end(), s), sources_.end());
  }

  void add_heartbeat(std::atomic<int64_t>* alive) {
    std::lock_guard<std::mutex> lock(mu_);
    start_locked();
    alive->store(heartbeat_now(), std::memory_order_relaxed);
    heartbeats_.push_back(alive);
  }

  // The thread writes heartbeats under mu_: none is touched after this.
  void remove_heartbeat(std::atomic<int64_t>* alive) {
    std::lock_guard<std::mutex> lock(mu_);
    heartbeats_.erase(std::remove(heartbeats_.begin(), heartbeats_.end(), alive), heartbeats_.end());
  }

  std::vector<WatchSource*> sources() {
    std::lock_guard<std::mutex> lock(mu_);
    return sources_;
  }

  std::atomic<int> rank{-1};

 private:
  void start_locked() {
    if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
  }

  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, kPeriod);
      if (stop_) break;
      const Clock::time_point now = Clock::now();
      for (std::atomic<int64_t>* alive : heartbeats_)
        alive->store(heartbeat_now(), std::memory_order_relaxed);
      for (const Entry& e : entries_)
        if (std::chrono::duration<double>(now - e.start).count() > e.timeout_s) {
          const std::string msg = timeout_message(e.op, e.timeout_s);
          lock.unlock();
          end_job(msg);
        }
      if (sources_.empty()) continue;
      lock.unlock();
      {
        // Sources lock their own state and may call begin() meanwhile: poll
        // them without mu_ held, under poll_mu_ so none is removed meanwhile.
        std::lock_guard<std::mutex> polling(poll_mu_);
        for (WatchSource* s : sources()) {
          const std::string msg = s->poll(now);
          if (!msg.empty()) end_job(msg);
        }
      }
      lock.lock();
    }
  }

  std::mutex mu_;       // entries_, sources_, heartbeats_, stop_
  std::mutex poll_mu_;  // held while sources are polled
  std::condition_variable cv_;
  std::vector<Entry> entries_;
  std::vector<WatchSource*> sources_;
  std::vector<std::atomic<int64_t>*> heartbeats_;
  uint64_t next_token_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

State& state() {
  static State s;
  return s;
}

}  // namespace

void set_rank(int rank) { state().rank.store(rank); }

uint64_t begin(const WatchedOp& op, double timeout_s) {
  if (!(timeout_s > 0)) return 0;
  return state().begin(op, timeout_s);
}

void end(uint64_t token) {
  if (token != 0) state().end(token);
}

void add_source(WatchSource* source) { state().add_source(source); }
void add_heartbeat(std::atomic<int64_t>* alive) { state().add_heartbeat(alive); }
void remove_heartbeat(std::atomic<int64_t>* alive) { state().remove_heartbeat(alive); }

int64_t heartbeat_now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}
void remove_source(WatchSource* source) { state().remove_source(source); }

std::string timeout_message(const WatchedOp& op, double timeout_s) {
  char t[32];
  std::snprintf(t, sizeof t, "%g", timeout_s);
  const std::string head = describe(op) + " did not complete within " + t + " s";
  const std::string missing = op.probe && op.seq > 0 ? op.probe->missing(op.seq) : "";
  return missing.empty() ? head + " (a rank is frozen, dead or out of step)" : head + ": " + missing;
}

void end_job(const std::string& message) {
  std::fprintf(stderr, "reformer: [rank %d] %s\n", state().rank.load(), message.c_str());
  std::fflush(stderr);
  for (WatchSource* s : state().sources()) s->abort_now();
#ifdef REFORMER_HAVE_MPI
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
  std::_Exit(1);
}

}  // namespace watchdog
}  // namespace reformer
