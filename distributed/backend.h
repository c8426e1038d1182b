// Names of the communicator backends, parsed once from the configuration.
#pragma once

#include <optional>
#include <string_view>

namespace reformer {

enum class CommBackend { local, mpi, nccl };

inline const char* to_string(CommBackend b) {
  switch (b) {
    case CommBackend::local: return "local";
    case CommBackend::mpi: return "mpi";
    case CommBackend::nccl: return "nccl";
  }
  return "?";
}

inline std::optional<CommBackend> parse_comm_backend(std::string_view s) {
  if (s == "local") return CommBackend::local;
  if (s == "mpi") return CommBackend::mpi;
  if (s == "nccl") return CommBackend::nccl;
  return std::nullopt;
}

}  // namespace reformer
