// The MPI backend for device buffers: every call waits for the compute
// stream, copies its device buffers into host memory, makes the
// MpiCommunicator's call there and copies the results back.
//
// For ranks that share a GPU - a multi-rank layout tried on a machine with
// one GPU, the GPU suite's layout tests (tests/gpu_mpi) - and for hosts
// without NCCL. Every call blocks the host and moves its bytes over the
// host link twice: a correctness path, not a fast one; NCCL is the backend
// for speed. Built where CMake finds CUDA and MPI (REFORMER_HAVE_STAGED_MPI).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "distributed/mpi_communicator.h"
#include "distributed/mpi_node_gpu.h"

namespace reformer {

class StagedMpiCommunicator final : public Communicator {
 public:
  // Starts MPI's communicator (as MpiCommunicator) and takes this rank's GPU
  // (choose_node_gpu).
  explicit StagedMpiCommunicator(const CommOptions& options = {});

  const char* backend() const override { return "mpi"; }
  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  bool device_buffers() const override { return true; }
  int ranks_on_device() const override { return gpu_.sharers; }
  Communicator& host() override { return *mpi_; }
  void set_compute_stream(void* stream) override { compute_ = static_cast<cudaStream_t>(stream); }
  const std::string& description() const { return gpu_.description; }

  void allreduce_sum(float* data, int64_t n) override;
  void allreduce_sum(double* data, int64_t n) override;
  // Complete when it returns (the Work's wait() has nothing left to do).
  std::unique_ptr<Work> allreduce_sum_async(float* data, int64_t n) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void allgather(const void* send, void* recv, int64_t bytes) override;
  void reduce_scatter_sum(const float* send, float* recv, int64_t n) override;
  void alltoall(const void* send, void* recv, int64_t bytes) override;
  void alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_off, void* recv,
                 const int64_t* recv_bytes, const int64_t* recv_off) override;
  void send(const void* data, int64_t bytes, int peer) override;
  void recv(void* data, int64_t bytes, int peer) override;
  void barrier() override { mpi_->barrier(); }
  std::unique_ptr<Communicator> split(int color, int key) override;
  [[noreturn]] void abort(int status) override { mpi_->abort(status); }

 private:
  StagedMpiCommunicator(std::unique_ptr<MpiCommunicator> mpi, NodeGpu gpu, cudaStream_t compute);
  template <class T>
  void allreduce(T* data, int64_t n);
  // Host staging buffers of at least `bytes` (kept between calls).
  char* send_buffer(int64_t bytes);
  char* recv_buffer(int64_t bytes);
  // Copies on the compute stream, returning once done (so a copy to the
  // device sees every kernel issued before the call, and one from it
  // precedes every kernel issued after).
  void to_host(void* host, const void* device, int64_t bytes);
  void to_device(void* device, const void* host, int64_t bytes);

  // Host memory that grows to the largest request: page-locked where the
  // driver grants it (copied by DMA directly; pageable memory goes through
  // the driver's own staging copy), pageable otherwise. Its speed here is
  // not measured.
  class HostBuffer {
   public:
    HostBuffer() = default;
    HostBuffer(const HostBuffer&) = delete;
    HostBuffer& operator=(const HostBuffer&) = delete;
    ~HostBuffer() { release(); }
    char* get(int64_t bytes);

   private:
    void release();
    char* p_ = nullptr;
    int64_t bytes_ = 0;
    bool pinned_ = false;
    std::vector<char> pageable_;
  };

  std::unique_ptr<MpiCommunicator> mpi_;
  NodeGpu gpu_;
  cudaStream_t compute_ = nullptr;
  HostBuffer send_, recv_;
};

}  // namespace reformer
