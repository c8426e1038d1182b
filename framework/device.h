// Chooses the Ops implementation a run computes with.
#pragma once

#include <cstdint>
#include <memory>

#include "framework/config.h"
#include "kernels/ops.h"

namespace reformer {

// True when this build has the CUDA path and a CUDA device is visible.
bool cuda_available();

// Total memory of the current CUDA device in bytes; 0 without one.
int64_t device_memory_bytes();

// Ops for training.device: cpu, cuda (throws ConfigError when the build has
// no CUDA path or no device is visible) or auto_ (CUDA when available, else
// CPU).
std::unique_ptr<Ops<float>> make_ops(DeviceKind device);

}  // namespace reformer
