// LayerNorm and the projections that read it (CUDA twin of
// kernels/cpu/layernorm_project.cpp).
//
// The normalised rows exist only in bf16: the LayerNorm kernel writes them,
// a block of rows at a time, straight into the op workspace as the
// products' operand (the separate ops write them in fp32 and each product
// rounds them to bf16 again), and the backward recomputes them the same way
// for the weight gradients. Where C or OC is not a multiple of 8, or rows
// are wider than the bf16 LayerNorm takes, the separate ops run instead.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/common/gemm_staging.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/workspace.h"
#include "kernels/errors.h"

namespace reformer {
namespace {

using bf16 = __nv_bfloat16;

bool fused_ok(int C, int OC) {
  return C % 8 == 0 && OC % 8 == 0 && C <= kLayernormBf16MaxC;
}

// The forward products' bf16 operands in the op workspace: both weights
// (rounded here) and a block of normalised rows.
struct Operands {
  bf16 *w1, *w2, *x;
};
Operands stage_operands(cuda::Workspace& ws, const float* w1, const float* w2, int64_t rows,
                        int C, int OC, cudaStream_t s) {
  cuda::Carve carve;
  const size_t o_w1 = carve.reserve(2 * size_t(C) * size_t(OC));
  const size_t o_w2 = carve.reserve(w2 ? 2 * size_t(C) * size_t(OC) : 0);
  const size_t o_x = carve.reserve(2 * size_t(rows) * size_t(C));
  void* base = ws.get(carve.total());
  Operands o{cuda::Carve::at<bf16>(base, o_w1), cuda::Carve::at<bf16>(base, o_w2),
             cuda::Carve::at<bf16>(base, o_x)};
  cuda::round_bf16(o.w1, w1, C, OC, s);
  if (w2) cuda::round_bf16(o.w2, w2, C, OC, s);
  return o;
}

[[noreturn]] void no_product(const char* op, int C, int OC) {
  throw DeviceError(std::string(op) + ": no bf16 product for C=" + std::to_string(C) +
                    " OC=" + std::to_string(OC));
}

}  // namespace

// With out_bf16 the products write out1 and out2 in bf16 (cuBLASLt's
// rounding of its fp32 sums, to nearest even).
void CudaOps::layernorm_project_forward(float* out1, float* out2, float* ln, float* mean,
                                        float* rstd, const float* inp, const float* ln_w,
                                        const float* ln_b, const float* w1, const float* w2,
                                        int64_t N, int C, int OC, float eps, bool out_bf16) {
  if (N <= 0 || C <= 0) return;
  if (out_bf16 && !fused_ok(C, OC))
    throw ShapeError("layernorm_project_forward: bf16 outputs need C and OC multiples of 8 and "
                     "C <= " + std::to_string(kLayernormBf16MaxC) + ", got C=" +
                     std::to_string(C) + " OC=" + std::to_string(OC));
  if (!fused_ok(C, OC)) {
    layernorm_forward(ln, mean, rstd, inp, ln_w, ln_b, N, C, eps);
    matmul_forward(out1, ln, w1, nullptr, N, C, OC);
    if (w2) matmul_forward(out2, ln, w2, nullptr, N, C, OC);
    return;
  }
  const int64_t rows = gemm_block_rows(N, C, OC);
  const Operands op = stage_operands(ws_, w1, w2, rows, C, OC, stream_);
  bf16 *w1_16 = op.w1, *w2_16 = op.w2, *x16 = op.x;
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t nr = std::min(rows, N - r0);
    cuda::layernorm_forward_bf16(x16, mean + r0, rstd + r0, inp + r0 * C, ln_w, ln_b, nr, C, eps,
                                 stream_);
    // out^T [OC, nr] = w^T [OC, C] LN^T [C, nr].
    auto product = [&](const bf16* w16, float* out) {
      bool ok;
      if (out_bf16) {
        GemmOut o;
        o.d = reinterpret_cast<bf16*>(out) + r0 * OC;
        o.ld = OC;
        o.bf16 = true;
        ok = gemm_to(false, false, OC, nr, C, w16, OC, x16, C, 0.0f, o, GemmOperands::bf16);
      } else {
        ok = gemm(false, false, OC, nr, C, w16, OC, x16, C, 0.0f, out + r0 * OC, OC,
                  GemmOperands::bf16);
      }
      if (!ok) no_product("layernorm_project_forward", C, OC);
    };
    product(w1_16, out1);
    if (w2) product(w2_16, out2);
  }
}

