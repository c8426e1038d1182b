// The feed-forward block g = act(inp @ w1 + b1) @ w2 + b2 (CUDA twin of
// kernels/cpu/ffn.cpp).
//
// Where C and F are multiples of 8 (every bf16 row 16-byte aligned) the
// hidden layer is never written in fp32. The first product's cuBLASLt
// epilogue adds b1, applies the activation and writes it in bf16; for GELU
// into the first half of `a`, keeping its input, the pre-activation, in
// bf16 in the first half of `h`; for ReLU into the first half of `h`, `a`
// holding no state (kernels/common/gemm_staging.h, cuda_ffn_state_cols).
// cuBLASLt (13.0, H200) takes the bias of an epilogue with bf16 output
// only in bf16, so b1 is rounded to bf16 there (2^-9 of b1, below the
// rounding of the activation it feeds). The second product reads that bf16
// activation as it is, and adds b2 in its epilogue where alpha is 1. In the
// backward, the product dout @ w2^T applies the GELU slope from the saved
// pre-activation in its epilogue and writes d(pre-activation) in bf16 over
// the spent activation; the products for dinp and dw1 read it from there.
// ReLU's slope comes from the activation itself (positive exactly where
// its input was): that product is written in fp32 into `a` (scratch there)
// and a kernel applies the slope, as for GELU where cuBLASLt offers no
// epilogue kernel (then through an fp32 strip of the workspace,
// kFfnStripRows rows at a time). Against the separate ops this drops the
// bias, activation and bf16 staging passes over [N, F] and the fp32 [N, F]
// buffers of the backward; the rounding is theirs (their products round the
// activation and the gradients to bf16 anyway) plus b1 in bf16 and GELU's
// slope taken at the pre-activation rounded to bf16.
//
// ffn_rebuild writes GELU's activation from the pre-activation, so that a
// layer may keep only h from its forward to its backward
// (model.kept_ffn: pre_activation): bf16(gelu(pre)) of the bf16
// pre-activation, where the forward's epilogue took gelu of the fp32 one
// (the two differ by at most about one bf16 rounding).
//
// Otherwise the block runs as the separate ops (h and a in fp32, as on the
// CPU).
//
// layernorm_ffn_forward / _backward (the model's feed-forward sublayer)
// write the normalised rows once, in bf16, where the block is fused: the
// LayerNorm kernel rounds its fp32 result as the staging pass would, the
// products read those rows as they are, and the backward's dw1 reads them
// again; the fp32 rows and the two rounding passes over [N, C] are gone.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/common/gemm_staging.h"
#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/errors.h"

namespace reformer {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

bool ffn_fused(int C, int F) { return ffn_state_bf16(C, F); }

// Four elements per thread: the fused path's rows are multiples of 8
// elements at 16-byte aligned offsets.
struct Bf16x4 {
  __nv_bfloat162 lo, hi;
};
__device__ __forceinline__ Bf16x4 pack4(float a, float b, float c, float d) {
  return Bf16x4{__floats2bfloat162_rn(a, b), __floats2bfloat162_rn(c, d)};
}

// a16 = bf16(act(h)); pre16 = bf16(h) unless null (ReLU keeps no input).
// n4 groups of four.
__global__ void ffn_state_kernel(Bf16x4* a16, Bf16x4* pre16, const float4* h, int64_t n4,
                                 bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 x = h[i];
    a16[i] = pack4(act_value(x.x, relu), act_value(x.y, relu), act_value(x.z, relu),
                   act_value(x.w, relu));
    if (pre16) pre16[i] = pack4(x.x, x.y, x.z, x.w);
  }
}

// dst = bf16(g * act'(x)), x = state: the pre-activation (GELU) or the
// activation (ReLU). dst may be state. n4 groups of four.
__global__ void ffn_slope_kernel(Bf16x4* dst, const float4* g, const Bf16x4* state, int64_t n4,
                                 bool relu) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 d = g[i];
    const Bf16x4 x = state[i];
    const float2 lo = __bfloat1622float2(x.lo), hi = __bfloat1622float2(x.hi);
    dst[i] = pack4(d.x * act_slope(lo.x, relu), d.y * act_slope(lo.y, relu),
                   d.z * act_slope(hi.x, relu), d.w * act_slope(hi.y, relu));
  }
}

