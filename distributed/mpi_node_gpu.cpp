#include "distributed/mpi_node_gpu.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include "kernels/cuda/check.h"
#include "kernels/errors.h"

namespace reformer {

namespace {

std::string host_name() {
  char h[256] = {0};
  if (gethostname(h, sizeof h - 1) != 0) return "?";
  return h;
}

}  // namespace

NodeGpu choose_node_gpu(MpiCommunicator& mpi, const char* backend) {
  const NodeRanks local = node_ranks(mpi.comm());
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0)
    throw CommError(std::string("parallel.backend ") + backend +
                    " with device buffers needs a CUDA GPU on every rank; rank " +
                    std::to_string(mpi.rank()) + " sees none (" +
                    (e != cudaSuccess ? cudaGetErrorString(e) : "no device") +
                    "): use parallel.backend mpi with training.device cpu on CPUs");
  NodeGpu g;
  g.device = local.rank % count;
  // Node-local ranks l with l % count == device.
  g.sharers = local.size / count + (g.device < local.size % count ? 1 : 0);
  CUDA_CHECK(cudaSetDevice(g.device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, g.device));
  char bus[32] = {0};
  CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof bus, g.device));
  g.description = "rank " + std::to_string(mpi.rank()) + " on host " + host_name() +
                  " uses GPU " + std::to_string(g.device) + " (" + prop.name + ", " + bus + ")";
  return g;
}

}  // namespace reformer
