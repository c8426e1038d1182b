// Attention calls shared by the GPU op tests of the bf16 buffers and of
// the kept staging (test_cuda_bf16_outputs.cpp, test_cuda_attention_kept.cpp).
#pragma once

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/common/params.h"
#include "kernels/ops.h"

namespace reformer::test {

// A chunked call over one head of a [L, 3 dh] buffer, writing its
// gradients: widths 128 and 64 over 2048 positions in chunks of 64 (the
// walking kernels), 40 over 2000 in chunks of 16 (padded to 64, read by
// columns; the dout-only staging's last warp holds fewer than its 4
// positions); wrapping where it has several rounds (LSH; a local layer's
// one round does not).
inline AttentionParams head_call(int dh, int rounds) {
  AttentionParams p;
  p.L = dh == 40 ? 2000 : 2048;
  p.dh = dh;
  p.ld = 3 * int64_t(dh);
  p.n_rounds = rounds;
  p.chunk = dh == 40 ? 16 : 64;
  p.wrap = rounds > 1;
  p.accumulate = false;
  return p;
}

// p's rounds' orders on the device: each a shuffle of the positions (rng
// seeded with seed) where p has several rounds, else the identity.
inline IntBuffer<float> round_orders(Ops<float>& ops, const AttentionParams& p, uint32_t seed) {
  const int64_t L = p.L, R = p.n_rounds;
  std::vector<int32_t> perm(size_t(R * L));
  std::mt19937 rng(seed);
  for (int64_t r = 0; r < R; ++r) {
    auto first = perm.begin() + r * L;
    std::iota(first, first + L, 0);
    if (R > 1) std::shuffle(first, first + L, rng);
  }
  IntBuffer<float> d(ops, R * L);
  ops.from_host_i32(d.data(), perm.data(), R * L);
  return d;
}

}  // namespace reformer::test
