// Attention outputs in bf16 on CUDA (AttentionParams::out_bf16, Operand):
// the attention writes its combined output rounded to bf16, which is what
// Ops::stash makes of its fp32 output, bit for bit; its backward reading
// that output gives the gradients it gives reading the fp32 one, bit for
// bit (it rounds `out` to bf16 first); and the products taking bf16 inputs
// give what they give for the fp32 values they round (matmul_forward,
// matmul_accumulate, matmul_backward's weight gradient). LSH rounds and one
// local round, widths 128, 64 and 40, rows wider than a head; the calls
// that cannot write bf16 outputs refuse them. The gradients in bf16
// (AttentionParams::grad_bf16): the backward writes dqk and dv rounded, the
// fp32 gradients stashed bit for bit, side by side in one buffer, and the
// projections' backward reading them gives what it gives for the fp32
// gradients (layernorm_project_backward with Operand rows of a stride). The
// operands in bf16 (AttentionParams::in_bf16, layernorm_project_forward's
// out_bf16, lsh_hash's Operand): the projections write them within one
// bf16 step of their fp32 results rounded, and the hash and the attention
// reading them give what they give for fp32 operands of those values.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
#include "tests/gpu/attention_calls.h"

using namespace reformer;

namespace {

using test::head_call;
using test::pattern;
using test::round_orders;
using test::same_bits;

std::vector<float> host(Ops<float>& ops, const float* p, int64_t n) {
  std::vector<float> h(static_cast<size_t>(n));
  ops.to_host(h.data(), p, n);
  return h;
}

// The n bf16 values at p (n / 2 floats, n even) as their bits.
std::vector<uint16_t> host_bf16(Ops<float>& ops, const float* p, int64_t n) {
  const std::vector<float> f = host(ops, p, n / 2);
  std::vector<uint16_t> h(static_cast<size_t>(n));
  std::memcpy(h.data(), f.data(), sizeof(uint16_t) * h.size());
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
      const AttentionParams p = head_call(dh, rounds);
      const int64_t L = p.L, n = L * p.ld, nb = ops->stash_elems(n);
      IntBuffer<float> dperm = round_orders(*ops, p, 11);
      Buffer<float> qk(*ops, n), v(*ops, n), dout(*ops, n), out(*ops, n), lse(*ops, rounds * L),
          dqk(*ops, n), dv(*ops, n), out_b(*ops, nb), want_b(*ops, nb);
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

// The backward with grad_bf16 writes dqk at bf16 element i * ld_grad + d
// and dv likewise (here dv's rows after dqk's in one buffer of 2 ld values
// a row, as the model lays them out) as the fp32 gradients rounded to
// nearest even (Ops::stash), and leaves the other columns alone; calls that
// cannot write them refuse.
TEST(CudaBf16Outputs, AttentionBackwardWritesItsGradientsInBf16) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  for (const int dh : {128, 64, 40}) {
    SCOPED_TRACE("dh " + std::to_string(dh));
    const AttentionParams p = head_call(dh, 4);
    const int64_t L = p.L, n = L * p.ld, R = p.n_rounds;
    IntBuffer<float> dperm = round_orders(*ops, p, 12);
    Buffer<float> qk(*ops, n), v(*ops, n), dout(*ops, n), out(*ops, n), lse(*ops, R * L),
        dqk(*ops, n), dv(*ops, n), grads(*ops, n), want_q(*ops, ops->stash_elems(n)),
        want_v(*ops, ops->stash_elems(n));
    ops->from_host(qk.data(), pattern(n, 5).data(), n);
    ops->from_host(v.data(), pattern(n, 6).data(), n);
    ops->from_host(dout.data(), pattern(n, 7).data(), n);
    ops->chunked_attention_forward(out.data(), nullptr, lse.data(), qk.data(), v.data(),
                                   dperm.data(), p);
    ops->chunked_attention_backward(dqk.data(), dv.data(), dout.data(), qk.data(), v.data(),
                                    dperm.data(), out.data(), p.ld, lse.data(), p);
    ops->stash(want_q.data(), dqk.data(), n);
    ops->stash(want_v.data(), dv.data(), n);
    const std::vector<uint16_t> wq = host_bf16(*ops, want_q.data(), n),
                                wv = host_bf16(*ops, want_v.data(), n);
    AttentionParams q = p;
    q.grad_bf16 = true;
    q.ld_grad = 2 * p.ld;
    const std::vector<float> fill = pattern(n, 8);  // what the other columns hold
    ops->from_host(grads.data(), fill.data(), n);
    ops->chunked_attention_backward(grads.data(), grads.data() + p.ld / 2, dout.data(),
                                    qk.data(), v.data(), dperm.data(), out.data(), p.ld,
                                    lse.data(), q);
    const std::vector<uint16_t> got = host_bf16(*ops, grads.data(), 2 * n);
    std::vector<uint16_t> filled(got.size());
    std::memcpy(filled.data(), fill.data(), sizeof(uint16_t) * filled.size());
    int64_t bad = 0, moved = 0;
    for (int64_t i = 0; i < L; ++i)
      for (int64_t c = 0; c < 2 * p.ld; ++c) {
        const int64_t e = i * 2 * p.ld + c, d = c % p.ld;
        const bool mine = d < dh;
        const uint16_t want = !mine ? filled[size_t(e)]
                              : c < p.ld ? wq[size_t(i * p.ld + d)]
                                         : wv[size_t(i * p.ld + d)];
        bad += got[size_t(e)] != want;
        moved += mine && got[size_t(e)] != filled[size_t(e)];
      }
    EXPECT_EQ(bad, 0);
    EXPECT_GT(moved, L * dh);  // the gradients were written (most differ from the fill)

    auto refuses = [&](const AttentionParams& a) {
      EXPECT_THROW(ops->chunked_attention_backward(grads.data(), grads.data() + p.ld / 2,
                                                   dout.data(), qk.data(), v.data(),
                                                   dperm.data(), out.data(), p.ld, lse.data(),
                                                   a),
                   ShapeError);
    };
    AttentionParams bad_call = q;
    bad_call.fold_rounds = true;
    refuses(bad_call);
    bad_call = q;
    bad_call.accumulate = true;
    refuses(bad_call);
    bad_call = q;
    bad_call.n_rounds = 1;
    refuses(bad_call);
    bad_call = q;
    bad_call.precision = AttentionPrecision::fp32;
    refuses(bad_call);
    bad_call = q;
    bad_call.ld_grad = dh - 1;
    refuses(bad_call);
  }
  AttentionParams full;
  full.L = 256;
  full.dh = 64;
  full.ld = 64;
  full.accumulate = false;
  full.grad_bf16 = true;
  full.ld_grad = 128;
  Buffer<float> x(*ops, full.L * full.ld), lse(*ops, full.L);
  EXPECT_THROW(ops->full_attention_backward(x.data(), x.data(), x.data(), x.data(), x.data(),
                                            x.data(), lse.data(), full),
               ShapeError);
}

// layernorm_project_backward from bf16 gradients (the fp32 ones stashed):
// side by side in one buffer of 2 OC a row (read in place), in two buffers
// (copied), and dout1 alone (w2 null), against the fp32 gradients: the same
// bits in every output (it rounds them to those bf16 values first). Rows
// over several of the product's row blocks.
TEST(CudaBf16Outputs, ProjectionsBackwardTakesBf16Gradients) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  for (const auto& [N, C, OC] : {std::tuple{300, 64, 96}, std::tuple{5000, 256, 128}}) {
    SCOPED_TRACE(std::to_string(N) + " x " + std::to_string(C) + " x " + std::to_string(OC));
    const int64_t nd = int64_t(N) * OC, nx = int64_t(N) * C, nw = int64_t(C) * OC;
    Buffer<float> d1(*ops, nd), d2(*ops, nd), d1b(*ops, nd / 2), d2b(*ops, nd / 2),
        both(*ops, nd), inp(*ops, nx), lw(*ops, C), lb(*ops, C), w1(*ops, nw), w2(*ops, nw),
        dinp(*ops, nx), dlw(*ops, C), dlb(*ops, C), dw1(*ops, nw), dw2(*ops, nw), ln(*ops, nx),
        dln(*ops, nx), mean(*ops, N), rstd(*ops, N);
    ops->from_host(d1.data(), pattern(nd, 21).data(), nd);
    ops->from_host(d2.data(), pattern(nd, 22).data(), nd);
    ops->from_host(inp.data(), pattern(nx, 23).data(), nx);
    ops->from_host(lw.data(), pattern(C, 24).data(), C);
    ops->from_host(lb.data(), pattern(C, 25).data(), C);
    ops->from_host(w1.data(), pattern(nw, 26).data(), nw);
    ops->from_host(w2.data(), pattern(nw, 27).data(), nw);
    ops->stash(d1b.data(), d1.data(), nd);
    ops->stash(d2b.data(), d2.data(), nd);
    {  // both: row i = d1b's row i, then d2b's
      const std::vector<uint16_t> a = host_bf16(*ops, d1b.data(), nd),
                                  b = host_bf16(*ops, d2b.data(), nd);
      std::vector<uint16_t> ab(size_t(2 * nd));
      for (int64_t i = 0; i < N; ++i) {
        std::copy_n(a.begin() + i * OC, OC, ab.begin() + 2 * i * OC);
        std::copy_n(b.begin() + i * OC, OC, ab.begin() + (2 * i + 1) * OC);
      }
      std::vector<float> f(static_cast<size_t>(nd));
      std::memcpy(f.data(), ab.data(), sizeof(float) * f.size());
      ops->from_host(both.data(), f.data(), nd);
    }
    auto run = [&](Operand<float> a, Operand<float> b, bool second) {
      for (Buffer<float>* x : {&dinp, &dlw, &dlb, &dw1, &dw2}) ops->fill(x->data(), 0.0f, x->size());
      ops->layernorm_project_backward(dinp.data(), dlw.data(), dlb.data(), dw1.data(),
                                      second ? dw2.data() : nullptr, a, b, ln.data(), dln.data(),
                                      mean.data(), rstd.data(), inp.data(), lw.data(), lb.data(),
                                      w1.data(), second ? w2.data() : nullptr, N, C, OC, 1e-5f);
      std::vector<std::vector<float>> r;
      for (Buffer<float>* x : {&dinp, &dlw, &dlb, &dw1, &dw2})
        r.push_back(host(*ops, x->data(), x->size()));
      return r;
    };
    const auto want = run(d1.data(), d2.data(), true);
    const auto in_place = run(Operand<float>{both.data(), true, 2 * OC},
                              Operand<float>{both.data() + OC / 2, true, 2 * OC}, true);
    const auto copied =
        run(Operand<float>{d1b.data(), true}, Operand<float>{d2b.data(), true}, true);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_TRUE(same_bits(in_place[i], want[i])) << "in place, result " << i;
      EXPECT_TRUE(same_bits(copied[i], want[i])) << "copied, result " << i;
    }
    const auto want1 = run(d1.data(), nullptr, false);
    const auto one = run(Operand<float>{d1b.data(), true}, nullptr, false);
    for (size_t i = 0; i < want1.size(); ++i)
      EXPECT_TRUE(same_bits(one[i], want1[i])) << "one projection, result " << i;
  }
}

