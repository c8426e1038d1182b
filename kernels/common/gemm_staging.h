// How the CUDA linear-layer ops stage their operands as bf16 (kernels/cuda/
// matmul.cu), shared with the memory plan (framework/memory_plan.cpp) so the
// plan's workspace estimate and the allocation agree.
//
// matmul_forward, matmul_accumulate and matmul_backward round the weight
// and, block of rows by block of rows, the activations (and dout) to bf16 in
// the op workspace and multiply bf16 operands on the tensor cores with fp32 accumulation and fp32
// results. The rounding is the one bf16 tensor-core math applies to fp32
// operands anyway; bf16 operands in memory run the products at about twice
// the speed (bench/RESULTS.md, gemm_probe).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/common/params.h"
#include "kernels/errors.h"

namespace reformer {

// The value of an on/off environment variable `name` (value: null where
// unset). Unset, empty, "on" or "1": on; "off" or "0": off; anything else
// is a ConfigError naming the variable. The switches (kernels/cuda/
// matmul.cu): REFORMER_GEMM_TUNING, whether the large products time
// cuBLASLt's candidates (off: the heuristic's first everywhere);
// REFORMER_GEMM_EPILOGUES, whether products take cuBLASLt epilogues (off:
// none, so the feed-forward block runs its fallbacks: bias and activation
// in passes of their own, the product through an fp32 strip).
inline bool switch_from_env(const char* name, const char* value) {
  const std::string v = value ? value : "";
  if (v.empty() || v == "on" || v == "1") return true;
  if (v == "off" || v == "0") return false;
  throw ConfigError(std::string(name) + ": expected on, off, 1 or 0, got '" + v + "'");
}

// The staged activation rows of one block hold at most this many bytes.
constexpr int64_t kGemmStageBytes = int64_t(256) << 20;

// Rows per block for a product with C input and OC output features: every
// row of a block stages C + OC bf16 values; a multiple of 256 rows unless
// the whole of N fits.
inline int64_t gemm_block_rows(int64_t N, int64_t C, int64_t OC) {
  const int64_t per_row = 2 * (C + OC);
  const int64_t rows = std::max<int64_t>(256, kGemmStageBytes / per_row / 256 * 256);
  return std::min(N, rows);
}

// Workspace bytes one matmul_forward / _accumulate / _backward call asks
// for: the bf16 weight, then a block's bf16 activation rows and bf16 dout rows, each
// region rounded up to 256 bytes (kernels/cuda/workspace.h, Carve).
inline int64_t gemm_stage_bytes(int64_t N, int64_t C, int64_t OC) {
  auto r256 = [](int64_t b) { return (b + 255) / 256 * 256; };
  const int64_t rows = gemm_block_rows(N, C, OC);
  return r256(2 * C * OC) + r256(2 * rows * C) + r256(2 * rows * OC);
}

// layernorm_project_backward (kernels/cuda/layernorm_project.cu) with two
// projections [C, OC]: both weights side by side in bf16 [C, 2 OC], a block
// of gemm_block_rows(N, C, 2 OC) normalised rows and of as many dout rows
// side by side (the forward asks for less).
inline int64_t layernorm_project_bytes(int64_t N, int64_t C, int64_t OC) {
  auto r256 = [](int64_t b) { return (b + 255) / 256 * 256; };
  const int64_t rows = gemm_block_rows(N, C, 2 * OC);
  return r256(2 * C * 2 * OC) + r256(2 * rows * C) + r256(2 * rows * 2 * OC);
}

// Whether the CUDA feed-forward block (kernels/cuda/ffn.cu) keeps its
// forward state in bf16: where C and F are multiples of 8 (every bf16 row
// 16-byte aligned).
inline bool ffn_state_bf16(int64_t C, int64_t F) { return C % 8 == 0 && F % 8 == 0; }

// The CUDA feed-forward block's FfnStateCols (kernels/common/params.h).
// Where the state is bf16: F / 2 each, the pre-activation in h and the
// activation in a for GELU; for ReLU the activation in h (its own slope:
// positive exactly where its input was) and nothing in a. Else the fp32
// pre-activation and activation, F each, as on the CPU.
inline FfnStateCols cuda_ffn_state_cols(int64_t C, int64_t F, bool relu) {
  if (!ffn_state_bf16(C, F)) return {F, F};
  return {F / 2, relu ? 0 : F / 2};
}

// Floats that CUDA's stash of n values takes (Ops::stash: bf16 pairs).
inline int64_t bf16_stash_elems(int64_t n) { return (n + 1) / 2; }

// Widest rows the CUDA LayerNorm writes in bf16 (kernels/cuda/layernorm.cu,
// layernorm_forward_bf16; the projections and the feed-forward block take
// their normalised rows from it up to this width).
constexpr int kLayernormBf16MaxC = 2048;

// Floats per row of layernorm_ffn_forward's `ln` state on CUDA: where the
// block is fused and the rows are at most kLayernormBf16MaxC wide it keeps
// LN(inp) in bf16 only, C / 2 floats a row (kernels/cuda/ffn.cu); else the
// fp32 rows, C. The CPU keeps C.
inline int64_t layernorm_ffn_ln_cols(int64_t C, int64_t F) {
  return ffn_state_bf16(C, F) && C <= kLayernormBf16MaxC ? C / 2 : C;
}

// Rows of the fp32 strip through which the CUDA feed-forward block takes
// its GELU hidden layer where cuBLASLt has no epilogue kernel for it
// (kernels/cuda/ffn.cu): the product in fp32, then a kernel to bf16.
constexpr int64_t kFfnStripRows = 512;

// The feed-forward block's ops (kernels/cuda/ffn.cu) over N rows of C
// features and F hidden ones: both weights in bf16, then a block of
// gemm_block_rows(N, C, F) input rows and, in the backward, as many dout
// rows, and the fp32 strip (kFfnStripRows rows of F); the bias gradients'
// column sums reuse the space afterwards (one double per column per slab
// of 256 rows).
inline int64_t ffn_workspace_bytes(int64_t N, int64_t C, int64_t F) {
  auto r256 = [](int64_t b) { return (b + 255) / 256 * 256; };
  const int64_t rows = gemm_block_rows(N, C, F);
  const int64_t stage = 2 * r256(2 * C * F) + 2 * r256(2 * rows * C) +
                        r256(4 * std::min(rows, kFfnStripRows) * F);
  const int64_t sums = 8 * ((N + 255) / 256) * std::max(C, F);
  return std::max(stage, sums);
}

}  // namespace reformer
