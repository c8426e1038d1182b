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

// The matrix-product ceiling MFU is measured against, in TFLOP/s:
// `configured` when > 0 (logging.peak_tflops), else a bf16 GEMM timed on
// `ops`' device when it is a CUDA device, else 0 (no MFU is reported). 0
// also when the device cannot run the measurement (e.g. too little memory
// left): never throws for that.
double peak_tflops(Ops<float>& ops, double configured);

}  // namespace reformer
