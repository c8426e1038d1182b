// Entry points of the CUDA path, safe to include from plain C++ (no CUDA
// headers): the framework asks how many devices there are and builds the
// CUDA Ops<float>. The implementation (CudaOps, kernels/cuda/cuda_ops_impl.h)
// is compiled by nvcc only.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/ops.h"

namespace reformer {

// Number of visible CUDA devices; 0 when there is none or no usable driver.
// Never throws.
int cuda_device_count();

// Total memory of the current CUDA device in bytes; 0 when it cannot be
// queried. Never throws.
int64_t cuda_device_memory_bytes();

// Ops<float> on the current CUDA device (device 0 unless the caller selected
// another), with its own cuBLASLt handle and workspace. Throws DeviceError
// when the device cannot be used.
std::unique_ptr<Ops<float>> make_cuda_ops();

class StreamClock;  // kernels/profiling_ops.h
// A StreamClock timing work on `stream` (a cudaStream_t, e.g. Ops::stream())
// with CUDA events.
std::unique_ptr<StreamClock> make_cuda_stream_clock(void* stream);

// TFLOP/s of a dense 8192^3 bf16 product (fp32 accumulation) through cuBLAS
// on `stream` (a cudaStream_t): the device's matrix-product ceiling, the
// denominator of MFU. Takes about 20 ms and 384 MiB while it runs. Throws
// DeviceError.
double measure_bf16_gemm_tflops(void* stream);

}  // namespace reformer
