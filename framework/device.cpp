#include "framework/device.h"

#include "kernels/errors.h"
#include "kernels/cpu/cpu_ops.h"
#if defined(REFORMER_HAVE_CUDA)
#include "kernels/cuda/cuda_ops.h"
#endif

namespace reformer {

bool cuda_available() {
#if defined(REFORMER_HAVE_CUDA)
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

int64_t device_memory_bytes() {
#if defined(REFORMER_HAVE_CUDA)
  return cuda_available() ? cuda_device_memory_bytes() : 0;
#else
  return 0;
#endif
}

std::unique_ptr<Ops<float>> make_ops(DeviceKind device) {
  if (device == DeviceKind::cuda || (device == DeviceKind::auto_ && cuda_available())) {
#if defined(REFORMER_HAVE_CUDA)
    if (!cuda_available())
      throw ConfigError("training.device: cuda was asked for but no CUDA device is visible");
    return make_cuda_ops();
#else
    throw ConfigError("training.device: cuda was asked for but this build has no CUDA path");
#endif
  }
  return std::make_unique<CpuOps<float>>();
}

double peak_tflops(Ops<float>& ops, double configured) {
  if (configured > 0) return configured;
#if defined(REFORMER_HAVE_CUDA)
  // A measurement for the progress line must never end a run: a device
  // that cannot spare the product's 384 MiB gives no MFU instead.
  if (ops.stream() != nullptr) {
    try {
      return measure_bf16_gemm_tflops(ops.stream());
    } catch (const DeviceError&) {
      return 0.0;
    }
  }
#endif
  return 0.0;
}

}  // namespace reformer
