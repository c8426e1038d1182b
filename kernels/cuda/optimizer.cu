// AdamW and Adafactor updates (CUDA twin of kernels/cpu/optimizer.cpp).
// AdamW is elementwise in fp32. Adafactor forms its statistics (row and
// column means of g^2 + eps1, mean(vr), the update RMS) with deterministic
// two-pass reductions in double that stay on the device; vhat and u are
// formed in double like the CPU. Bitwise reproducible.
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

struct AdamWStep {
  float b1, b2, lr, eps, wd, bc1, bc2;
  // One element: m, v and the parameter p updated from the gradient g.
  __device__ __forceinline__ void operator()(float& p, float g, float& m, float& v) const {
    const float mi = b1 * m + (1.0f - b1) * g;
    const float vi = b2 * v + (1.0f - b2) * g * g;
    m = mi;
    v = vi;
    const float mhat = mi / bc1;
    const float vhat = vi / bc2;
    p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
  }
};

// kVec (every pointer 16-byte aligned): quads of elements by float4
// accesses, the n % 4 last ones one by one; the same arithmetic per element.
template <bool kVec>
__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n,
                             AdamWStep step) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (kVec) {
    for (; i < n / 4; i += stride) {
      float4 p4 = reinterpret_cast<float4*>(param)[i];
      const float4 g4 = reinterpret_cast<const float4*>(grad)[i];
      float4 m4 = reinterpret_cast<float4*>(m)[i];
      float4 v4 = reinterpret_cast<float4*>(v)[i];
      step(p4.x, g4.x, m4.x, v4.x);
      step(p4.y, g4.y, m4.y, v4.y);
      step(p4.z, g4.z, m4.z, v4.z);
      step(p4.w, g4.w, m4.w, v4.w);
      reinterpret_cast<float4*>(param)[i] = p4;
      reinterpret_cast<float4*>(m)[i] = m4;
      reinterpret_cast<float4*>(v)[i] = v4;
    }
    i = n / 4 * 4 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  }
  for (; i < n; i += stride) step(param[i], grad[i], m[i], v[i]);
}

// Adafactor's shared description of one tensor viewed as [rows, cols].
struct AdafactorArgs {
  const float* grad;     // [rows, cols]
  const float* vr;       // factored: [rows]; else [rows * cols]
  const float* vc;       // factored: [cols]
  const double* scalar;  // device: [0] mean(vr), [1] 1 / max(1, rms(u) / clip)
  int64_t cols;
  double eps1;
  bool factored;
  __device__ double raw_update(int64_t i) const {
    const int64_t r = i / cols, c = i % cols;
    const double vhat = factored ? double(vr[r]) * double(vc[c]) / scalar[0] : double(vr[i]);
    return double(grad[i]) / sqrt(vhat);
  }
};

struct RawUpdateSquared {
  AdafactorArgs a;
  __device__ double operator()(int64_t i) const {
    const double u = a.raw_update(i);
    return u * u;
  }
};

struct G2 {  // g^2 + eps1 at (r, c)
  const float* grad;
  int64_t cols;
  double eps1;
  __device__ double operator()(int64_t r, int64_t c) const {
    const double g = double(grad[r * cols + c]);
    return g * g + eps1;
  }
};

struct VrValue {
  const float* vr;
  __device__ double operator()(int64_t i) const { return double(vr[i]); }
};

struct UpdateMoment {  // v = beta2t v + (1 - beta2t) sum / count
  float* v;
  double beta2t, count;
  __device__ void operator()(int64_t c, double s) const {
    v[c] = float(beta2t * double(v[c]) + (1.0 - beta2t) * (s / count));
  }
};

struct MeanPost {
  double count;
  __device__ void operator()(double s, double* out) const { out[0] = s / count; }
};

struct ClipPost {
  double count, clip_threshold;
  __device__ void operator()(double s, double* out) const {
    const double rms = sqrt(s / count);
    out[0] = 1.0 / fmax(1.0, rms / clip_threshold);
  }
};

// vr[r] = beta2t vr[r] + (1 - beta2t) mean_c (g^2 + eps1); one block per row.
__global__ void adafactor_row_kernel(float* vr, const float* grad, int64_t cols, double eps1,
                                     double beta2t) {
  __shared__ double sh[32];
  const int64_t r = blockIdx.x;
  double s = 0.0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const double g = double(grad[r * cols + c]);
    s += g * g + eps1;
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) vr[r] = float(beta2t * double(vr[r]) + (1.0 - beta2t) * (s / double(cols)));
}

