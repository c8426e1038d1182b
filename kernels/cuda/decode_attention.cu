// Attention of one decoding step against a key/value cache (CUDA twin of
// kernels/cpu/decode_attention.cpp; contract in kernels/ops.h).
//
//  - set_kernel: one block per (head, set). Each warp takes every
//    kDecodeWarps-th key of the set and keeps an online softmax (running max,
//    sum and weighted value sum, the head's dh spread over the lanes); the
//    block then merges its warps. Writes the set's output [dh] and lse into
//    the op workspace (lse = -inf for an empty set).
//  - combine_kernel: one block per head: the sets' outputs weighted by
//    exp(lse - logsumexp lse), 0 where every set is empty.
// Scores, norms and exponentials are fp32 (expf, sqrtf), so results differ
// from the CPU by rounding only. Heads wider than kDecodeMaxDh are refused
// with ShapeError. Deterministic: the summation order depends only on the
// set sizes.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "kernels/common/decode_attention_checks.h"
#include "kernels/common/params.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr int kDecodeWarps = 8;
constexpr int kDecodeMaxDh = 128;
constexpr int kDecodeLaneDims = kDecodeMaxDh / 32;  // head elements per lane

__global__ void set_kernel(float* out_r, float* lse, const float* q, const float* k,
                           const float* v, const int32_t* sets, const int32_t* keys,
                           DecodeAttentionParams p) {
  __shared__ float sh_m[kDecodeWarps], sh_s[kDecodeWarps];
  __shared__ float sh_acc[kDecodeWarps][kDecodeMaxDh];
  const int u = blockIdx.x, h = u / p.rounds;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int dh = p.dh;
  const int32_t begin = sets[2 * u], n = sets[2 * u + 1];
  float qr[kDecodeLaneDims], acc[kDecodeLaneDims];
#pragma unroll
  for (int i = 0; i < kDecodeLaneDims; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < dh ? q[int64_t(h) * dh + d] : 0.0f;
    acc[i] = 0.0f;
  }
  float m = -INFINITY, s = 0.0f;
  for (int32_t t = warp; t < n; t += kDecodeWarps) {
    const int64_t j = keys[begin + t];
    const float* kj = k + j * p.ld + int64_t(h) * dh;
    const float* vj = v + j * p.ld + int64_t(h) * dh;
    float kk = 0.0f, qk = 0.0f;
#pragma unroll
    for (int i = 0; i < kDecodeLaneDims; ++i) {
      const int d = lane + 32 * i;
      const float x = d < dh ? kj[d] : 0.0f;
      kk += x * x;
      qk += qr[i] * x;
    }
    kk = warp_sum(kk);
    qk = warp_sum(qk);
    float score = qk / sqrtf(kk + float(kKeyNormEps));
    if (p.causal && j > p.q_pos) score = float(kCausalMaskValue);
    else if (j == p.q_pos) score = float(kSelfMaskValue);
    const float m_new = fmaxf(m, score);
    const float scale = expf(m - m_new), e = expf(score - m_new);
    s = s * scale + e;
#pragma unroll
    for (int i = 0; i < kDecodeLaneDims; ++i) {
      const int d = lane + 32 * i;
      acc[i] = acc[i] * scale + (d < dh ? e * vj[d] : 0.0f);
    }
    m = m_new;
  }
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
#pragma unroll
  for (int i = 0; i < kDecodeLaneDims; ++i) sh_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float mx = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sh_m[w]);
  if (mx == -INFINITY) {  // empty set
    for (int d = threadIdx.x; d < dh; d += blockDim.x) out_r[int64_t(u) * dh + d] = 0.0f;
    if (threadIdx.x == 0) lse[u] = -INFINITY;
    return;
  }
  float total = 0.0f;
  for (int w = 0; w < kDecodeWarps; ++w)
    if (sh_m[w] != -INFINITY) total += sh_s[w] * expf(sh_m[w] - mx);
  for (int d = threadIdx.x; d < dh; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w)
      if (sh_m[w] != -INFINITY) o += sh_acc[w][d] * expf(sh_m[w] - mx);
    out_r[int64_t(u) * dh + d] = o / total;
  }
  if (threadIdx.x == 0) lse[u] = mx + logf(total);
}

__global__ void combine_kernel(float* out, const float* out_r, const float* lse, int rounds,
                               int dh) {
  const int h = blockIdx.x;
  const float* l = lse + int64_t(h) * rounds;
  float mx = -INFINITY;
  for (int r = 0; r < rounds; ++r) mx = fmaxf(mx, l[r]);
  float z = 0.0f;
  if (mx != -INFINITY)
    for (int r = 0; r < rounds; ++r) z += expf(l[r] - mx);
  for (int d = threadIdx.x; d < dh; d += blockDim.x) {
    float o = 0.0f;
    if (mx != -INFINITY)
      for (int r = 0; r < rounds; ++r)
        o += expf(l[r] - mx) / z * out_r[(int64_t(h) * rounds + r) * dh + d];
    out[int64_t(h) * dh + d] = o;
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::decode_attention(float* out, const float* q, const float* k, const float* v,
                               const int32_t* sets, const int32_t* keys,
                               const DecodeAttentionParams& p) {
  check_decode_attention(p);
  if (p.dh > cuda::kDecodeMaxDh)
    throw ShapeError("decode_attention: the CUDA kernel holds heads up to dh = " +
                     std::to_string(cuda::kDecodeMaxDh) + ", got " + std::to_string(p.dh));
  const int units = p.heads * p.rounds;
  if (units == 0) return;
  cuda::Carve carve;
  const size_t o_off = carve.reserve(sizeof(float) * size_t(units) * size_t(p.dh));
  const size_t l_off = carve.reserve(sizeof(float) * size_t(units));
  void* base = ws_.get(carve.total());
  float* out_r = cuda::Carve::at<float>(base, o_off);
  float* lse = cuda::Carve::at<float>(base, l_off);
  cuda::set_kernel<<<units, 32 * cuda::kDecodeWarps, 0, stream_>>>(out_r, lse, q, k, v, sets,
                                                                   keys, p);
  CUDA_CHECK_LAUNCH("decode_attention set_kernel");
  cuda::combine_kernel<<<p.heads, 128, 0, stream_>>>(out, out_r, lse, p.rounds, p.dh);
  CUDA_CHECK_LAUNCH("decode_attention combine_kernel");
}

}  // namespace reformer
