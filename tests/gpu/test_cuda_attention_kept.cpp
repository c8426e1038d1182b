// AttentionParams::kept on CUDA: a tensor-core forward given the buffer
// stages its q, k_hat, v there, and the backward given it reads them instead
// of staging them again. The same values, so the forward's outputs and the
// backward's gradients are the same bits as without it; and the backward
// reads the kept operands and neither qk nor v: both overwritten between
// the forward and the backward change none of its results (the model keeps
// no qk and v for such a layer, framework/memory_plan.h,
// keeps_attention_operands). LSH rounds (the one-pass backward and the round sum) and one
// local round (the direct backward), widths 128, 64 and 40 (padded to 64,
// read by columns), rows wider than a head; the backward's dout-only
// staging (mma_stage_dout_kernel) gives the statistics and staged dout of
// the general one bit for bit, or the gradients would differ.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"
#include "tests/common/patterns.h"
#include "tests/gpu/attention_calls.h"

using namespace reformer;

namespace {

using test::head_call;
using test::pattern;
using test::round_orders;
using test::same_bits;

struct Result {
  std::vector<float> out, lse, dqk, dv;
};

TEST(CudaAttentionKept, BackwardReadsTheForwardsStagedOperandsForTheSameBits) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  for (const int dh : {128, 64, 40}) {
    for (const int rounds : {4, 1}) {
      SCOPED_TRACE("dh " + std::to_string(dh) + ", rounds " + std::to_string(rounds));
      const AttentionParams p = head_call(dh, rounds);
      const int64_t L = p.L, n = L * p.ld;
      IntBuffer<float> dperm = round_orders(*ops, p, 7);
      Buffer<float> qk(*ops, n), v(*ops, n), dout(*ops, n), out(*ops, n), lse(*ops, rounds * L),
          dqk(*ops, n), dv(*ops, n);
      ops->from_host(dout.data(), pattern(n, 3).data(), n);
      const int64_t elems = ops->attention_kept_elems(L, dh, AttentionPrecision::bf16);
      ASSERT_GT(elems, 0);
      Buffer<float> kept(*ops, elems);
      auto run = [&](bool keep, bool change_operands) {
        ops->from_host(qk.data(), pattern(n, 1).data(), n);
        ops->from_host(v.data(), pattern(n, 2).data(), n);
        AttentionParams q = p;
        q.kept = keep ? kept.data() : nullptr;
        ops->chunked_attention_forward(out.data(), nullptr, lse.data(), qk.data(), v.data(),
                                       dperm.data(), q);
        if (change_operands) {
          ops->from_host(qk.data(), pattern(n, 5).data(), n);
          ops->from_host(v.data(), pattern(n, 4).data(), n);
        }
        ops->chunked_attention_backward(dqk.data(), dv.data(), dout.data(), qk.data(), v.data(),
                                        dperm.data(), out.data(), p.ld, lse.data(), q);
        Result res;
        for (auto [dst, src, m] : {std::tuple{&res.out, &out, n}, std::tuple{&res.lse, &lse,
                                   int64_t(rounds) * L}, std::tuple{&res.dqk, &dqk, n},
                                   std::tuple{&res.dv, &dv, n}}) {
          dst->resize(size_t(m));
          ops->to_host(dst->data(), src->data(), m);
        }
        return res;
      };
      const Result base = run(false, false), with = run(true, false), moved = run(true, true);
      const Result unkept_moved = run(false, true);
      EXPECT_TRUE(same_bits(with.out, base.out) && same_bits(with.lse, base.lse)) << "forward";
      EXPECT_TRUE(same_bits(with.dqk, base.dqk)) << "dqk";
      EXPECT_TRUE(same_bits(with.dv, base.dv)) << "dv";
      EXPECT_TRUE(same_bits(moved.dqk, base.dqk) && same_bits(moved.dv, base.dv))
          << "the backward read qk or v, not the kept operands";
      // Without kept, the changed qk and v do change the gradients (the
      // check above could fail).
      EXPECT_FALSE(same_bits(unkept_moved.dqk, base.dqk) && same_bits(unkept_moved.dv, base.dv));
    }
  }
}

}  // namespace
