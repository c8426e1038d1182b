// The CUDA linear-layer ops stage bf16 operands a block of rows at a time
// (kernels/common/gemm_staging.h). A product over more rows than one block
// must give the same bits as the ops called block by block on the same rows
// (forward and dinp: rows are independent; dw: the blocks' products add up
// in order). The single-block results are checked against the CPU in
// test_conformance_dense.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/common/gemm_staging.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"

using namespace reformer;

namespace {

std::vector<float> pattern(int64_t n, uint32_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  uint32_t s = seed;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = float(int32_t(s >> 8) % 2001 - 1000) / 1000.0f;
  }
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(CudaMatmulBlocks, ManyBlocksEqualTheOpsCalledBlockByBlock) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  const int C = 4096, OC = 2048;
  const int64_t rows = gemm_block_rows(int64_t(1) << 40, C, OC);
  const int64_t N = 2 * rows + 1000;  // two whole blocks and a short one
  ASSERT_LT(gemm_block_rows(N, C, OC), N);

  Buffer<float> x(*ops, N * C), w(*ops, int64_t(C) * OC), dout(*ops, N * OC);
  ops->from_host(x.data(), pattern(N * C, 1).data(), N * C);
  ops->from_host(w.data(), pattern(int64_t(C) * OC, 2).data(), int64_t(C) * OC);
  ops->from_host(dout.data(), pattern(N * OC, 3).data(), N * OC);
  const std::vector<float> dinp0 = pattern(N * C, 4), dw0 = pattern(int64_t(C) * OC, 5);

  auto run = [&](bool whole, std::vector<float>* out, std::vector<float>* dinp,
                 std::vector<float>* dw) {
    Buffer<float> o(*ops, N * OC), di(*ops, N * C), g(*ops, int64_t(C) * OC);
    ops->from_host(di.data(), dinp0.data(), N * C);
    ops->from_host(g.data(), dw0.data(), int64_t(C) * OC);
    if (whole) {
      ops->matmul_forward(o.data(), x.data(), w.data(), nullptr, N, C, OC);
      ops->matmul_backward(di.data(), g.data(), nullptr, dout.data(), x.data(), w.data(), N, C,
                           OC, /*add_dinp=*/true);
    } else {
      for (int64_t r0 = 0; r0 < N; r0 += rows) {
        const int64_t nr = std::min(rows, N - r0);
        ops->matmul_forward(o.data() + r0 * OC, x.data() + r0 * C, w.data(), nullptr, nr, C, OC);
        ops->matmul_backward(di.data() + r0 * C, g.data(), nullptr, dout.data() + r0 * OC,
                             x.data() + r0 * C, w.data(), nr, C, OC, /*add_dinp=*/true);
      }
    }
    out->resize(size_t(N * OC));
    dinp->resize(size_t(N * C));
    dw->resize(size_t(C) * OC);
    ops->to_host(out->data(), o.data(), N * OC);
    ops->to_host(dinp->data(), di.data(), N * C);
    ops->to_host(dw->data(), g.data(), int64_t(C) * OC);
  };
  std::vector<float> o1, di1, g1, o2, di2, g2;
  run(true, &o1, &di1, &g1);
  run(false, &o2, &di2, &g2);
  EXPECT_TRUE(same_bits(o1, o2)) << "forward";
  EXPECT_TRUE(same_bits(di1, di2)) << "dinp";
  EXPECT_TRUE(same_bits(g1, g2)) << "dw";
  // And the products did something: the gradients moved from their start.
  EXPECT_FALSE(same_bits(di1, dinp0));
  EXPECT_FALSE(same_bits(g1, dw0));
}

}  // namespace
