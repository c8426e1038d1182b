// The CUDA linear-layer ops stage bf16 operands a block of rows at a time
// (kernels/common/gemm_staging.h). A product over more rows than one block
// must give the same bits as the ops called block by block on the same rows
// (forward and dinp: rows are independent; dw: the blocks' products add up
// in order). The single-block results are checked against the CPU in
// test_conformance_dense. The feed-forward block's and the LayerNorm
// projections' ops over many blocks are compared with the separate ops.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/common/gemm_staging.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"
#include "tests/common/patterns.h"

using namespace reformer;

namespace {

using test::pattern;
using test::same_bits;

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

// pattern(n, seed) * scale on the device, rounded to bf16 numbers (nearest
// even at 8 significant bits) where asked.
Buffer<float> upload_pattern(Ops<float>& ops, int64_t n, uint32_t seed, float scale, bool bf16) {
  std::vector<float> v = pattern(n, seed);
  for (float& x : v) {
    x *= scale;
    if (bf16) {
      uint32_t u;
      std::memcpy(&u, &x, 4);
      u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
      std::memcpy(&x, &u, 4);
    }
  }
  Buffer<float> b(ops, n);
  ops.from_host(b.data(), v.data(), n);
  return b;
}

std::vector<float> download_all(Ops<float>& ops, const Buffer<float>& b, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  ops.to_host(v.data(), b.data(), n);
  return v;
}

// A device, and a row count that runs C x OC products over two whole
// blocks of rows and a short one (kernels/common/gemm_staging.h).
struct ManyBlocks {
  ManyBlocks(int C, int OC) : N(2 * gemm_block_rows(int64_t(1) << 40, C, OC) + 1000) {}
  Buffer<float> up(int64_t n, uint32_t seed, float scale, bool bf16 = false) {
    return upload_pattern(*ops, n, seed, scale, bf16);
  }
  std::vector<float> down(const Buffer<float>& b, int64_t n) { return download_all(*ops, b, n); }
  std::unique_ptr<Ops<float>> ops = make_cuda_ops();
  int64_t N;
};

// Largest |got - want| over the largest |want|.
double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, double(std::fabs(got[i] - want[i])));
    scale = std::max(scale, double(std::fabs(want[i])));
  }
  return scale > 0 ? err / scale : err;
}

