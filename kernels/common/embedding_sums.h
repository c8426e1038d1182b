// How the CUDA token-embedding backward (kernels/cuda/embedding.cu) sums
// dwte in a fixed order, shared with the memory plan (framework/
// memory_plan.cpp) so that the plan's workspace estimate covers its request.
//
// The positions are sorted by token (a stable radix sort, so each token's
// positions stay in increasing order), and the sorted slots are summed in
// windows of kDwteWindow: a token whose slots lie within one window is
// summed there and added to its row; one whose slots cross a window's end
// leaves its parts in per-window partial sums [windows, D] (the part that
// began in an earlier window, the part that goes on into the next), added
// up in window order by a second pass.
#pragma once

#include <cstdint>

namespace reformer {

// Sorted slots per window of the dwte sum.
constexpr int64_t kDwteWindow = 256;

inline int64_t dwte_windows(int64_t L) { return (L + kDwteWindow - 1) / kDwteWindow; }

// A bound on the radix sort's scratch for L int32 keys sorted through a
// double buffer (CUB onesweep: 256 counters for each tile of at least 1024
// keys, and per pass 256 bins): checked against CUB's own figure by
// tests/gpu/test_cuda_embedding.cpp.
inline int64_t dwte_sort_scratch_bound(int64_t L) { return L + (int64_t(1) << 20); }

// Workspace bytes of embedding_backward with dwte: the keys and positions
// double-buffered (four [L] int32), the sort's scratch (at most the bound
// above) and the two per-window partial sums, each region rounded up to 256
// bytes (kernels/cuda/workspace.h, Carve).
inline int64_t dwte_workspace_bytes(int64_t L, int64_t D) {
  auto r256 = [](int64_t b) { return (b + 255) / 256 * 256; };
  return 4 * r256(4 * L) + r256(dwte_sort_scratch_bound(L)) + 2 * r256(4 * dwte_windows(L) * D);
}

}  // namespace reformer