// The bf16 value of bits b as a float.
float bf16_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// layernorm_project_forward with out_bf16: each value within one bf16 step
// of the fp32 result's (cuBLASLt may sum in another order for bf16
// outputs, moving a value across a rounding boundary), the statistics the
// same bits; and most values equal.
TEST(CudaBf16Outputs, ProjectionsWriteBf16Operands) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  for (const auto& [N, C, OC] : {std::tuple{300, 64, 96}, std::tuple{5000, 256, 128}}) {
    SCOPED_TRACE(std::to_string(N) + " x " + std::to_string(C) + " x " + std::to_string(OC));
    const int64_t no = int64_t(N) * OC, nx = int64_t(N) * C, nw = int64_t(C) * OC;
    Buffer<float> o1(*ops, no), o2(*ops, no), b1(*ops, no / 2), b2(*ops, no / 2),
        w1_rn(*ops, no / 2), w2_rn(*ops, no / 2), inp(*ops, nx), lw(*ops, C), lb(*ops, C),
        w1(*ops, nw), w2(*ops, nw), ln(*ops, nx), mean(*ops, N), rstd(*ops, N), mean_b(*ops, N),
        rstd_b(*ops, N);
    ops->from_host(inp.data(), pattern(nx, 31).data(), nx);
    ops->from_host(lw.data(), pattern(C, 32).data(), C);
    ops->from_host(lb.data(), pattern(C, 33).data(), C);
    ops->from_host(w1.data(), pattern(nw, 34).data(), nw);
    ops->from_host(w2.data(), pattern(nw, 35).data(), nw);
    ops->layernorm_project_forward(o1.data(), o2.data(), ln.data(), mean.data(), rstd.data(),
                                   inp.data(), lw.data(), lb.data(), w1.data(), w2.data(), N, C,
                                   OC, 1e-5f, false);
    ops->layernorm_project_forward(b1.data(), b2.data(), ln.data(), mean_b.data(),
                                   rstd_b.data(), inp.data(), lw.data(), lb.data(), w1.data(),
                                   w2.data(), N, C, OC, 1e-5f, true);
    EXPECT_TRUE(same_bits(host(*ops, mean_b.data(), N), host(*ops, mean.data(), N)));
    EXPECT_TRUE(same_bits(host(*ops, rstd_b.data(), N), host(*ops, rstd.data(), N)));
    ops->stash(w1_rn.data(), o1.data(), no);
    ops->stash(w2_rn.data(), o2.data(), no);
    for (auto [got_p, want_p] : {std::pair{&b1, &w1_rn}, std::pair{&b2, &w2_rn}}) {
      const std::vector<uint16_t> got = host_bf16(*ops, got_p->data(), no),
                                  want = host_bf16(*ops, want_p->data(), no);
      int64_t far = 0, differ = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const float g = bf16_float(got[i]), w = bf16_float(want[i]);
        differ += got[i] != want[i];
        far += std::fabs(g - w) > std::ldexp(std::max(std::fabs(g), std::fabs(w)), -7);
      }
      EXPECT_EQ(far, 0);
      EXPECT_LT(differ, no / 100);
    }
  }
  Buffer<float> x(*ops, 64 * 12);
  EXPECT_THROW(ops->layernorm_project_forward(x.data(), x.data(), x.data(), x.data(), x.data(),
                                              x.data(), x.data(), x.data(), x.data(), x.data(),
                                              8, 12, 12, 1e-5f, true),
               ShapeError);  // C = 12: no fused projections, no bf16 outputs
}