// The gradient rows may come in bf16 (Operand: AttentionParams::grad_bf16's
// rows, both in one buffer of 2 OC values a row, dout1's then dout2's): in
// that layout they are the product's [nr, K] operand as they are; otherwise
// each is copied (bf16) or rounded (fp32) into the staged rows.
void CudaOps::layernorm_project_backward(float* dinp, float* dln_w, float* dln_b, float* dw1,
                                         float* dw2, Operand<float> dout1, Operand<float> dout2,
                                         float* ln, float* dln, float* mean, float* rstd,
                                         const float* inp, const float* ln_w, const float* ln_b,
                                         const float* w1, const float* w2, int64_t N, int C,
                                         int OC, float eps) {
  const char* op = "layernorm_project_backward";
  if (N <= 0 || C <= 0) return;
  auto stride = [&](const Operand<float>& d) { return d.ld ? d.ld : int64_t(OC); };
  if (!fused_ok(C, OC)) {
    if (dout1.bf16 || (w2 && dout2.bf16))
      throw ShapeError(std::string(op) +
                       ": bf16 gradients need C and OC multiples of 8 and C <= " +
                       std::to_string(kLayernormBf16MaxC) + ", got C=" + std::to_string(C) +
                       " OC=" + std::to_string(OC));
    if (!dout1.dense(OC) || (w2 && !dout2.dense(OC)))
      throw ShapeError(std::string(op) + ": gradient rows must be OC=" + std::to_string(OC) +
                       " wide here");
    layernorm_forward(ln, mean, rstd, inp, ln_w, ln_b, N, C, eps);
    matmul_backward(dln, dw1, nullptr, dout1.p, ln, w1, N, C, OC, /*add_dinp=*/false);
    if (w2) matmul_backward(dln, dw2, nullptr, dout2.p, ln, w2, N, C, OC, /*add_dinp=*/true);
    layernorm_backward(dinp, dln_w, dln_b, dln, inp, ln_w, mean, rstd, N, C);
    return;
  }
  // Both projections as one product for dln: the weights side by side
  // [C, K] and the dout rows side by side [nr, K], K = OC or 2 OC:
  // dln^T [C, nr] = w [C, K] dout^T [K, nr] (one write of dln, no second
  // pass adding into it); each weight gradient from its half of the rows,
  // dw^T [OC, C] += dout^T [OC, nr] LN [nr, C].
  const int64_t K = w2 ? 2 * int64_t(OC) : OC;
  const bf16* d1 = reinterpret_cast<const bf16*>(dout1.p);
  const bool in_place = dout1.bf16 && stride(dout1) == K &&
                        (!w2 || (dout2.bf16 && stride(dout2) == K &&
                                 reinterpret_cast<const bf16*>(dout2.p) == d1 + OC));
  // dout (fp32 or bf16 rows) r0 .. r0 + nr into columns col of d16.
  auto stage_rows = [&](bf16* d16, int64_t col, const Operand<float>& d, int64_t r0,
                        int64_t nr) {
    const int64_t ld = stride(d);
    if (!d.bf16) {
      cuda::round_bf16_2d(d16 + col, K, d.p + r0 * ld, ld, nr, OC, stream_);
      return;
    }
    CUDA_CHECK(cudaMemcpy2DAsync(d16 + col, sizeof(bf16) * K,
                                 reinterpret_cast<const bf16*>(d.p) + r0 * ld, sizeof(bf16) * ld,
                                 sizeof(bf16) * OC, nr, cudaMemcpyDeviceToDevice, stream_));
  };
  const int64_t rows = gemm_block_rows(N, C, K);
  {
    const cuda::GemmStage st = cuda::carve_gemm_stage(ws_, C, K, rows);
    bf16 *w16 = st.w, *x16 = st.x;
    cuda::round_bf16_2d(w16, K, w1, OC, C, OC, stream_);
    if (w2) cuda::round_bf16_2d(w16 + OC, K, w2, OC, C, OC, stream_);
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t nr = std::min(rows, N - r0);
      cuda::layernorm_forward_bf16(x16, mean + r0, rstd + r0, inp + r0 * C, ln_w, ln_b, nr, C,
                                   eps, stream_);
      const bf16* d16 = st.d;
      if (in_place) {
        d16 = d1 + r0 * K;
      } else {
        stage_rows(st.d, 0, dout1, r0, nr);
        if (w2) stage_rows(st.d, OC, dout2, r0, nr);
      }
      if (!gemm(true, false, C, nr, K, w16, K, d16, K, 0.0f, dln + r0 * C, C, GemmOperands::bf16))
        no_product(op, C, OC);
      if (dw1 && !gemm(false, true, OC, C, nr, d16, K, x16, C, 1.0f, dw1, OC, GemmOperands::bf16))
        no_product(op, C, OC);
      if (w2 && dw2 &&
          !gemm(false, true, OC, C, nr, d16 + OC, K, x16, C, 1.0f, dw2, OC, GemmOperands::bf16))
        no_product(op, C, OC);
    }
  }
  layernorm_backward(dinp, dln_w, dln_b, dln, inp, ln_w, mean, rstd, N, C);
}

}  // namespace reformer
