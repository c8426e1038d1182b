// The GPU a rank of an MPI job computes on, for the backends with device
// buffers (NCCL, nccl_communicator.h; MPI staged through the host,
// mpi_staged_communicator.h). Built where CMake finds CUDA and MPI.
#pragma once

#include <string>

#include "distributed/mpi_communicator.h"

namespace reformer {

// Node-local rank modulo the GPUs the rank sees, made current
// (cudaSetDevice); `sharers` ranks of the host take the same one.
struct NodeGpu {
  int device = 0;
  int sharers = 1;
  std::string description;  // "rank R on host H uses GPU d (name, bus id)"
};

// This rank's NodeGpu. Throws CommError when the rank sees no GPU (naming
// `backend`, the config's parallel.backend).
NodeGpu choose_node_gpu(MpiCommunicator& mpi, const char* backend);

}  // namespace reformer