// lsh_hash of bf16 rows (the fp32 rows stashed) against the fp32 rows: the
// same buckets (the hash rounds fp32 values to those bf16 ones first).
// Widths 64 and 128 (the tensor-core hash) and 40 (rows rounded into the
// workspace), two heads side by side, factorized buckets and not.
TEST(CudaBf16Outputs, HashReadsBf16Operands) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  for (const int dh : {64, 128, 40}) {
    for (const int f0 : {0, 8}) {
      SCOPED_TRACE("dh " + std::to_string(dh) + ", factor0 " + std::to_string(f0));
      const int64_t L = 3000, heads = 2, ld = heads * dh, n = L * ld;
      const int n_hashes = 3, n_buckets = 64;
      const int64_t nR = int64_t(n_hashes) * dh * rotation_cols(n_buckets, f0);
      Buffer<float> qk(*ops, n), qk_b(*ops, n / 2), R(*ops, heads * nR);
      IntBuffer<float> b(*ops, heads * n_hashes * L), bb(*ops, heads * n_hashes * L);
      ops->from_host(qk.data(), pattern(n, 41).data(), n);
      ops->stash(qk_b.data(), qk.data(), n);
      for (int j = 0; j < heads; ++j)
        ops->lsh_rotations(R.data() + j * nR, 3, 0, 0, j, n_hashes, dh, n_buckets, f0);
      ops->lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, f0, heads);
      ops->lsh_hash(bb.data(), Operand<float>{qk_b.data(), true}, ld, R.data(), L, dh, n_hashes,
                    n_buckets, f0, heads);
      const int64_t nb = heads * n_hashes * L;
      std::vector<int32_t> want(static_cast<size_t>(nb)), got(want.size());
      ops->to_host_i32(want.data(), b.data(), nb);
      ops->to_host_i32(got.data(), bb.data(), nb);
      EXPECT_EQ(got, want);
    }
  }
}

