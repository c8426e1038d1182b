// Token embedding plus axial position embedding (CPU reference).
// Contracts as in kernels/ops.h.
//
// Positions are global: row i of this call is position p = pos_offset + i,
// which reads pos1[p / a2] (first d1 columns) and pos2[p % a2] (the rest).
// The backward splits work over columns, so every gradient element is summed
// by one thread in row order whatever the thread count.
#include "kernels/cpu/embedding.h"

#include <algorithm>

namespace reformer::cpu {

namespace {
// Columns per task in the backward; small enough to give every thread work.
constexpr int kColBlock = 32;
}  // namespace

template <class T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* pos1, const T* pos2,
                       int64_t L, int D, int d1, int a2, int64_t pos_offset) {
  const int d2 = D - d1;
#pragma omp parallel for if (L * D >= (1 << 15))
  for (int64_t i = 0; i < L; ++i) {
    const int64_t p = pos_offset + i;
    const T* tok = wte + int64_t(tokens[i]) * D;
    const T* e1 = pos1 + (p / a2) * d1;
    const T* e2 = pos2 + (p % a2) * d2;
    T* o = out + i * D;
    for (int c = 0; c < d1; ++c) o[c] = tok[c] + e1[c];
    for (int c = 0; c < d2; ++c) o[d1 + c] = tok[d1 + c] + e2[c];
  }
}

template <class T>
void embedding_backward(T* dwte, T* dpos1, T* dpos2, const T* dout, const int32_t* tokens,
                        int64_t L, int D, int d1, int a2, int64_t pos_offset) {
  const int d2 = D - d1;
  const int blocks = (D + kColBlock - 1) / kColBlock;
#pragma omp parallel for if (L * D >= (1 << 15))
  for (int blk = 0; blk < blocks; ++blk) {
    const int c0 = blk * kColBlock;
    const int c1 = std::min(D, c0 + kColBlock);
    for (int64_t i = 0; i < L; ++i) {
      const int64_t p = pos_offset + i;
      const T* g = dout + i * D;
      if (dwte) {
        T* dt = dwte + int64_t(tokens[i]) * D;
        for (int c = c0; c < c1; ++c) dt[c] += g[c];
      }
      if (dpos1) {
        T* d = dpos1 + (p / a2) * d1;
        for (int c = c0; c < std::min(c1, d1); ++c) d[c] += g[c];
      }
      if (dpos2) {
        T* d = dpos2 + (p % a2) * d2;
        for (int c = std::max(c0, d1); c < c1; ++c) d[c - d1] += g[c];
      }
    }
  }
}

#define REFORMER_INSTANTIATE(T)                                                               \
  template void embedding_forward<T>(T*, const int32_t*, const T*, const T*, const T*, int64_t, \
                                     int, int, int, int64_t);                                 \
  template void embedding_backward<T>(T*, T*, T*, const T*, const int32_t*, int64_t, int, int,  \
                                      int, int64_t);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
