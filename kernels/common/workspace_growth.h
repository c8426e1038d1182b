// How much the CUDA op workspace allocates for a request (kernels/cuda/
// workspace.h), shared with the memory plan (framework/memory_plan.cpp) so
// the plan's estimate and the allocation agree.
#pragma once

#include <algorithm>
#include <cstdint>

namespace reformer {

// A quarter more than asked, at most 256 MiB more: room for slightly larger
// later requests without reallocating, without a quarter of a 40 GiB
// attention scratch going unused at millions of tokens.
inline int64_t workspace_capacity(int64_t bytes) {
  return bytes + std::min<int64_t>(bytes / 4, int64_t(256) << 20);
}

// The CUDA LayerNorm backward (kernels/cuda/layernorm.cu) for rows of up to
// kLayerNormRegisterCols columns: blocks of layernorm_partial_rows(N) rows,
// at most kLayerNormBlocks of them, each leaving 2 * C double partial sums
// (weight and bias gradients) in the workspace.
constexpr int kLayerNormRegisterCols = 4096;
constexpr int64_t kLayerNormBlocks = 512;
inline int64_t layernorm_partial_rows(int64_t N) {
  return std::max<int64_t>(1, (N + kLayerNormBlocks - 1) / kLayerNormBlocks);
}
inline int64_t layernorm_partial_bytes(int64_t N, int64_t C) {
  const int64_t rows = layernorm_partial_rows(N), blocks = (N + rows - 1) / rows;
  return 16 * blocks * C;
}

}  // namespace reformer