// Unfactored: v = beta2t v + (1 - beta2t) (g^2 + eps1).
__global__ void adafactor_full_moment_kernel(float* v, const float* grad, int64_t n, double eps1,
                                             double beta2t) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double g = double(grad[i]);
    v[i] = float(beta2t * double(v[i]) + (1.0 - beta2t) * (g * g + eps1));
  }
}

__global__ void adafactor_apply_kernel(float* param, float* m, AdafactorArgs a, int64_t n,
                                       double beta1, double lr, double wd) {
  const double inv_clip = a.scalar[1];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    double u = a.raw_update(i) * inv_clip;
    if (beta1 > 0.0) {
      const float mi = float(beta1 * double(m[i]) + (1.0 - beta1) * u);
      m[i] = mi;
      u = double(mi);
    }
    param[i] = float(double(param[i]) - lr * (u + wd * double(param[i])));
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                           const AdamWParams& p) {
  if (n <= 0) return;
  const float bc1 = float(1.0 - std::pow(double(p.beta1), double(p.step)));
  const float bc2 = float(1.0 - std::pow(double(p.beta2), double(p.step)));
  const cuda::AdamWStep step{p.beta1, p.beta2, p.lr, p.eps, p.weight_decay, bc1, bc2};
  if (cuda::aligned(param, 16) && cuda::aligned(grad, 16) && cuda::aligned(m, 16) &&
      cuda::aligned(v, 16))
    cuda::adamw_kernel<true><<<cuda::grid_for((n + 3) / 4), cuda::kThreads, 0, stream_>>>(
        param, grad, m, v, n, step);
  else
    cuda::adamw_kernel<false><<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
        param, grad, m, v, n, step);
  CUDA_CHECK_LAUNCH("adamw_kernel");
}

void CudaOps::adafactor_update(float* param, const float* grad, float* m, float* vr, float* vc,
                               int64_t rows, int64_t cols, const AdafactorParams& p) {
  const int64_t n = rows * cols;
  if (n <= 0) return;
  const double beta2t = 1.0 - std::pow(double(p.step), -double(p.decay_rate));
  const double eps1 = double(p.eps1);
  const bool factored = rows > 1 && cols > 1;

  cuda::Carve carve;
  const size_t off_scalar = carve.reserve(2 * sizeof(double));
  const size_t off_partial = carve.reserve(sizeof(double) * cuda::kReduceMaxBlocks);
  const size_t off_cols =
      carve.reserve(factored ? sizeof(double) * size_t(cuda::colsum_slabs(rows) * cols) : 0);
  void* base = ws_.get(carve.total());
  double* scalar = cuda::Carve::at<double>(base, off_scalar);
  double* partial = cuda::Carve::at<double>(base, off_partial);
  double* colscratch = cuda::Carve::at<double>(base, off_cols);

  if (factored) {
    cuda::adafactor_row_kernel<<<unsigned(rows), cuda::kThreads, 0, stream_>>>(vr, grad, cols,
                                                                               eps1, beta2t);
    CUDA_CHECK_LAUNCH("adafactor_row_kernel");
    cuda::colsum<double>(colscratch, cuda::G2{grad, cols, eps1},
                         cuda::UpdateMoment{vc, beta2t, double(rows)}, rows, cols, stream_);
    cuda::reduce_sum(scalar, partial, cuda::VrValue{vr}, rows, stream_,
                     cuda::MeanPost{double(rows)});
  } else {
    cuda::adafactor_full_moment_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
        vr, grad, n, eps1, beta2t);
    CUDA_CHECK_LAUNCH("adafactor_full_moment_kernel");
  }
  const cuda::AdafactorArgs a{grad, vr, vc, scalar, cols, eps1, factored};
  cuda::reduce_sum(scalar + 1, partial, cuda::RawUpdateSquared{a}, n, stream_,
                   cuda::ClipPost{double(n), double(p.clip_threshold)});
  cuda::adafactor_apply_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
      param, m, a, n, double(p.beta1), double(p.lr), double(p.weight_decay));
  CUDA_CHECK_LAUNCH("adafactor_apply_kernel");
}

}  // namespace reformer