// a16 = bf16(gelu(pre16)). n4 groups of four.
__global__ void ffn_rebuild_kernel(Bf16x4* a16, const Bf16x4* pre16, int64_t n4) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Bf16x4 x = pre16[i];
    const float2 lo = __bfloat1622float2(x.lo), hi = __bfloat1622float2(x.hi);
    a16[i] = pack4(act_value(lo.x, false), act_value(lo.y, false), act_value(hi.x, false),
                   act_value(hi.y, false));
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::ffn_rebuild(float* a, const float* h, int64_t N, int C, int F, Activation act) {
  if (N <= 0 || F <= 0) return;
  if (!cuda::ffn_fused(C, F)) {
    activation_forward(a, h, N * F, act);
    return;
  }
  if (act == Activation::relu) return;  // the activation is its own state, in h
  const int64_t n4 = N * F / 4;
  cuda::ffn_rebuild_kernel<<<cuda::grid_for(n4), cuda::kThreads, 0, stream_>>>(
      reinterpret_cast<cuda::Bf16x4*>(a), reinterpret_cast<const cuda::Bf16x4*>(h), n4);
  CUDA_CHECK_LAUNCH("ffn_rebuild_kernel");
}

void CudaOps::ffn_forward(float* out, float* h, float* a, const float* inp, const float* w1,
                          const float* b1, const float* w2, const float* b2, int64_t N, int C,
                          int F, Activation act, float alpha, bool accumulate,
                          const float* res) {
  ffn_forward_rows(out, h, a, inp, nullptr, w1, b1, w2, b2, N, C, F, act, alpha, accumulate,
                   res);
}