// The feed-forward block over more rows than one block (its state in a
// holds every row's activation and pre-activation, each block at its own
// offset) against the separate ops on the same rows: the same bf16
// operands, so the results agree to the rounding of the hidden layer.
TEST(CudaMatmulBlocks, FeedForwardOverManyBlocksMatchesTheSeparateOps) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int C = 1024, F = 4096;
  ManyBlocks m(C, F);
  auto& ops = m.ops;
  const int64_t N = m.N;
  ASSERT_LT(gemm_block_rows(N, C, F), N);
  auto upload = [&](int64_t n, uint32_t seed, float scale, bool bf16 = false) {
    return m.up(n, seed, scale, bf16);
  };
  auto download = [&](const Buffer<float>& b, int64_t n) { return m.down(b, n); };
  // b1 in bf16 numbers: the block's epilogue takes it in bf16, and ReLU's
  // slope would jump where that moved a pre-activation across zero.
  Buffer<float> x = upload(N * C, 11, 1.0f), w1 = upload(int64_t(C) * F, 12, 0.05f),
                b1 = upload(F, 13, 0.5f, true), w2 = upload(int64_t(F) * C, 14, 0.02f),
                b2 = upload(C, 15, 0.5f), dout = upload(N * C, 16, 1.0f);
  for (Activation act : {Activation::gelu, Activation::relu}) {
    SCOPED_TRACE(act == Activation::gelu ? "gelu" : "relu");
    // The block: out -= g (a rebuild), then the backward.
    Buffer<float> out = upload(N * C, 17, 1.0f), h(*ops, N * F), a(*ops, N * F);
    Buffer<float> dx(*ops, N * C), dw1 = upload(int64_t(C) * F, 18, 0.0f),
                  db1 = upload(F, 18, 0.0f), dw2 = upload(int64_t(F) * C, 18, 0.0f),
                  db2 = upload(C, 18, 0.0f);
    ops->ffn_forward(out.data(), h.data(), a.data(), x.data(), w1.data(), b1.data(), w2.data(),
                     b2.data(), N, C, F, act, -1.0f, /*accumulate=*/true, nullptr);
    ops->ffn_backward(dx.data(), dw1.data(), db1.data(), dw2.data(), db2.data(), dout.data(),
                      x.data(), h.data(), a.data(), w1.data(), w2.data(), N, C, F, act);
    // The separate ops.
    Buffer<float> out_s = upload(N * C, 17, 1.0f), h_s(*ops, N * F), a_s(*ops, N * F),
                  da_s(*ops, N * F);
    Buffer<float> dx_s(*ops, N * C), dw1_s = upload(int64_t(C) * F, 18, 0.0f),
                  db1_s = upload(F, 18, 0.0f), dw2_s = upload(int64_t(F) * C, 18, 0.0f),
                  db2_s = upload(C, 18, 0.0f);
    ops->matmul_forward(h_s.data(), x.data(), w1.data(), b1.data(), N, C, F);
    ops->activation_forward(a_s.data(), h_s.data(), N * F, act);
    ops->matmul_accumulate(out_s.data(), a_s.data(), w2.data(), b2.data(), N, F, C, -1.0f,
                           nullptr);
    ops->matmul_backward(da_s.data(), dw2_s.data(), db2_s.data(), dout.data(), a_s.data(),
                         w2.data(), N, F, C, /*add_dinp=*/false);
    ops->activation_backward(da_s.data(), da_s.data(), h_s.data(), N * F, act);
    ops->matmul_backward(dx_s.data(), dw1_s.data(), db1_s.data(), da_s.data(), x.data(),
                         w1.data(), N, C, F, /*add_dinp=*/false);
    EXPECT_LT(rel_err(download(out, N * C), download(out_s, N * C)), 5e-3) << "out";
    EXPECT_LT(rel_err(download(dx, N * C), download(dx_s, N * C)), 2e-2) << "dinp";
    EXPECT_LT(rel_err(download(dw1, int64_t(C) * F), download(dw1_s, int64_t(C) * F)), 2e-2)
        << "dw1";
    EXPECT_LT(rel_err(download(db1, F), download(db1_s, F)), 2e-2) << "db1";
    EXPECT_LT(rel_err(download(dw2, int64_t(F) * C), download(dw2_s, int64_t(F) * C)), 2e-2)
        << "dw2";
    EXPECT_LT(rel_err(download(db2, C), download(db2_s, C)), 1e-6) << "db2";
  }
}

