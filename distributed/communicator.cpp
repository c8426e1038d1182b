#include "distributed/communicator.h"

#include <cstdlib>
#include <cstring>

#include "kernels/errors.h"

#ifdef REFORMER_HAVE_MPI
#include "distributed/mpi_communicator.h"
#endif

namespace reformer {

void Communicator::alltoall(const void* send, void* recv, int64_t bytes) {
  REFORMER_REQUIRE(size() == 1, CommError, "alltoall is not available in this backend");
  std::memcpy(recv, send, size_t(bytes));
}

void LocalCommunicator::abort(int status) { std::exit(status); }

std::unique_ptr<Communicator> make_communicator(const std::string& backend) {
#ifdef REFORMER_HAVE_MPI
  constexpr const char* kAvailable = "local, mpi";
#else
  constexpr const char* kAvailable = "local";
#endif
  if (backend == "local") return std::make_unique<LocalCommunicator>();
  if (backend == "mpi") {
#ifdef REFORMER_HAVE_MPI
    return std::make_unique<MpiCommunicator>();
#else
    throw CommError(
        "communicator backend 'mpi' is not available: built without MPI (CMake found no MPI "
        "library, or REFORMER_MPI=OFF); available: " + std::string(kAvailable));
#endif
  }
  if (backend == "nccl")
    throw CommError(
        "communicator backend 'nccl' is not available: this build has no NCCL communicator (it "
        "needs CUDA, NCCL and MPI, and is not implemented yet); available: " +
        std::string(kAvailable));
  throw CommError("communicator backend '" + backend +
                  "' is not available in this build (available: " + kAvailable + ")");
}

}  // namespace reformer