void CudaOps::ffn_forward_rows(float* out, float* h, float* a, const float* inp,
                               const __nv_bfloat16* x16_in, const float* w1, const float* b1,
                               const float* w2, const float* b2, int64_t N, int C, int F,
                               Activation act, float alpha, bool accumulate, const float* res) {
  if (N <= 0 || C <= 0) return;
  if (!accumulate) res = nullptr;
  if (!cuda::ffn_fused(C, F)) {
    product(h, inp, w1, b1, N, C, F, 1.0f, 0.0f);
    activation_forward(a, h, N * F, act);
    if (accumulate) {
      product(out, a, w2, b2, N, F, C, alpha, 1.0f, res);
      return;
    }
    product(out, a, w2, b2, N, F, C, 1.0f, 0.0f);
    if (alpha != 1.0f) scale(out, alpha, N * C);
    return;
  }
  using cuda::bf16;
  const bool relu = act == Activation::relu;
  // The activation (GELU: in a; ReLU: in h) and GELU's pre-activation (in h).
  bf16* a16 = reinterpret_cast<bf16*>(relu ? h : a);
  bf16* pre16 = relu ? nullptr : reinterpret_cast<bf16*>(h);
  const int64_t rows = gemm_block_rows(N, C, F);
  const int64_t strip = std::min(rows, kFfnStripRows);
  cuda::Carve carve;
  const size_t o_w1 = carve.reserve(2 * size_t(C) * size_t(F));
  const size_t o_w2 = carve.reserve(2 * size_t(F) * size_t(C));
  const size_t o_x = carve.reserve(2 * size_t(rows) * size_t(C));
  const size_t o_s = carve.reserve(4 * size_t(strip) * size_t(F));  // the fp32 strip
  const size_t o_b = carve.reserve(4 * size_t(F));   // b1, 256-byte aligned
  const size_t o_b16 = carve.reserve(2 * size_t(F)); // b1 in bf16
  void* base = ws_.get(carve.total());
  bf16* w1_16 = cuda::Carve::at<bf16>(base, o_w1);
  bf16* w2_16 = cuda::Carve::at<bf16>(base, o_w2);
  bf16* x16 = cuda::Carve::at<bf16>(base, o_x);
  float* strip32 = cuda::Carve::at<float>(base, o_s);
  float* b1_copy = cuda::Carve::at<float>(base, o_b);
  bf16* b1_16 = cuda::Carve::at<bf16>(base, o_b16);
  cuda::round_bf16(w1_16, w1, C, F, stream_);
  cuda::round_bf16(w2_16, w2, F, C, stream_);
  const float beta = accumulate ? 1.0f : 0.0f;
  const bf16* x_r = x16;  // this block's input rows in bf16
  // The hidden layer's product with its epilogue, b1 as given, else (where
  // cuBLASLt has no kernel for that) from an aligned copy, else in bf16;
  // false where no epilogue kernel takes it at all.
  auto hidden = [&](GemmOut hid, int64_t nr) {
    if (gemm_to(false, false, F, nr, C, w1_16, F, x_r, C, 0.0f, hid, GemmOperands::bf16))
      return true;
    if (!b1) return false;
    CUDA_CHECK(cudaMemcpyAsync(b1_copy, b1, sizeof(float) * size_t(F), cudaMemcpyDeviceToDevice,
                               stream_));
    hid.bias = b1_copy;
    if (gemm_to(false, false, F, nr, C, w1_16, F, x_r, C, 0.0f, hid, GemmOperands::bf16))
      return true;
    cuda::round_bf16(b1_16, b1, 1, F, stream_);
    hid.bias = b1_16;
    hid.bias_bf16 = true;
    return gemm_to(false, false, F, nr, C, w1_16, F, x_r, C, 0.0f, hid, GemmOperands::bf16);
  };
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t nr = std::min(rows, N - r0);
    bf16* a_r = a16 + r0 * F;
    x_r = x16_in ? x16_in + r0 * C : x16;
    if (!x16_in) cuda::round_bf16(x16, inp + r0 * C, nr, C, stream_);
    // a^T [F, nr] = act(w1^T [F, C] x^T [C, nr] + b1), in bf16.
    GemmOut hid;
    hid.d = a_r;
    hid.ld = F;
    hid.bf16 = true;
    hid.bias = b1;
    if (relu) {
      hid.epilogue = b1 ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    } else {
      hid.epilogue = b1 ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      hid.aux = pre16 + r0 * F;
      hid.aux_ld = F;
    }
    // Else the product in fp32, strip by strip, then its bf16 state.
    const bool epilogue = hidden(hid, nr);
    for (int64_t s0 = 0; !epilogue && s0 < nr; s0 += strip) {
      const int64_t ns = std::min(strip, nr - s0);
      if (!gemm(false, false, F, ns, C, w1_16, F, x_r + s0 * C, C, 0.0f, strip32, F,
                GemmOperands::bf16))
        throw DeviceError("ffn_forward: no bf16 product for F=" + std::to_string(F) +
                          " C=" + std::to_string(C));
      if (b1) add_bias(strip32, b1, ns, F, 1.0f);
      cuda::ffn_state_kernel<<<cuda::grid_for(ns * F / 4), cuda::kThreads, 0, stream_>>>(
          reinterpret_cast<cuda::Bf16x4*>(a_r + s0 * F),
          relu ? nullptr : reinterpret_cast<cuda::Bf16x4*>(pre16 + (r0 + s0) * F),
          reinterpret_cast<const float4*>(strip32), ns * F / 4, relu);
      CUDA_CHECK_LAUNCH("ffn_state_kernel");
    }
    // out^T [C, nr] = beta out^T + alpha w2^T [C, F] a^T [F, nr] (+ b2).
    const float* res_r = res ? res + r0 * C : nullptr;  // this block's residual rows
    GemmOut o;
    o.d = out + r0 * C;
    o.c = res_r;
    o.ld = C;
    bool biased = false;
    if (b2 && alpha == 1.0f) {
      o.epilogue = CUBLASLT_EPILOGUE_BIAS;
      o.bias = b2;
      biased = gemm_to(false, false, C, nr, F, w2_16, C, a_r, F, beta, o, GemmOperands::bf16);
    }
    if (!biased) {
      if (!gemm(false, false, C, nr, F, w2_16, C, a_r, F, beta, out + r0 * C, C,
                GemmOperands::bf16, alpha, res_r))
        throw DeviceError("ffn_forward: no bf16 product for C=" + std::to_string(C) +
                          " F=" + std::to_string(F));
      if (b2) add_bias(out + r0 * C, b2, nr, C, alpha);
    }
  }
}

void CudaOps::ffn_backward(float* dinp, float* dw1, float* db1, float* dw2, float* db2,
                           const float* dout, const float* inp, float* h, float* a,
                           const float* w1, const float* w2, int64_t N, int C, int F,
                           Activation act) {
  ffn_backward_rows(dinp, dw1, db1, dw2, db2, dout, inp, nullptr, h, a, w1, w2, N, C, F, act);
}