// The first call of a large product times cuBLASLt's candidates
// (kernels/cuda/matmul.cu) by running it several times: the outputs must be
// those of one run, whether the product writes its output (forward),
// accumulates into it in place (the weight gradient, matmul_accumulate onto
// itself) or adds onto a residual held elsewhere. The shapes are used by no
// other test of this process, so its first call here is the timed one; the
// second, on fresh buffers, reuses the kept algorithm and must give the
// same bits.
TEST(CudaMatmulBlocks, TimedProductsLeaveTheOutputsOfOneRun) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  const int C = 1536, OC = 1280;
  const int64_t N = 4096;  // 2 N C OC = 16 GFLOP per product: timed
  ASSERT_GE(2.0 * double(N) * C * OC, 4e9);
  auto upload = [&](int64_t n, uint32_t seed) {
    Buffer<float> b(*ops, n);
    ops->from_host(b.data(), pattern(n, seed).data(), n);
    return b;
  };
  auto download = [&](const Buffer<float>& b, int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    ops->to_host(v.data(), b.data(), n);
    return v;
  };
  Buffer<float> x = upload(N * C, 51), w = upload(int64_t(C) * OC, 52), dout = upload(N * OC, 53);
  struct Out {
    std::vector<float> fwd, acc, onto, dinp, dw;
  };
  auto run = [&]() {
    Buffer<float> fwd(*ops, N * OC), acc = upload(N * OC, 54), onto(*ops, N * OC),
        res = upload(N * OC, 55), dinp(*ops, N * C), dw = upload(int64_t(C) * OC, 56);
    ops->matmul_forward(fwd.data(), x.data(), w.data(), nullptr, N, C, OC);
    // onto first: its key (beta 1) is timed writing onto (res elsewhere),
    // the in-place accumulation then reuses it; dw's is timed into scratch.
    ops->matmul_accumulate(onto.data(), x.data(), w.data(), nullptr, N, C, OC, -1.0f,
                           res.data());
    ops->matmul_accumulate(acc.data(), x.data(), w.data(), nullptr, N, C, OC, 1.0f, nullptr);
    ops->matmul_backward(dinp.data(), dw.data(), nullptr, dout.data(), x.data(), w.data(), N, C,
                         OC, /*add_dinp=*/false);
    return Out{download(fwd, N * OC), download(acc, N * OC), download(onto, N * OC),
               download(dinp, N * C), download(dw, int64_t(C) * OC)};
  };
  const Out first = run(), again = run();
  EXPECT_TRUE(same_bits(first.fwd, again.fwd)) << "forward";
  EXPECT_TRUE(same_bits(first.acc, again.acc)) << "accumulated in place";
  EXPECT_TRUE(same_bits(first.onto, again.onto)) << "onto a residual elsewhere";
  EXPECT_TRUE(same_bits(first.dinp, again.dinp)) << "dinp";
  EXPECT_TRUE(same_bits(first.dw, again.dw)) << "dw accumulated in place";
  // And one run's worth: out - res is the forward's product (to rounding).
  const std::vector<float> res = pattern(N * OC, 55), acc0 = pattern(N * OC, 54);
  double err_onto = 0, err_acc = 0, scale = 0;
  for (size_t i = 0; i < first.fwd.size(); ++i) {
    err_onto = std::max(err_onto, double(std::fabs((res[i] - first.onto[i]) - first.fwd[i])));
    err_acc = std::max(err_acc, double(std::fabs((first.acc[i] - acc0[i]) - first.fwd[i])));
    scale = std::max(scale, double(std::fabs(first.fwd[i])));
  }
  EXPECT_LT(err_onto, 1e-3 * scale);
  EXPECT_LT(err_acc, 1e-3 * scale);
}

