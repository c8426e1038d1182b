// The communicator seam of the trainer.
//
// The trainer reduces gradients, losses and gradient norms only through this
// interface, so a one-process run and a multi-process run share one code
// path. Backends: local (one rank, here), MPI (host buffers) and NCCL
// (device buffers) implement the same calls.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace reformer {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const char* backend() const = 0;
  virtual int rank() const = 0;  // 0 .. size()-1
  virtual int size() const = 0;
  // In-place sum over all ranks of n elements; every rank gets the result.
  virtual void allreduce_sum(float* data, int64_t n) = 0;
  virtual void allreduce_sum(double* data, int64_t n) = 0;
  // Copies `bytes` bytes from rank `root` to every rank.
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Block r of send (bytes each) goes to rank r: recv[s * bytes ..] = rank s's
  // send[rank() * bytes ..]. (Provisional default: one rank only.)
  virtual void alltoall(const void* send, void* recv, int64_t bytes);
  // Ends every rank of the job with a non-zero status (a failing rank must not
  // leave the others hanging in a collective).
  [[noreturn]] virtual void abort(int status) = 0;
};

// One process, no communication: sums are identities.
class LocalCommunicator final : public Communicator {
 public:
  const char* backend() const override { return "local"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(float*, int64_t) override {}
  void allreduce_sum(double*, int64_t) override {}
  void broadcast(void*, int64_t, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(int status) override;
};

// The communicator named by `backend` ("local", "mpi", "nccl"). Throws
// CommError when the backend was not built in.
std::unique_ptr<Communicator> make_communicator(const std::string& backend);

}  // namespace reformer
