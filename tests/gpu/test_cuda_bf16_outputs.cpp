// Attention outputs in bf16 on CUDA (AttentionParams::out_bf16, Operand):
// the attention writes its combined output rounded to bf16, which is what
// Ops::stash makes of its fp32 output, bit for bit; its backward reading
// that output gives the gradients it gives reading the fp32 one, bit for
// bit (it rounds `out` to bf16 first); and the products taking bf16 inputs
// give what they give for the fp32 values they round (matmul_forward,
// matmul_accumulate, matmul_backward's weight gradient). LSH rounds and one
// local round, widths 128, 64 and 40, rows wider than a head; the calls
// that cannot write bf16 outputs refuse them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/errors.h"
#include "kernels/ops.h"
#include "tests/common/patterns.h"

using namespace reformer;

namespace {

using test::pattern;
using test::same_bits;

std::vector<float> host(Ops<float>& ops, const float* p, int64_t n) {
  std::vector<float> h(static_cast<size_t>(n));
  ops.to_host(h.data(), p, n);
  return h;
}

TEST(CudaBf16Outputs, AttentionWritesAndReadsItsOutputInBf16) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  ASSERT_TRUE(ops->attention_output_bf16(AttentionPrecision::bf16));
  ASSERT_FALSE(ops->attention_output_bf16(AttentionPrecision::fp32));
  for (const int dh : {128, 64, 40}) {
    for (const int rounds : {4, 1}) {
      SCOPED_TRACE("dh " + std::to_string(dh) + ", rounds " + std::to_string(rounds));
      AttentionParams p;
      p.L = dh == 40 ? 2000 : 2048;
      p.dh = dh;
      p.ld = 3 * int64_t(dh);
      p.n_rounds = rounds;
      p.chunk = dh == 40 ? 16 : 64;
      p.wrap = rounds > 1;
      p.accumulate = false;
      const int64_t L = p.L, n = L * p.ld, nb = ops->stash_elems(n);
      std::vector<int32_t> perm(size_t(rounds) * size_t(L));
      std::mt19937 rng(11);
      for (int r = 0; r < rounds; ++r) {
        auto first = perm.begin() + int64_t(r) * L;
        std::iota(first, first + L, 0);
        if (rounds > 1) std::shuffle(first, first + L, rng);
      }
      Buffer<float> qk(*ops, n), v(*ops, n), dout(*ops, n), out(*ops, n), lse(*ops, rounds * L),
          dqk(*ops, n), dv(*ops, n), out_b(*ops, nb), want_b(*ops, nb);
      IntBuffer<float> dperm(*ops, rounds * L);
      ops->from_host_i32(dperm.data(), perm.data(), rounds * L);
      ops->from_host(qk.data(), pattern(n, 1).data(), n);
      ops->from_host(v.data(), pattern(n, 2).data(), n);
      ops->from_host(dout.data(), pattern(n, 3).data(), n);
      ops->fill(out.data(), 0.0f, n);
      ops->fill(out_b.data(), 0.0f, nb);

      // The forward: bf16 output = the fp32 output stashed (rounded to
      // nearest even), every row, the columns past dh untouched (0).
      ops->chunked_attention_forward(out.data(), nullptr, lse.data(), qk.data(), v.data(),
                                     dperm.data(), p);
      const std::vector<float> lse_f = host(*ops, lse.data(), rounds * L);
      ops->stash(want_b.data(), out.data(), n);
      AttentionParams q = p;
      q.out_bf16 = true;
      ops->chunked_attention_forward(out_b.data(), nullptr, lse.data(), qk.data(), v.data(),
                                     dperm.data(), q);
      EXPECT_TRUE(same_bits(host(*ops, out_b.data(), nb), host(*ops, want_b.data(), nb)));
      EXPECT_TRUE(same_bits(host(*ops, lse.data(), rounds * L), lse_f));

      // The backward from either output: the same gradients.
      auto grads = [&](const float* o, const AttentionParams& a) {
        ops->chunked_attention_backward(dqk.data(), dv.data(), dout.data(), qk.data(), v.data(),
                                        dperm.data(), o, p.ld, lse.data(), a);
        return std::pair{host(*ops, dqk.data(), n), host(*ops, dv.data(), n)};
      };
      const auto [dqk_f, dv_f] = grads(out.data(), p);
      const auto [dqk_b, dv_b] = grads(out_b.data(), q);
      EXPECT_TRUE(same_bits(dqk_b, dqk_f));
      EXPECT_TRUE(same_bits(dv_b, dv_f));

      // Calls that keep no bf16 output refuse one.
      AttentionParams fold = q;
      fold.fold_rounds = true;
      EXPECT_THROW(ops->chunked_attention_forward(out_b.data(), nullptr, lse.data(), qk.data(),
                                                  v.data(), dperm.data(), fold),
                   ShapeError);
      EXPECT_THROW(ops->chunked_attention_backward(dqk.data(), dv.data(), dout.data(), qk.data(),
                                                   v.data(), dperm.data(), out_b.data(), p.ld,
                                                   lse.data(), fold),
                   ShapeError);
      AttentionParams fp32 = q;
      fp32.precision = AttentionPrecision::fp32;
      EXPECT_THROW(ops->chunked_attention_forward(out_b.data(), nullptr, lse.data(), qk.data(),
                                                  v.data(), dperm.data(), fp32),
                   ShapeError);
    }
  }
  AttentionParams full;
  full.L = 256;
  full.dh = 64;
  full.ld = 64;
  full.out_bf16 = true;
  Buffer<float> x(*ops, full.L * full.ld), lse(*ops, full.L);
  EXPECT_THROW(ops->full_attention_forward(x.data(), lse.data(), x.data(), x.data(), full),
               ShapeError);
}