// LayerNorm and the feed-forward block in one op over more rows than one
// block against layernorm_forward, ffn_forward (then ffn_backward,
// layernorm_backward): the op keeps the normalised rows in bf16 instead of
// rounding the fp32 ones per product, the same values, so the same bits.
TEST(CudaMatmulBlocks, LayernormFfnGivesTheBitsOfLayernormThenFfn) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int C = 1024, F = 4096;
  ManyBlocks m(C, F);
  auto& ops = m.ops;
  const int64_t N = m.N;
  ASSERT_LT(gemm_block_rows(N, C, F), N);
  Buffer<float> x = m.up(N * C, 31, 2.0f), lw = m.up(C, 32, 1.0f), lb = m.up(C, 33, 0.5f),
                w1 = m.up(int64_t(C) * F, 34, 0.05f), b1 = m.up(F, 35, 0.5f),
                w2 = m.up(int64_t(F) * C, 36, 0.02f), b2 = m.up(C, 37, 0.5f),
                dout = m.up(N * C, 38, 1.0f);
  struct Out {
    Buffer<float> out, mean, rstd, ln, dln, h, a, dx, dlw, dlb, dw1, db1, dw2, db2;
  };
  auto fresh = [&]() {
    return Out{m.up(N * C, 39, 1.0f),        Buffer<float>(*ops, N),     Buffer<float>(*ops, N),
               Buffer<float>(*ops, N * C),     Buffer<float>(*ops, N * C), Buffer<float>(*ops, N * F),
               Buffer<float>(*ops, N * F),     m.up(N * C, 40, 1.0f),    m.up(C, 41, 1.0f),
               m.up(C, 42, 1.0f),            m.up(int64_t(C) * F, 43, 1.0f),
               m.up(F, 44, 1.0f),            m.up(int64_t(F) * C, 45, 1.0f),
               m.up(C, 46, 1.0f)};
  };
  const Activation act = Activation::gelu;
  Out f = fresh(), e = fresh();
  // out -= g (a rebuild), then the backward.
  ops->layernorm_ffn_forward(f.out.data(), f.h.data(), f.a.data(), f.ln.data(), f.mean.data(),
                             f.rstd.data(), x.data(), lw.data(), lb.data(), w1.data(), b1.data(),
                             w2.data(), b2.data(), N, C, F, act, 1e-5f, -1.0f,
                             /*accumulate=*/true, nullptr);
  ops->layernorm_ffn_backward(f.dx.data(), f.dlw.data(), f.dlb.data(), f.dw1.data(),
                              f.db1.data(), f.dw2.data(), f.db2.data(), dout.data(), f.ln.data(),
                              f.dln.data(), f.h.data(), f.a.data(), x.data(), lw.data(),
                              f.mean.data(), f.rstd.data(), w1.data(), w2.data(), N, C, F, act);
  ops->layernorm_forward(e.ln.data(), e.mean.data(), e.rstd.data(), x.data(), lw.data(),
                         lb.data(), N, C, 1e-5f);
  ops->ffn_forward(e.out.data(), e.h.data(), e.a.data(), e.ln.data(), w1.data(), b1.data(),
                   w2.data(), b2.data(), N, C, F, act, -1.0f, /*accumulate=*/true, nullptr);
  ops->ffn_backward(e.dln.data(), e.dw1.data(), e.db1.data(), e.dw2.data(), e.db2.data(),
                    dout.data(), e.ln.data(), e.h.data(), e.a.data(), w1.data(), w2.data(), N, C,
                    F, act);
  ops->layernorm_backward(e.dx.data(), e.dlw.data(), e.dlb.data(), e.dln.data(), x.data(),
                          lw.data(), e.mean.data(), e.rstd.data(), N, C);
  const int64_t W = int64_t(C) * F;
  EXPECT_TRUE(same_bits(m.down(f.out, N * C), m.down(e.out, N * C))) << "out";
  EXPECT_TRUE(same_bits(m.down(f.mean, N), m.down(e.mean, N))) << "mean";
  EXPECT_TRUE(same_bits(m.down(f.rstd, N), m.down(e.rstd, N))) << "rstd";
  EXPECT_TRUE(same_bits(m.down(f.dx, N * C), m.down(e.dx, N * C))) << "dinp";
  EXPECT_TRUE(same_bits(m.down(f.dlw, C), m.down(e.dlw, C))) << "dln_w";
  EXPECT_TRUE(same_bits(m.down(f.dlb, C), m.down(e.dlb, C))) << "dln_b";
  EXPECT_TRUE(same_bits(m.down(f.dw1, W), m.down(e.dw1, W))) << "dw1";
  EXPECT_TRUE(same_bits(m.down(f.db1, F), m.down(e.db1, F))) << "db1";
  EXPECT_TRUE(same_bits(m.down(f.dw2, W), m.down(e.dw2, W))) << "dw2";
  EXPECT_TRUE(same_bits(m.down(f.db2, C), m.down(e.db2, C))) << "db2";
}