// The attention forward and backward reading bf16 qk and v (the fp32 ones
// stashed; in_bf16) against the fp32 ones: the same bits in out, lse, dqk
// and dv (the staging rounds fp32 operands to those values first); calls
// that cannot read them refuse.
TEST(CudaBf16Outputs, AttentionReadsBf16Operands) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto ops = make_cuda_ops();
  for (const int dh : {128, 64, 40}) {
    for (const bool kept : {false, true}) {
      SCOPED_TRACE("dh " + std::to_string(dh) + (kept ? ", kept" : ""));
      const AttentionParams p = head_call(dh, 4);
      const int64_t L = p.L, n = L * p.ld, R = p.n_rounds;
      IntBuffer<float> dperm = round_orders(*ops, p, 13);
      const int64_t nk = ops->attention_kept_elems(L, dh, AttentionPrecision::bf16);
      Buffer<float> qk(*ops, n), v(*ops, n), qk_b(*ops, n / 2), v_b(*ops, n / 2),
          dout(*ops, n), out(*ops, n), lse(*ops, R * L), dqk(*ops, n), dv(*ops, n),
          staged(*ops, nk);
      ops->from_host(qk.data(), pattern(n, 51).data(), n);
      ops->from_host(v.data(), pattern(n, 52).data(), n);
      ops->from_host(dout.data(), pattern(n, 53).data(), n);
      ops->stash(qk_b.data(), qk.data(), n);
      ops->stash(v_b.data(), v.data(), n);
      auto run = [&](bool b) {
        AttentionParams a = p;
        a.in_bf16 = b;
        a.kept = kept ? staged.data() : nullptr;
        const float* q = b ? qk_b.data() : qk.data();
        const float* vv = b ? v_b.data() : v.data();
        ops->fill(out.data(), 0.0f, n);
        ops->chunked_attention_forward(out.data(), nullptr, lse.data(), q, vv, dperm.data(), a);
        ops->chunked_attention_backward(dqk.data(), dv.data(), dout.data(), q, vv, dperm.data(),
                                        out.data(), p.ld, lse.data(), a);
        return std::vector{host(*ops, out.data(), n), host(*ops, lse.data(), R * L),
                           host(*ops, dqk.data(), n), host(*ops, dv.data(), n)};
      };
      const auto f = run(false), h = run(true);
      for (size_t i = 0; i < f.size(); ++i) EXPECT_TRUE(same_bits(h[i], f[i])) << "result " << i;

      AttentionParams bad = p;
      bad.in_bf16 = true;
      bad.precision = AttentionPrecision::fp32;
      EXPECT_THROW(ops->chunked_attention_forward(out.data(), nullptr, lse.data(), qk_b.data(),
                                                  v_b.data(), dperm.data(), bad),
                   ShapeError);
      bad.precision = AttentionPrecision::bf16;
      bad.n_rounds = 1;
      EXPECT_THROW(ops->chunked_attention_backward(dqk.data(), dv.data(), dout.data(),
                                                   qk_b.data(), v_b.data(), dperm.data(),
                                                   out.data(), p.ld, lse.data(), bad),
                   ShapeError);
    }
  }
}

}  // namespace