// matmul_forward, matmul_accumulate and matmul_backward with their input in
// bf16 (the fp32 input stashed) against the fp32 input: the same bits (the
// products round it to the same bf16 values first). Rows over several of
// the products' row blocks' sizes and widths that are multiples of 8.
TEST(CudaBf16Outputs, ProductsTakeBf16Inputs) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  for (const auto& [N, C, OC] : {std::tuple{300, 64, 96}, std::tuple{4096, 128, 256}}) {
    SCOPED_TRACE(std::to_string(N) + " x " + std::to_string(C) + " x " + std::to_string(OC));
    const int64_t ni = int64_t(N) * C, no = int64_t(N) * OC, nw = int64_t(C) * OC;
    Buffer<float> inp(*ops, ni), inp_b(*ops, ops->stash_elems(ni)), w(*ops, nw),
        out(*ops, no), res(*ops, no), dout(*ops, no), dinp(*ops, ni), dw(*ops, nw);
    ops->from_host(inp.data(), pattern(ni, 1).data(), ni);
    ops->from_host(w.data(), pattern(nw, 2).data(), nw);
    ops->from_host(res.data(), pattern(no, 3).data(), no);
    ops->from_host(dout.data(), pattern(no, 4).data(), no);
    ops->stash(inp_b.data(), inp.data(), ni);
    auto run = [&](bool b) {
      const Operand<float> a = b ? Operand<float>{inp_b.data(), true} : Operand<float>{inp.data()};
      std::vector<std::vector<float>> r;
      ops->matmul_forward(out.data(), a, w.data(), nullptr, N, C, OC);
      r.push_back(host(*ops, out.data(), no));
      ops->matmul_accumulate(out.data(), a, w.data(), nullptr, N, C, OC, -1.0f, res.data());
      r.push_back(host(*ops, out.data(), no));
      ops->fill(dw.data(), 0.0f, nw);
      ops->matmul_backward(dinp.data(), dw.data(), nullptr, dout.data(), a, w.data(), N, C, OC,
                           false);
      r.push_back(host(*ops, dw.data(), nw));
      r.push_back(host(*ops, dinp.data(), ni));
      return r;
    };
    const auto f = run(false), h = run(true);
    for (size_t i = 0; i < f.size(); ++i) EXPECT_TRUE(same_bits(h[i], f[i])) << "result " << i;
  }
}

}  // namespace
