// Typed errors thrown by library code. Only launch/main.cpp prints and exits;
// everything below it reports failure by throwing one of these.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace reformer {

// Base of every error the framework throws on purpose.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A configuration value is unknown, of the wrong type or out of range.
// The message names the key, the file and the line. The CLI exits with 2.
struct ConfigError : Error {
  using Error::Error;
};

// A data file is missing, unreadable or too short for the requested split.
struct DataError : Error {
  using Error::Error;
};

// A checkpoint is missing, truncated, corrupt or does not match the model.
struct CheckpointError : Error {
  using Error::Error;
};

// Shapes or arguments passed to an op or layer do not agree.
struct ShapeError : Error {
  using Error::Error;
};

// A communicator call failed (MPI, NCCL).
struct CommError : Error {
  using Error::Error;
};

// A device runtime call failed (CUDA, cuBLAS).
struct DeviceError : Error {
  using Error::Error;
};

// A device allocation failed for want of memory: `requested` bytes were
// asked for while the device had `free_bytes` of `total_bytes` free (as it
// reported right after the failure; 0 where unknown).
struct OutOfMemoryError : DeviceError {
  OutOfMemoryError(const std::string& what, int64_t requested_bytes, int64_t free, int64_t total)
      : DeviceError(what), requested(requested_bytes), free_bytes(free), total_bytes(total) {}
  int64_t requested = 0, free_bytes = 0, total_bytes = 0;
};

// Training produced a non-finite loss or gradient.
struct NonFiniteError : Error {
  using Error::Error;
};

// Builds "what (at file:line)" for the CHECK macros.
std::string where(const char* what, const char* file, int line);

}  // namespace reformer

// REFORMER_REQUIRE(cond, ErrorType, message): throw ErrorType if cond is false.
#define REFORMER_REQUIRE(cond, Err, msg)                                   \
  do {                                                                     \
    if (!(cond)) throw Err(::reformer::where((std::string(msg)).c_str(),   \
                                             __FILE__, __LINE__));         \
  } while (0)
