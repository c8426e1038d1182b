#include "distributed/mpi_staged_communicator.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "kernels/cuda/check.h"
#include "kernels/errors.h"

namespace reformer {

namespace {

class DoneWork final : public Work {
 public:
  void wait() override {}
};

// The end of the furthest of n blocks (counts and offsets checked >= 0).
int64_t extent(const int64_t* bytes, const int64_t* off, int n, const char* op) {
  int64_t end = 0;
  for (int r = 0; r < n; ++r) {
    REFORMER_REQUIRE(bytes[r] >= 0 && off[r] >= 0, CommError,
                     std::string(op) + ": negative count or offset for rank " + std::to_string(r));
    if (bytes[r] > 0) end = std::max(end, off[r] + bytes[r]);
  }
  return end;
}

}  // namespace

StagedMpiCommunicator::StagedMpiCommunicator(const CommOptions& options)
    : mpi_(std::make_unique<MpiCommunicator>(options)) {
  gpu_ = choose_node_gpu(*mpi_, "mpi");
  gpu_.description += gpu_.sharers > 1 ? " with " + std::to_string(gpu_.sharers - 1) +
                                             " other rank(s), collectives through host memory"
                                       : ", collectives through host memory";
}

StagedMpiCommunicator::StagedMpiCommunicator(std::unique_ptr<MpiCommunicator> mpi, NodeGpu gpu,
                                             cudaStream_t compute)
    : mpi_(std::move(mpi)), gpu_(std::move(gpu)), compute_(compute) {}

char* StagedMpiCommunicator::HostBuffer::get(int64_t bytes) {
  if (bytes <= bytes_) return p_;
  release();
  void* p = nullptr;
  if (cudaMallocHost(&p, size_t(bytes)) == cudaSuccess) {
    p_ = static_cast<char*>(p);
    pinned_ = true;
  } else {
    cudaGetLastError();  // clear the refusal: pageable memory serves
    pageable_.resize(size_t(bytes));
    p_ = pageable_.data();
  }
  bytes_ = bytes;
  return p_;
}

void StagedMpiCommunicator::HostBuffer::release() {
  if (pinned_) cudaFreeHost(p_);
  std::vector<char>().swap(pageable_);  // frees it (assigning {} may keep the capacity)
  p_ = nullptr;
  bytes_ = 0;
  pinned_ = false;
}

char* StagedMpiCommunicator::send_buffer(int64_t bytes) { return send_.get(bytes); }
char* StagedMpiCommunicator::recv_buffer(int64_t bytes) { return recv_.get(bytes); }

void StagedMpiCommunicator::to_host(void* host, const void* device, int64_t bytes) {
  if (bytes <= 0) return;
  CUDA_CHECK(cudaMemcpyAsync(host, device, size_t(bytes), cudaMemcpyDeviceToHost, compute_));
  CUDA_CHECK(cudaStreamSynchronize(compute_));
}

void StagedMpiCommunicator::to_device(void* device, const void* host, int64_t bytes) {
  if (bytes <= 0) return;
  CUDA_CHECK(cudaMemcpyAsync(device, host, size_t(bytes), cudaMemcpyHostToDevice, compute_));
  CUDA_CHECK(cudaStreamSynchronize(compute_));
}

template <class T>
void StagedMpiCommunicator::allreduce(T* data, int64_t n) {
  const int64_t bytes = n * int64_t(sizeof(T));
  T* h = reinterpret_cast<T*>(send_buffer(bytes));
  to_host(h, data, bytes);
  mpi_->allreduce_sum(h, n);
  to_device(data, h, bytes);
}

void StagedMpiCommunicator::allreduce_sum(float* data, int64_t n) { allreduce(data, n); }
void StagedMpiCommunicator::allreduce_sum(double* data, int64_t n) { allreduce(data, n); }

std::unique_ptr<Work> StagedMpiCommunicator::allreduce_sum_async(float* data, int64_t n) {
  allreduce(data, n);
  return std::make_unique<DoneWork>();
}

void StagedMpiCommunicator::broadcast(void* data, int64_t bytes, int root) {
  char* h = send_buffer(bytes);
  if (rank() == root) to_host(h, data, bytes);
  mpi_->broadcast(h, bytes, root);
  if (rank() != root) to_device(data, h, bytes);
}

void StagedMpiCommunicator::allgather(const void* send, void* recv, int64_t bytes) {
  char* hs = send_buffer(bytes);
  char* hr = recv_buffer(bytes * size());
  to_host(hs, send, bytes);
  mpi_->allgather(hs, hr, bytes);
  to_device(recv, hr, bytes * size());
}

void StagedMpiCommunicator::reduce_scatter_sum(const float* send, float* recv, int64_t n) {
  const int64_t bytes = n * int64_t(sizeof(float));
  float* hs = reinterpret_cast<float*>(send_buffer(bytes * size()));
  float* hr = reinterpret_cast<float*>(recv_buffer(bytes));
  to_host(hs, send, bytes * size());
  mpi_->reduce_scatter_sum(hs, hr, n);
  to_device(recv, hr, bytes);
}

void StagedMpiCommunicator::alltoall(const void* send, void* recv, int64_t bytes) {
  char* hs = send_buffer(bytes * size());
  char* hr = recv_buffer(bytes * size());
  to_host(hs, send, bytes * size());
  mpi_->alltoall(hs, hr, bytes);
  to_device(recv, hr, bytes * size());
}

void StagedMpiCommunicator::alltoallv(const void* send, const int64_t* send_bytes,
                                      const int64_t* send_off, void* recv,
                                      const int64_t* recv_bytes, const int64_t* recv_off) {
  const int64_t se = extent(send_bytes, send_off, size(), "alltoallv");
  const int64_t re = extent(recv_bytes, recv_off, size(), "alltoallv");
  char* hs = send_buffer(se);
  char* hr = recv_buffer(re);
  to_host(hs, send, se);
  mpi_->alltoallv(hs, send_bytes, send_off, hr, recv_bytes, recv_off);
  // Block by block: bytes of recv between the blocks keep what they held.
  for (int s = 0; s < size(); ++s)
    if (recv_bytes[s] > 0)
      CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(recv) + recv_off[s], hr + recv_off[s],
                                 size_t(recv_bytes[s]), cudaMemcpyHostToDevice, compute_));
  CUDA_CHECK(cudaStreamSynchronize(compute_));
}

void StagedMpiCommunicator::send(const void* data, int64_t bytes, int peer) {
  mpi_->check_peer(peer, "send");  // before the copy reads data
  char* h = send_buffer(bytes);
  to_host(h, data, bytes);
  mpi_->send(h, bytes, peer);
}

void StagedMpiCommunicator::recv(void* data, int64_t bytes, int peer) {
  char* h = recv_buffer(bytes);
  mpi_->recv(h, bytes, peer);
  to_device(data, h, bytes);
}

std::unique_ptr<Communicator> StagedMpiCommunicator::split(int color, int key) {
  std::unique_ptr<MpiCommunicator> sub(static_cast<MpiCommunicator*>(mpi_->split(color, key).release()));
  return std::unique_ptr<Communicator>(new StagedMpiCommunicator(std::move(sub), gpu_, compute_));
}

}  // namespace reformer