void CudaOps::ffn_backward_rows(float* dinp, float* dw1, float* db1, float* dw2, float* db2,
                                const float* dout, const float* inp, const __nv_bfloat16* x16_in,
                                float* h, float* a, const float* w1, const float* w2, int64_t N,
                                int C, int F, Activation act) {
  if (N <= 0 || C <= 0) return;
  if (!cuda::ffn_fused(C, F)) {  // as kernels/cpu/ffn.cpp
    matmul_backward(nullptr, dw2, db2, dout, a, w2, N, F, C, true);
    matmul_backward(a, nullptr, nullptr, dout, a, w2, N, F, C, false);
    activation_backward(a, a, h, N * F, act);
    matmul_backward(dinp, dw1, db1, a, inp, w1, N, C, F, false);
    return;
  }
  using cuda::bf16;
  const bool relu = act == Activation::relu;
  // The activation, then d(pre-activation) over it (GELU: in a; ReLU: in
  // h), and GELU's pre-activation (in h).
  bf16* a16 = reinterpret_cast<bf16*>(relu ? h : a);
  const bf16* pre16 = relu ? nullptr : reinterpret_cast<const bf16*>(h);
  const int64_t rows = gemm_block_rows(N, C, F);
  const int64_t strip = std::min(rows, kFfnStripRows);
  cuda::Carve carve;
  const size_t o_w1 = carve.reserve(2 * size_t(C) * size_t(F));
  const size_t o_w2 = carve.reserve(2 * size_t(F) * size_t(C));
  const size_t o_x = carve.reserve(2 * size_t(rows) * size_t(C));
  const size_t o_d = carve.reserve(2 * size_t(rows) * size_t(C));
  const size_t o_s = carve.reserve(4 * size_t(strip) * size_t(F));  // the fp32 strip
  void* base = ws_.get(carve.total());
  bf16* w1_16 = cuda::Carve::at<bf16>(base, o_w1);
  bf16* w2_16 = cuda::Carve::at<bf16>(base, o_w2);
  bf16* x16 = cuda::Carve::at<bf16>(base, o_x);
  bf16* d16 = cuda::Carve::at<bf16>(base, o_d);
  float* strip32 = cuda::Carve::at<float>(base, o_s);
  cuda::round_bf16(w2_16, w2, F, C, stream_);
  if (dinp) cuda::round_bf16(w1_16, w1, C, F, stream_);
  auto must = [&](bool ok) {
    if (!ok)
      throw DeviceError("ffn_backward: no bf16 product for C=" + std::to_string(C) +
                        " F=" + std::to_string(F));
  };
  // d(pre) [ns rows] = bf16(g * act'(state)) for g = w2 dout^T in fp32 at g32.
  auto slope = [&](bf16* dst, const float* g32, const bf16* state, int64_t ns) {
    cuda::ffn_slope_kernel<<<cuda::grid_for(ns * F / 4), cuda::kThreads, 0, stream_>>>(
        reinterpret_cast<cuda::Bf16x4*>(dst), reinterpret_cast<const float4*>(g32),
        reinterpret_cast<const cuda::Bf16x4*>(state), ns * F / 4, relu);
    CUDA_CHECK_LAUNCH("ffn_slope_kernel");
  };
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t nr = std::min(rows, N - r0);
    bf16* a_r = a16 + r0 * F;  // the activation, then d(pre-activation)
    cuda::round_bf16(d16, dout + r0 * C, nr, C, stream_);
    // dw2^T [C, F] += dout^T [C, nr] a [nr, F], before a_r is overwritten.
    if (dw2)
      must(gemm(false, true, C, F, nr, d16, C, a_r, F, 1.0f, dw2, C, GemmOperands::bf16));
    // d(pre)^T [F, nr] = act' (.) (w2 [F, C] dout^T [C, nr]), in bf16 over a_r.
    if (relu) {  // the product in fp32 in a (scratch), the slope in place
      float* g_r = a + r0 * F;
      must(gemm(true, false, F, nr, C, w2_16, C, d16, C, 0.0f, g_r, F, GemmOperands::bf16));
      slope(a_r, g_r, a_r, nr);
    } else {
      GemmOut g;
      g.d = a_r;
      g.ld = F;
      g.bf16 = true;
      g.epilogue = CUBLASLT_EPILOGUE_DGELU;
      g.aux = const_cast<bf16*>(pre16 + r0 * F);
      g.aux_ld = F;
      const bool epilogue =
          gemm_to(true, false, F, nr, C, w2_16, C, d16, C, 0.0f, g, GemmOperands::bf16);
      for (int64_t s0 = 0; !epilogue && s0 < nr; s0 += strip) {  // else strip by strip
        const int64_t ns = std::min(strip, nr - s0);
        must(gemm(true, false, F, ns, C, w2_16, C, d16 + s0 * C, C, 0.0f, strip32, F,
                  GemmOperands::bf16));
        slope(a_r + s0 * F, strip32, pre16 + (r0 + s0) * F, ns);
      }
    }
    // dinp^T [C, nr] = w1 [C, F] d(pre)^T [F, nr].
    if (dinp)
      must(gemm(true, false, C, nr, F, w1_16, F, a_r, F, 0.0f, dinp + r0 * C, C,
                GemmOperands::bf16));
    // dw1^T [F, C] += d(pre)^T [F, nr] inp [nr, C].
    if (dw1) {
      const bf16* x_r = x16_in ? x16_in + r0 * C : x16;
      if (!x16_in) cuda::round_bf16(x16, inp + r0 * C, nr, C, stream_);
      must(gemm(false, true, F, C, nr, a_r, F, x_r, C, 1.0f, dw1, F, GemmOperands::bf16));
    }
  }
  if (db1 || db2) {
    double* scratch = static_cast<double*>(
        ws_.get(sizeof(double) * size_t(cuda::colsum_slabs(N) * std::max(C, F))));
    if (db2)
      cuda::colsum<double>(scratch, cuda::MatrixValue<float>{dout, C}, cuda::AddTo{db2}, N, C,
                           stream_);
    if (db1)
      cuda::colsum<double>(scratch, cuda::MatrixValue<bf16>{a16, F}, cuda::AddTo{db1}, N, F,
                           stream_);
  }
}