// LayerNorm and two projections over more rows than one block, against
// layernorm_forward and the linear ops on the same rows: the same bf16
// operands (the normalised rows rounded once), fp32 accumulation.
TEST(CudaMatmulBlocks, LayernormProjectOverManyBlocksMatchesTheSeparateOps) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int C = 1024, OC = 1024;
  ManyBlocks m(C, OC);
  auto& ops = m.ops;
  const int64_t N = m.N;
  ASSERT_LT(gemm_block_rows(N, C, OC), N);
  auto upload = [&](int64_t n, uint32_t seed, float scale) { return m.up(n, seed, scale); };
  auto download = [&](const Buffer<float>& b, int64_t n) { return m.down(b, n); };
  Buffer<float> x = upload(N * C, 21, 2.0f), lw = upload(C, 22, 1.0f), lb = upload(C, 23, 0.5f),
                w1 = upload(int64_t(C) * OC, 24, 0.05f), w2 = upload(int64_t(C) * OC, 25, 0.05f),
                d1 = upload(N * OC, 26, 1.0f), d2 = upload(N * OC, 27, 1.0f);
  const int64_t W = int64_t(C) * OC;
  struct Out {
    Buffer<float> o1, o2, mean, rstd, ln, dln, dx, dlw, dlb, dw1, dw2;
  };
  auto fresh = [&]() {
    return Out{Buffer<float>(*ops, N * OC), Buffer<float>(*ops, N * OC), Buffer<float>(*ops, N),
               Buffer<float>(*ops, N),      Buffer<float>(*ops, N * C),  Buffer<float>(*ops, N * C),
               upload(N * C, 28, 0.0f),     upload(C, 28, 0.0f),         upload(C, 28, 0.0f),
               upload(W, 28, 0.0f),         upload(W, 28, 0.0f)};
  };
  Out f = fresh(), e = fresh();
  ops->layernorm_project_forward(f.o1.data(), f.o2.data(), f.ln.data(), f.mean.data(),
                                 f.rstd.data(), x.data(), lw.data(), lb.data(), w1.data(),
                                 w2.data(), N, C, OC, 1e-5f, false);
  ops->layernorm_project_backward(f.dx.data(), f.dlw.data(), f.dlb.data(), f.dw1.data(),
                                  f.dw2.data(), d1.data(), d2.data(), f.ln.data(), f.dln.data(),
                                  f.mean.data(), f.rstd.data(), x.data(), lw.data(), lb.data(),
                                  w1.data(), w2.data(), N, C, OC, 1e-5f);
  ops->layernorm_forward(e.ln.data(), e.mean.data(), e.rstd.data(), x.data(), lw.data(),
                         lb.data(), N, C, 1e-5f);
  ops->matmul_forward(e.o1.data(), e.ln.data(), w1.data(), nullptr, N, C, OC);
  ops->matmul_forward(e.o2.data(), e.ln.data(), w2.data(), nullptr, N, C, OC);
  ops->matmul_backward(e.dln.data(), e.dw1.data(), nullptr, d1.data(), e.ln.data(), w1.data(), N,
                       C, OC, /*add_dinp=*/false);
  ops->matmul_backward(e.dln.data(), e.dw2.data(), nullptr, d2.data(), e.ln.data(), w2.data(), N,
                       C, OC, /*add_dinp=*/true);
  ops->layernorm_backward(e.dx.data(), e.dlw.data(), e.dlb.data(), e.dln.data(), x.data(),
                          lw.data(), e.mean.data(), e.rstd.data(), N, C);
  EXPECT_LT(rel_err(download(f.o1, N * OC), download(e.o1, N * OC)), 1e-3) << "out1";
  EXPECT_LT(rel_err(download(f.o2, N * OC), download(e.o2, N * OC)), 1e-3) << "out2";
  EXPECT_LT(rel_err(download(f.mean, N), download(e.mean, N)), 1e-6) << "mean";
  EXPECT_LT(rel_err(download(f.dx, N * C), download(e.dx, N * C)), 1e-3) << "dinp";
  EXPECT_LT(rel_err(download(f.dlw, C), download(e.dlw, C)), 1e-3) << "dln_w";
  EXPECT_LT(rel_err(download(f.dlb, C), download(e.dlb, C)), 1e-3) << "dln_b";
  EXPECT_LT(rel_err(download(f.dw1, W), download(e.dw1, W)), 1e-3) << "dw1";
  EXPECT_LT(rel_err(download(f.dw2, W), download(e.dw2, W)), 1e-3) << "dw2";
}

}  // namespace
