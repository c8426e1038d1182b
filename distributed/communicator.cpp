#include "distributed/communicator.h"

#include <cstdlib>

#include "framework/errors.h"

namespace reformer {

void LocalCommunicator::abort(int status) { std::exit(status); }

std::unique_ptr<Communicator> make_communicator(const std::string& backend) {
  if (backend == "local") return std::make_unique<LocalCommunicator>();
  throw CommError("communicator backend '" + backend +
                  "' is not available in this build (available: local)");
}

}  // namespace reformer