// LayerNorm into bf16 rows in the first half of ln (the products' operand,
// kept for the backward's dw1): against layernorm_forward and ffn_forward
// in sequence this drops the fp32 LN write and the rounding pass of the
// forward and of the backward, with the same bits (the LN kernel rounds its
// fp32 result as the rounding pass would). Where the fused block does not
// apply (C or F not multiples of 8, rows wider than 2048) the ops run in
// sequence, LN in fp32.
void CudaOps::layernorm_ffn_forward(float* out, float* h, float* a, float* ln, float* mean,
                                    float* rstd, const float* inp, const float* ln_w,
                                    const float* ln_b, const float* w1, const float* b1,
                                    const float* w2, const float* b2, int64_t N, int C, int F,
                                    Activation act, float eps, float alpha, bool accumulate,
                                    const float* res) {
  if (N <= 0 || C <= 0) return;
  if (!ffn_layernorm_rows(ln, mean, rstd, inp, ln_w, ln_b, N, C, F, eps)) {
    ffn_forward(out, h, a, ln, w1, b1, w2, b2, N, C, F, act, alpha, accumulate, res);
    return;
  }
  ffn_forward_rows(out, h, a, nullptr, reinterpret_cast<const __nv_bfloat16*>(ln), w1, b1, w2,
                   b2, N, C, F, act, alpha, accumulate, res);
}

// The forward's LayerNorm state alone.
void CudaOps::layernorm_ffn_rows(float* ln, float* mean, float* rstd, const float* inp,
                                 const float* ln_w, const float* ln_b, int64_t N, int C, int F,
                                 float eps) {
  if (N <= 0 || C <= 0) return;
  ffn_layernorm_rows(ln, mean, rstd, inp, ln_w, ln_b, N, C, F, eps);
}

// LN(inp) into ln as the fused block reads it, bf16 rows (true), else fp32.
bool CudaOps::ffn_layernorm_rows(float* ln, float* mean, float* rstd, const float* inp,
                                 const float* ln_w, const float* ln_b, int64_t N, int C, int F,
                                 float eps) {
  if (cuda::ffn_fused(C, F) &&
      cuda::layernorm_forward_bf16(reinterpret_cast<__nv_bfloat16*>(ln), mean, rstd, inp, ln_w,
                                   ln_b, N, C, eps, stream_))
    return true;
  layernorm_forward(ln, mean, rstd, inp, ln_w, ln_b, N, C, eps);
  return false;
}

void CudaOps::layernorm_ffn_backward(float* dinp, float* dln_w, float* dln_b, float* dw1,
                                     float* db1, float* dw2, float* db2, const float* dout,
                                     float* ln, float* dln, float* h, float* a, const float* inp,
                                     const float* ln_w, const float* mean, const float* rstd,
                                     const float* w1, const float* w2, int64_t N, int C, int F,
                                     Activation act) {
  if (N <= 0 || C <= 0) return;
  // The forward's choice (the same test): bf16 rows in ln, or fp32 LN.
  if (layernorm_ffn_ln_cols(C, F) < C)
    ffn_backward_rows(dln, dw1, db1, dw2, db2, dout, nullptr,
                      reinterpret_cast<const __nv_bfloat16*>(ln), h, a, w1, w2, N, C, F, act);
  else
    ffn_backward(dln, dw1, db1, dw2, db2, dout, ln, h, a, w1, w2, N, C, F, act);
  layernorm_backward(dinp, dln_w, dln_b, dln, inp, ln_w, mean, rstd, N, C);
}

}  // namespace reformer
