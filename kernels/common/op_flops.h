// Floating-point operations of the matrix products and attention ops, the
// work a model-FLOPs count (MFU) is made of. A multiply-add is 2 FLOPs.
// Elementwise passes, normalisation, hashing and sorting are not counted.
//
// Attention counts query-key pairs: the forward costs 4 dh FLOPs per pair
// (q . k and p . v); the backward 10 dh (the scores recomputed, dP = dO V^T,
// dV, dQ and dK), the usual 2.5 times the forward. Pairs are those the op
// scores, masked or not: chunked attention scores every slot of a chunk
// against every slot of the chunks in its window; full attention scores the
// keys at or before each query (causal) or all of them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "kernels/common/params.h"

namespace reformer {

// Query-key pairs one chunked attention call (one head, every round) scores.
inline double chunked_attention_pairs(const AttentionParams& p) {
  if (p.chunk <= 0 || p.L <= 0) return 0.0;
  const int64_t n = p.L / p.chunk;
  double chunk_pairs = 0.0;  // (query chunk, key chunk) pairs per round
  if (p.wrap) {
    chunk_pairs = double(n) * double(std::min<int64_t>(n, p.chunks_before + p.chunks_after + 1));
  } else {
    for (int o = -p.chunks_before; o <= p.chunks_after; ++o)
      chunk_pairs += double(std::max<int64_t>(0, n - std::abs(o)));
  }
  return double(p.n_rounds) * chunk_pairs * double(p.chunk) * double(p.chunk);
}

// Query-key pairs one full attention call (one head) scores.
inline double full_attention_pairs(const AttentionParams& p) {
  const double L = double(p.L);
  return p.causal ? L * (L + 1) / 2 : L * L;
}

inline double attention_forward_flops(double pairs, int dh) { return 4.0 * dh * pairs; }
inline double attention_backward_flops(double pairs, int dh) { return 10.0 * dh * pairs; }

// out [N, OC] = inp [N, C] W [C, OC]
inline double matmul_forward_flops(int64_t N, int C, int OC) {
  return 2.0 * double(N) * double(C) * double(OC);
}
// dinp and dW, each as much as the forward (either may be skipped).
inline double matmul_backward_flops(int64_t N, int C, int OC, bool dinp, bool dw) {
  return (double(dinp) + double(dw)) * matmul_forward_flops(N, C, OC);
}

// The feed-forward block's two products; the backward's four (the
// activation's gradient always, dinp, dw1 and dw2 where asked).
inline double ffn_forward_flops(int64_t N, int C, int F) {
  return 2.0 * matmul_forward_flops(N, C, F);
}
inline double ffn_backward_flops(int64_t N, int C, int F, bool dinp, bool dw1, bool dw2) {
  return matmul_backward_flops(N, F, C, true, dw2) + matmul_backward_flops(N, C, F, dinp, dw1);
}

}  // namespace reformer
