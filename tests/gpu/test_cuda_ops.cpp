// Every op of the CUDA Ops<float> against the CPU reference (CpuOps<float>,
// or CpuOps<double> where fp32 rounding of the oracle itself matters), on
// random inputs at odd sizes (97, 65, 1025) and powers of two. Backward ops
// start from nonzero gradient buffers, since gradients accumulate.
//
// Tolerances, |got - want| <= atol + rtol * |want|:
//  - fp32 elementwise ops with the same formula: rtol 1e-5 (device tanhf,
//    expf, FMA contraction differ from the host by a few ulp).
//  - reductions in a different order (layernorm, cross-entropy, optimizer
//    statistics): rtol 1e-4, atol 1e-5 scaled to the data.
//  - GEMMs: bf16 inputs (8-bit mantissa, rounding 2^-9 ~ 2e-3) accumulated in
//    fp32: atol 2e-2 of the output's largest magnitude.
//  - attention: fp32 kernels judged against the fp64 CPU reference; scores
//    are sums of dh products of O(1) numbers, so atol 1e-4 and rtol 1e-4.
//  - LSH hashing: the bucket is an argmax of TF32 products, so rounding may
//    flip a near-tie: fewer than 0.5% mismatches (at least 2 allowed), each a
//    near-tie within TF32 rounding; sorting identical buckets and dropout
//    masks must be identical.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kernels/errors.h"
#include "kernels/ops.h"
#include "kernels/common/philox.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"

using namespace reformer;

namespace {

std::vector<float> random_vec(int64_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  const RngKey key = make_key(seed, 77);
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = lo + (hi - lo) * rng_uniform(key, uint64_t(i));
  return v;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

struct Gpu {
  std::unique_ptr<Ops<float>> ops = make_cuda_ops();
  Buffer<float> up(const std::vector<float>& h) {
    Buffer<float> b(*ops, int64_t(h.size()));
    ops->from_host(b.data(), h.data(), int64_t(h.size()));
    return b;
  }
  IntBuffer<float> up_i(const std::vector<int32_t>& h) {
    IntBuffer<float> b(*ops, int64_t(h.size()));
    ops->from_host_i32(b.data(), h.data(), int64_t(h.size()));
    return b;
  }
  std::vector<float> down(const Buffer<float>& b) {
    std::vector<float> h(static_cast<size_t>(b.size()));
    ops->to_host(h.data(), b.data(), b.size());
    return h;
  }
  std::vector<int32_t> down_i(const IntBuffer<float>& b) {
    std::vector<int32_t> h(static_cast<size_t>(b.size()));
    ops->to_host_i32(h.data(), b.data(), b.size());
    return h;
  }
};

// Counts elements outside atol + rtol * |want| and reports the worst one.
template <class W>
void expect_close(const std::vector<float>& got, const std::vector<W>& want, double atol,
                  double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_excess = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = double(got[i]), w = double(want[i]);
    const double err = std::fabs(g - w), lim = atol + rtol * std::fabs(w);
    if (!(err <= lim)) ++bad;
    if (!(err - lim <= worst_excess)) {
      worst_excess = err - lim;
      worst = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size()
                     << " outside tolerance; worst at " << worst << ": got " << got[worst]
                     << " want " << double(want[worst]);
}

template <class W>
double max_abs(const std::vector<W>& v) {
  double m = 0.0;
  for (const W& x : v) m = std::max(m, std::fabs(double(x)));
  return m;
}

#define REQUIRE_GPU() \
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device"

// ---------------------------------------------------------------- elementwise

TEST(CudaOps, Elementwise) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  for (int64_t n : {int64_t(1), int64_t(97), int64_t(1025), int64_t(65536 + 3)}) {
    const auto a = random_vec(n, 1), b = random_vec(n, 2);
    auto da = g.up(a), db = g.up(b);
    Buffer<float> out(*g.ops, n);
    std::vector<float> want(static_cast<size_t>(n));

    g.ops->fill(out.data(), 2.5f, n);
    cpu.fill(want.data(), 2.5f, n);
    expect_close(g.down(out), want, 0, 0, "fill");

    g.ops->add(out.data(), da.data(), db.data(), n);
    cpu.add(want.data(), a.data(), b.data(), n);
    expect_close(g.down(out), want, 0, 0, "add");

    g.ops->sub(out.data(), out.data(), db.data(), n);  // aliasing out == a
    cpu.sub(want.data(), want.data(), b.data(), n);
    expect_close(g.down(out), want, 0, 0, "sub");

    g.ops->axpy(out.data(), 0.75f, db.data(), n);
    cpu.axpy(want.data(), 0.75f, b.data(), n);
    expect_close(g.down(out), want, 0, 1e-6, "axpy");

    g.ops->scale(out.data(), -1.5f, n);
    cpu.scale(want.data(), -1.5f, n);
    expect_close(g.down(out), want, 0, 1e-6, "scale");

    g.ops->copy(out.data(), da.data(), n);
    expect_close(g.down(out), a, 0, 0, "copy");

    // sum of squares in double: only the summation order differs.
    const double ss = g.ops->sum_squares(da.data(), n), ss_cpu = cpu.sum_squares(a.data(), n);
    EXPECT_NEAR(ss, ss_cpu, 1e-12 * ss_cpu + 1e-300) << "sum_squares n=" << n;
    EXPECT_EQ(ss, g.ops->sum_squares(da.data(), n)) << "sum_squares is deterministic";

    // dropout masks are the same counter-RNG draws: identical results.
    std::vector<float> dh = a;
    g.ops->dropout(da.data(), n, 0.3f, 11, 5, 2, 1, 1000);
    cpu.dropout(dh.data(), n, 0.3f, 11, 5, 2, 1, 1000);
    expect_close(g.down(da), dh, 0, 0, "dropout");
  }
  // Overlapping copy has memmove semantics.
  const auto a = random_vec(1025, 3);
  auto da = g.up(a);
  std::vector<float> want = a;
  g.ops->copy(da.data() + 7, da.data(), 1000);
  cpu.copy(want.data() + 7, want.data(), 1000);
  expect_close(g.down(da), want, 0, 0, "overlapping copy");
}

TEST(CudaOps, Copy2dAdd2d) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  const int64_t rows = 97, cols = 65, ld_src = 130, ld_dst = 71;
  const auto src = random_vec(rows * ld_src, 4), dst0 = random_vec(rows * ld_dst, 5);
  auto dsrc = g.up(src), ddst = g.up(dst0);
  std::vector<float> want = dst0;
  g.ops->copy_2d(ddst.data(), ld_dst, dsrc.data() + 3, ld_src, rows, cols);
  cpu.copy_2d(want.data(), ld_dst, src.data() + 3, ld_src, rows, cols);
  expect_close(g.down(ddst), want, 0, 0, "copy_2d");
  g.ops->add_2d(ddst.data() + 1, ld_dst, dsrc.data(), ld_src, rows - 1, cols);
  cpu.add_2d(want.data() + 1, ld_dst, src.data(), ld_src, rows - 1, cols);
  expect_close(g.down(ddst), want, 0, 0, "add_2d");
}

// ---------------------------------------------------------------- embedding

TEST(CudaOps, Embedding) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  const int64_t L = 97, offset = 13;
  const int D = 65, d1 = 32, a2 = 10, a1 = 12, V = 29;
  std::vector<int32_t> tokens(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) tokens[static_cast<size_t>(i)] = int32_t((i * 7 + 3) % V);
  const auto wte = random_vec(int64_t(V) * D, 6), p1 = random_vec(int64_t(a1) * d1, 7),
             p2 = random_vec(int64_t(a2) * (D - d1), 8);
  auto dt = g.up_i(tokens);
  auto dwte = g.up(wte), dp1 = g.up(p1), dp2 = g.up(p2);
  Buffer<float> out(*g.ops, L * D);
  std::vector<float> want(static_cast<size_t>(L * D));
  g.ops->embedding_forward(out.data(), dt.data(), dwte.data(), dp1.data(), dp2.data(), L, D, d1,
                           a2, offset);
  cpu.embedding_forward(want.data(), tokens.data(), wte.data(), p1.data(), p2.data(), L, D, d1,
                        a2, offset);
  expect_close(g.down(out), want, 0, 0, "embedding_forward");

  // Gradients accumulate onto nonzero buffers; dwte sums by atomics (order varies).
  const auto dout = random_vec(L * D, 9);
  auto ddout = g.up(dout);
  std::vector<float> gw = random_vec(int64_t(V) * D, 10), g1 = random_vec(int64_t(a1) * d1, 11),
                     g2 = random_vec(int64_t(a2) * (D - d1), 12);
  auto dgw = g.up(gw), dg1 = g.up(g1), dg2 = g.up(g2);
  g.ops->embedding_backward(dgw.data(), dg1.data(), dg2.data(), ddout.data(), dt.data(), L, D, d1,
                            a2, offset);
  cpu.embedding_backward(gw.data(), g1.data(), g2.data(), dout.data(), tokens.data(), L, D, d1,
                         a2, offset);
  expect_close(g.down(dgw), gw, 1e-6, 1e-5, "embedding dwte");
  expect_close(g.down(dg1), g1, 1e-6, 1e-5, "embedding dpos1");
  expect_close(g.down(dg2), g2, 1e-6, 1e-5, "embedding dpos2");
}

// ---------------------------------------------------------------- layernorm

TEST(CudaOps, LayerNorm) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  for (auto [N, C] : {std::pair<int64_t, int>{97, 65}, {128, 1024}, {3, 1025}}) {
    const auto x = random_vec(N * C, 20, -2.0f, 3.0f), w = random_vec(C, 21, 0.5f, 1.5f),
               b = random_vec(C, 22);
    auto dx = g.up(x), dw = g.up(w), dbb = g.up(b);
    Buffer<float> out(*g.ops, N * C), mean(*g.ops, N), rstd(*g.ops, N);
    std::vector<float> o(static_cast<size_t>(N * C)), m(static_cast<size_t>(N)), r(static_cast<size_t>(N));
    g.ops->layernorm_forward(out.data(), mean.data(), rstd.data(), dx.data(), dw.data(),
                             dbb.data(), N, C, 1e-6f);
    cpu.layernorm_forward(o.data(), m.data(), r.data(), x.data(), w.data(), b.data(), N, C, 1e-6f);
    // fp32 row statistics vs the CPU's double: a few ulp of the row scale.
    expect_close(g.down(out), o, 1e-5, 1e-5, "layernorm out");
    expect_close(g.down(mean), m, 1e-6, 1e-5, "layernorm mean");
    expect_close(g.down(rstd), r, 0, 1e-5, "layernorm rstd");

    const auto dout = random_vec(N * C, 23);
    auto ddout = g.up(dout);
    std::vector<float> gi = random_vec(N * C, 24), gw = random_vec(C, 25), gb = random_vec(C, 26);
    auto dgi = g.up(gi), dgw = g.up(gw), dgb = g.up(gb);
    // Both sides use the CPU statistics so only the backward is compared.
    auto dm = g.up(m), dr = g.up(r);
    g.ops->layernorm_backward(dgi.data(), dgw.data(), dgb.data(), ddout.data(), dx.data(),
                              dw.data(), dm.data(), dr.data(), N, C);
    cpu.layernorm_backward(gi.data(), gw.data(), gb.data(), dout.data(), x.data(), w.data(),
                           m.data(), r.data(), N, C);
    expect_close(g.down(dgi), gi, 1e-5, 1e-4, "layernorm dinp");
    expect_close(g.down(dgw), gw, 1e-5, 1e-5, "layernorm dw");
    expect_close(g.down(dgb), gb, 1e-5, 1e-5, "layernorm db");
  }
}

// ---------------------------------------------------------------- matmul

TEST(CudaOps, Matmul) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  struct Shape { int64_t N; int C, OC; };
  for (const Shape s : {Shape{97, 65, 1025}, Shape{128, 256, 512}, Shape{1, 64, 3}}) {
    const int64_t N = s.N;
    const int C = s.C, OC = s.OC;
    const auto x = random_vec(N * C, 30), w = random_vec(int64_t(C) * OC, 31),
               bias = random_vec(OC, 32);
    auto dx = g.up(x), dw = g.up(w), dbias = g.up(bias);
    Buffer<float> out(*g.ops, N * OC);
    std::vector<float> want(static_cast<size_t>(N * OC));
    for (bool with_bias : {true, false}) {
      g.ops->matmul_forward(out.data(), dx.data(), dw.data(), with_bias ? dbias.data() : nullptr,
                            N, C, OC);
      cpu.matmul_forward(want.data(), x.data(), w.data(), with_bias ? bias.data() : nullptr, N, C,
                         OC);
      // bf16 inputs, fp32 accumulation: 2e-2 of the output scale.
      expect_close(g.down(out), want, 2e-2 * max_abs(want), 0,
                   "matmul_forward N=" + std::to_string(N) + " C=" + std::to_string(C) +
                       " OC=" + std::to_string(OC));
    }
    const auto dout = random_vec(N * OC, 33);
    auto ddout = g.up(dout);
    std::vector<float> gi = random_vec(N * C, 34), gw = random_vec(int64_t(C) * OC, 35),
                       gb = random_vec(OC, 36);
    const auto gi0 = gi, gw0 = gw;
    auto dgi = g.up(gi), dgw = g.up(gw), dgb = g.up(gb);
    g.ops->matmul_backward(dgi.data(), dgw.data(), dgb.data(), ddout.data(), dx.data(), dw.data(),
                           N, C, OC);
    cpu.matmul_backward(gi.data(), gw.data(), gb.data(), dout.data(), x.data(), w.data(), N, C,
                        OC);
    std::vector<float> inc_i(gi.size()), inc_w(gw.size());
    for (size_t k = 0; k < gi.size(); ++k) inc_i[k] = gi[k] - gi0[k];
    for (size_t k = 0; k < gw.size(); ++k) inc_w[k] = gw[k] - gw0[k];
    expect_close(g.down(dgi), gi, 2e-2 * max_abs(inc_i), 0, "matmul dinp");
    expect_close(g.down(dgw), gw, 2e-2 * max_abs(inc_w), 0, "matmul dw");
    // dbias: column sums in double on both sides.
    expect_close(g.down(dgb), gb, 1e-5, 1e-5, "matmul dbias");
    // Null gradients are skipped.
    g.ops->matmul_backward(nullptr, nullptr, dgb.data(), ddout.data(), dx.data(), dw.data(), N, C,
                           OC);
    cpu.matmul_backward(nullptr, nullptr, gb.data(), dout.data(), x.data(), w.data(), N, C, OC);
    expect_close(g.down(dgb), gb, 1e-5, 1e-5, "matmul dbias only");
  }
}

// ---------------------------------------------------------------- activation

TEST(CudaOps, Activation) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  const int64_t n = 1025;
  const auto x = random_vec(n, 40, -4.0f, 4.0f), dout = random_vec(n, 41);
  auto dx = g.up(x), ddout = g.up(dout);
  for (Activation act : {Activation::gelu, Activation::relu}) {
    Buffer<float> out(*g.ops, n);
    std::vector<float> want(static_cast<size_t>(n));
    g.ops->activation_forward(out.data(), dx.data(), n, act);
    cpu.activation_forward(want.data(), x.data(), n, act);
    expect_close(g.down(out), want, 1e-6, 1e-5, "activation_forward");
    std::vector<float> gi = random_vec(n, 42);
    auto dgi = g.up(gi);
    g.ops->activation_backward(dgi.data(), ddout.data(), dx.data(), n, act);
    cpu.activation_backward(gi.data(), dout.data(), x.data(), n, act);
    expect_close(g.down(dgi), gi, 1e-6, 1e-5, "activation_backward");
  }
}

// ---------------------------------------------------------------- LSH

TEST(CudaOps, LshRotationsHashSort) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  const int n_hashes = 4, dh = 64, n_buckets = 32;
  const int64_t L = 1025, ld = 3 * dh + 1;
  const int64_t nR = int64_t(n_hashes) * dh * (n_buckets / 2);
  Buffer<float> R(*g.ops, nR);
  std::vector<float> Rc(static_cast<size_t>(nR));
  g.ops->lsh_rotations(R.data(), 7, 3, 1, 2, n_hashes, dh, n_buckets, 0);
  cpu.lsh_rotations(Rc.data(), 7, 3, 1, 2, n_hashes, dh, n_buckets, 0);
  // Same stream; device logf / cosf differ from the host's by an ulp or two,
  // which near a zero of the cosine is an absolute error of ~1e-6.
  expect_close(g.down(R), Rc, 1e-5, 1e-5, "lsh_rotations");

  // Hash with identical rotations so only the dot products' rounding differs.
  const auto qk = random_vec(L * ld, 50);
  auto dqk = g.up(qk), dR = g.up(Rc);
  IntBuffer<float> buckets(*g.ops, n_hashes * L);
  std::vector<int32_t> bc(static_cast<size_t>(n_hashes * L));
  g.ops->lsh_hash(buckets.data(), dqk.data() + 5, ld, dR.data(), L, dh, n_hashes, n_buckets, 0);
  cpu.lsh_hash(bc.data(), qk.data() + 5, ld, Rc.data(), L, dh, n_hashes, n_buckets, 0);
  const auto bg = g.down_i(buckets);
  int64_t mismatches = 0;
  for (size_t k = 0; k < bg.size(); ++k) {
    ASSERT_GE(bg[k], 0);
    ASSERT_LT(bg[k], n_buckets);
    mismatches += bg[k] != bc[k];
  }
  EXPECT_LT(double(mismatches), 0.005 * double(bg.size())) << mismatches << " hash mismatches";

  // Sort identical buckets: identical permutations (32-bit keys).
  auto dbc = g.up_i(bc);
  IntBuffer<float> perm(*g.ops, n_hashes * L);
  std::vector<int32_t> pc(static_cast<size_t>(n_hashes * L));
  g.ops->lsh_sort(perm.data(), dbc.data(), L, n_hashes, n_buckets);
  cpu.lsh_sort(pc.data(), bc.data(), L, n_hashes, n_buckets);
  EXPECT_EQ(g.down_i(perm), pc) << "lsh_sort";

  // A long sequence with many buckets takes the 64-bit key path.
  const int64_t L2 = int64_t(1) << 20;
  const int nb2 = 4096, nh2 = 2;
  std::vector<int32_t> b2(static_cast<size_t>(nh2 * L2));
  const RngKey key = make_key(9, 1);
  for (size_t k = 0; k < b2.size(); ++k) b2[k] = int32_t(rng_u32(key, k) % uint32_t(nb2));
  auto db2 = g.up_i(b2);
  IntBuffer<float> perm2(*g.ops, nh2 * L2);
  std::vector<int32_t> pc2(b2.size());
  g.ops->lsh_sort(perm2.data(), db2.data(), L2, nh2, nb2);
  cpu.lsh_sort(pc2.data(), b2.data(), L2, nh2, nb2);
  EXPECT_EQ(g.down_i(perm2), pc2) << "lsh_sort 64-bit keys";

  // A bucket id out of range is refused like on the CPU.
  bc[17] = n_buckets;
  auto dbad = g.up_i(bc);
  EXPECT_THROW(g.ops->lsh_sort(perm.data(), dbad.data(), L, n_hashes, n_buckets), ShapeError);
}

namespace {

// Hashes L random positions (rows ld apart from qk offset off) on the GPU and
// checks the rounds of positions `check` (all if empty) against the CPU, with
// factor0 as in Ops::lsh_hash. A bucket may differ only at a near-tie: in each
// factor's block where the CPU's and the GPU's choices differ, the two must
// score within TF32 rounding of each other (2^-9 relative per product, both
// inputs rounded; doubled for margin). Returns the number of mismatches.
int64_t hash_mismatches(Gpu& g, int64_t L, int dh, int n_hashes, int n_buckets, int64_t ld,
                        int64_t off, std::vector<int64_t> check, uint64_t seed, int factor0 = 0) {
  CpuOps<float> cpu;
  const int cols = rotation_cols(n_buckets, factor0);
  // Blocks of columns: {first column, columns}; bucket = sum of b_j * stride_j.
  struct Block {
    int c0, n, stride;
  };
  std::vector<Block> blocks = {{0, cols, 1}};
  if (factor0 != 0) blocks = {{0, factor0 / 2, 1}, {factor0 / 2, cols - factor0 / 2, factor0}};
  const int64_t nR = int64_t(n_hashes) * dh * cols;
  std::vector<float> Rc(static_cast<size_t>(nR));
  cpu.lsh_rotations(Rc.data(), seed, 1, 0, 0, n_hashes, dh, n_buckets, factor0);
  const auto qk = random_vec(off + L * ld, seed + 1);
  auto dqk = g.up(qk), dR = g.up(Rc);
  IntBuffer<float> buckets(*g.ops, n_hashes * L);
  g.ops->lsh_hash(buckets.data(), dqk.data() + off, ld, dR.data(), L, dh, n_hashes, n_buckets,
                  factor0);
  const auto bg = g.down_i(buckets);

  std::vector<int32_t> bc;  // [n_hashes, check.size()]
  if (check.empty()) {
    for (int64_t i = 0; i < L; ++i) check.push_back(i);
    bc.resize(static_cast<size_t>(n_hashes * L));
    cpu.lsh_hash(bc.data(), qk.data() + off, ld, Rc.data(), L, dh, n_hashes, n_buckets, factor0);
  } else {
    const int64_t n = int64_t(check.size());
    bc.resize(static_cast<size_t>(n_hashes * n));
    std::vector<int32_t> one(static_cast<size_t>(n_hashes));
    for (int64_t c = 0; c < n; ++c) {
      cpu.lsh_hash(one.data(), qk.data() + off + check[size_t(c)] * ld, ld, Rc.data(), 1, dh,
                   n_hashes, n_buckets, factor0);
      for (int r = 0; r < n_hashes; ++r) bc[size_t(r * n + c)] = one[size_t(r)];
    }
  }
  const int64_t n = int64_t(check.size());
  int64_t mismatches = 0;
  for (int r = 0; r < n_hashes; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      const int64_t i = check[size_t(c)];
      const int32_t got = bg[size_t(r * L + i)], want = bc[size_t(r * n + c)];
      if (got < 0 || got >= n_buckets) {
        ADD_FAILURE() << "bucket " << got << " out of range at round " << r << " position " << i;
        return n_hashes * n;
      }
      if (got == want) continue;
      ++mismatches;
      for (const Block& blk : blocks) {
        // The block's choice in [0, 2 n): +-(x R_r)[c0 + b mod n].
        const int bg_j = (got / blk.stride) % (2 * blk.n), bw_j = (want / blk.stride) % (2 * blk.n);
        if (bg_j == bw_j) continue;
        // score(b) and its magnitude bound, in double.
        auto score = [&](int b, double* mag) {
          const float* x = qk.data() + off + i * ld;
          const float* Rr = Rc.data() + int64_t(r) * dh * cols;
          double s = 0.0, a = 0.0;
          for (int d = 0; d < dh; ++d) {
            const double t = double(x[d]) * double(Rr[int64_t(d) * cols + blk.c0 + b % blk.n]);
            s += t;
            a += std::fabs(t);
          }
          *mag = a;
          return b < blk.n ? s : -s;
        };
        double mg = 0.0, mw = 0.0;
        const double sg = score(bg_j, &mg), sw = score(bw_j, &mw);
        EXPECT_LE(std::fabs(sw - sg), std::ldexp(1.0, -8) * (mg + mw))
            << "not a near-tie: round " << r << " position " << i << " block at " << blk.c0
            << " gpu " << got << " (" << sg << ") cpu " << want << " (" << sw << ")";
      }
    }
  }
  return mismatches;
}

}  // namespace

// Many buckets: TF32 products, argmax over 1024 candidates.
TEST(CudaOps, LshHashManyBuckets) {
  REQUIRE_GPU();
  Gpu g;
  const int64_t L = 4096;
  const int n_hashes = 2;
  const int64_t m = hash_mismatches(g, L, 64, n_hashes, 1024, 64, 0, {}, 11);
  EXPECT_LT(double(m), 0.005 * double(n_hashes * L)) << m << " hash mismatches";
}

// Odd sizes: unaligned rows, n_buckets/2 not a multiple of 4, one bucket pair.
TEST(CudaOps, LshHashOddSizes) {
  REQUIRE_GPU();
  Gpu g;
  struct Case {
    int64_t L;
    int dh, n_hashes, n_buckets;
    int64_t ld, off;
  };
  for (const Case& c : {Case{999, 37, 3, 198, 77, 3}, Case{257, 64, 5, 34, 3 * 64 + 1, 5},
                        Case{130, 8, 1, 2, 8, 0}, Case{1, 16, 2, 64, 16, 1}}) {
    const int64_t n = c.n_hashes * c.L;
    const int64_t m = hash_mismatches(g, c.L, c.dh, c.n_hashes, c.n_buckets, c.ld, c.off, {}, 12);
    EXPECT_LE(m, std::max<int64_t>(2, n / 200))
        << m << " hash mismatches at L=" << c.L << " dh=" << c.dh << " n_buckets=" << c.n_buckets;
  }
}

// Factorized buckets (HF): two argmaxes per (position, round), over blocks of
// factor0/2 and (n_buckets/factor0)/2 columns. Aligned blocks take the float4
// path; odd block widths, unaligned rows and the smallest factors (2 * 2) the
// scalar one.
TEST(CudaOps, LshHashFactorized) {
  REQUIRE_GPU();
  Gpu g;
  struct Case {
    int64_t L;
    int dh, n_hashes, n_buckets, factor0;
    int64_t ld, off;
  };
  for (const Case& c : {Case{4096, 64, 4, 2048, 32, 64, 0}, Case{2048, 128, 2, 32768, 128, 128, 0},
                        Case{999, 37, 3, 512, 16, 77, 3}, Case{257, 64, 5, 24, 6, 3 * 64 + 1, 5},
                        Case{130, 8, 1, 4, 2, 8, 0}, Case{515, 32, 2, 64, 8, 32, 0}}) {
    const int64_t n = c.n_hashes * c.L;
    const int64_t m =
        hash_mismatches(g, c.L, c.dh, c.n_hashes, c.n_buckets, c.ld, c.off, {}, 14, c.factor0);
    EXPECT_LE(m, std::max<int64_t>(2, n / 200))
        << m << " hash mismatches at L=" << c.L << " dh=" << c.dh << " n_buckets=" << c.n_buckets
        << " factor0=" << c.factor0;
  }
  // The bucket ids cover [0, n_buckets) and sort like the CPU's.
  CpuOps<float> cpu;
  const int64_t L = 8192;
  const int dh = 16, nh = 2, nb = 16, f0 = 4;
  std::vector<float> Rc(static_cast<size_t>(nh * dh * rotation_cols(nb, f0)));
  cpu.lsh_rotations(Rc.data(), 21, 0, 0, 0, nh, dh, nb, f0);
  const auto qk = random_vec(L * dh, 22);
  auto dqk = g.up(qk), dR = g.up(Rc);
  IntBuffer<float> buckets(*g.ops, nh * L);
  g.ops->lsh_hash(buckets.data(), dqk.data(), dh, dR.data(), L, dh, nh, nb, f0);
  const auto bg = g.down_i(buckets);
  std::vector<int64_t> count(static_cast<size_t>(nb), 0);
  for (int32_t b : bg) {
    ASSERT_GE(b, 0);
    ASSERT_LT(b, nb);
    ++count[size_t(b)];
  }
  for (int b = 0; b < nb; ++b) EXPECT_GT(count[size_t(b)], 0) << "bucket " << b;
  IntBuffer<float> perm(*g.ops, nh * L);
  std::vector<int32_t> pc(static_cast<size_t>(nh * L));
  g.ops->lsh_sort(perm.data(), buckets.data(), L, nh, nb);
  cpu.lsh_sort(pc.data(), bg.data(), L, nh, nb);
  EXPECT_EQ(g.down_i(perm), pc) << "lsh_sort of factorized buckets";
  // A factor that does not divide n_buckets is refused.
  EXPECT_THROW(g.ops->lsh_hash(buckets.data(), dqk.data(), dh, dR.data(), L, dh, nh, nb, 6),
               ShapeError);
}

// Products of 1 GiB: positions are hashed in several chunks; sampled positions
// (chunk edges among them) are checked against the CPU.
TEST(CudaOps, LshHashChunked) {
  REQUIRE_GPU();
  Gpu g;
  const int64_t L = 65536;
  const int n_hashes = 4;
  std::vector<int64_t> check;
  for (int64_t i = 0; i < L; i += 61) check.push_back(i);
  for (int64_t e = 1024; e < L; e *= 2)
    for (int64_t i : {e - 1, e, e + 1}) check.push_back(i);
  for (int64_t i : {3 * L / 4 - 1, 3 * L / 4, L - 1}) check.push_back(i);
  const int64_t m = hash_mismatches(g, L, 64, n_hashes, 2048, 2 * 64, 0, check, 13);
  const int64_t n = n_hashes * int64_t(check.size());
  EXPECT_LE(m, std::max<int64_t>(2, n / 200)) << m << " hash mismatches of " << n;
}

// Timing of lsh_hash (and lsh_sort) at long lengths; prints, asserts nothing.
// Run with --gtest_also_run_disabled_tests.
TEST(CudaOps, DISABLED_LshHashTiming) {
  REQUIRE_GPU();
  Gpu g;
  const int dh = 128, n_hashes = 4;
  struct Case {
    int64_t L;
    int n_buckets, factor0;
  };
  for (const Case& c : {Case{65536, 2048, 0}, Case{65536, 2048, 32}, Case{1048576, 32768, 0},
                        Case{1048576, 32768, 128}}) {
    const int64_t L = c.L;
    const int n_buckets = c.n_buckets, factor0 = c.factor0;
    const int cols = rotation_cols(n_buckets, factor0);
    const int64_t nR = int64_t(n_hashes) * dh * cols;
    Buffer<float> qk(*g.ops, L * dh), R(*g.ops, nR);
    // Normal entries from the rotation stream: L * dh of them as [1, 1, 2 L dh / 2].
    g.ops->lsh_rotations(qk.data(), 5, 0, 0, 0, 1, 1, int(2 * L * dh), 0);
    g.ops->lsh_rotations(R.data(), 6, 0, 0, 0, n_hashes, dh, n_buckets, factor0);
    IntBuffer<float> buckets(*g.ops, n_hashes * L), perm(*g.ops, n_hashes * L);
    auto hash = [&] {
      g.ops->lsh_hash(buckets.data(), qk.data(), dh, R.data(), L, dh, n_hashes, n_buckets,
                      factor0);
    };
    hash();
    g.ops->synchronize();
    const int reps = 3;
    auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < reps; ++k) hash();
    g.ops->synchronize();
    const double s_hash =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < reps; ++k) g.ops->lsh_sort(perm.data(), buckets.data(), L, n_hashes, n_buckets);
    g.ops->synchronize();
    const double s_sort =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    const double flop = 2.0 * double(L) * dh * cols * n_hashes;
    std::printf("lsh_hash L=%lld dh=%d n_buckets=%d factor0=%d n_hashes=%d: %.3f ms, "
                "%.1f TFLOP/s; lsh_sort %.3f ms\n",
                static_cast<long long>(L), dh, n_buckets, factor0, n_hashes, 1e3 * s_hash,
                flop / s_hash * 1e-12, 1e3 * s_sort);
  }
}

// ---------------------------------------------------------------- attention

struct AttnCase {
  int64_t L;
  int dh, chunk, rounds, before, after;
  bool wrap, causal;
};

std::string describe(const AttnCase& c) {
  return "L=" + std::to_string(c.L) + " dh=" + std::to_string(c.dh) +
         " chunk=" + std::to_string(c.chunk) + " rounds=" + std::to_string(c.rounds) +
         " before=" + std::to_string(c.before) + " after=" + std::to_string(c.after) +
         (c.wrap ? " wrap" : "") + (c.causal ? " causal" : "");
}

// Random permutations per round from random buckets through the CPU sort.
std::vector<int32_t> random_perm(int64_t L, int rounds, uint64_t seed) {
  std::vector<int32_t> b(static_cast<size_t>(L * rounds)), perm(b.size());
  const RngKey key = make_key(seed, 5);
  for (size_t k = 0; k < b.size(); ++k) b[k] = int32_t(rng_u32(key, k) % 8u);
  CpuOps<float>().lsh_sort(perm.data(), b.data(), L, rounds, 8);
  return perm;
}

TEST(CudaOps, ChunkedAttention) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<double> ref;
  const AttnCase cases[] = {
      {96, 64, 16, 2, 1, 0, true, true},     // LSH-like, two rounds
      {256, 128, 64, 4, 1, 1, true, false},  // widest head, look-ahead, not causal
      {60, 24, 12, 1, 2, 0, false, true},    // local-like: odd width, clipped window
      {32, 32, 16, 3, 1, 1, true, true},     // two chunks: a repeated window chunk counts once
      {512, 128, 256, 2, 1, 0, true, true},  // largest chunk
      {97, 65, 97, 1, 1, 0, true, true},     // one chunk of odd size, dh > 64
  };
  for (const AttnCase& c : cases) {
    SCOPED_TRACE(describe(c));
    AttentionParams p;
    p.L = c.L;
    p.dh = c.dh;
    p.ld = 2 * c.dh + 3;  // a head slice of a wider [L, ld] buffer
    p.n_rounds = c.rounds;
    p.chunk = c.chunk;
    p.chunks_before = c.before;
    p.chunks_after = c.after;
    p.wrap = c.wrap;
    p.causal = c.causal;
    const int64_t n = c.L * p.ld, nr = int64_t(c.rounds) * c.L;
    const auto qk = random_vec(n, 60, -1.5f, 1.5f), v = random_vec(n, 61),
               dout = random_vec(n, 62);
    const auto perm = random_perm(c.L, c.rounds, 63);
    auto dqk = g.up(qk), dv = g.up(v), ddout = g.up(dout);
    auto dperm = g.up_i(perm);
    Buffer<float> out(*g.ops, n), out_r(*g.ops, nr * c.dh), lse(*g.ops, nr);
    g.ops->fill(out.data(), 0.0f, n);
    std::vector<double> o(static_cast<size_t>(n), 0.0), orr(static_cast<size_t>(nr * c.dh)), ls(static_cast<size_t>(nr));
    const auto qkd = to_double(qk), vd = to_double(v), doutd = to_double(dout);
    g.ops->chunked_attention_forward(out.data(), out_r.data(), lse.data(), dqk.data(), dv.data(),
                                     dperm.data(), p);
    ref.chunked_attention_forward(o.data(), orr.data(), ls.data(), qkd.data(), vd.data(),
                                  perm.data(), p);
    expect_close(g.down(out), o, 1e-4, 1e-4, "chunked out");
    expect_close(g.down(out_r), orr, 1e-4, 1e-4, "chunked out_r");
    expect_close(g.down(lse), ls, 1e-4, 1e-5, "chunked lse");

    // Backward onto nonzero gradients, each side from its own forward.
    const auto gq0 = random_vec(n, 64), gv0 = random_vec(n, 65);
    auto dgq = g.up(gq0), dgv = g.up(gv0);
    std::vector<double> gq = to_double(gq0), gv = to_double(gv0);
    g.ops->chunked_attention_backward(dgq.data(), dgv.data(), ddout.data(), dqk.data(), dv.data(),
                                      dperm.data(), out_r.data(), lse.data(), p);
    ref.chunked_attention_backward(gq.data(), gv.data(), doutd.data(), qkd.data(), vd.data(),
                                   perm.data(), orr.data(), ls.data(), p);
    expect_close(g.down(dgq), gq, 2e-4, 1e-4, "chunked dqk");
    expect_close(g.down(dgv), gv, 1e-4, 1e-4, "chunked dv");

    // Bitwise reproducible, and null gradients are skipped.
    auto dgq2 = g.up(gq0);
    g.ops->chunked_attention_backward(dgq2.data(), nullptr, ddout.data(), dqk.data(), dv.data(),
                                      dperm.data(), out_r.data(), lse.data(), p);
    g.ops->chunked_attention_backward(dgq.data(), nullptr, ddout.data(), dqk.data(), dv.data(),
                                      dperm.data(), out_r.data(), lse.data(), p);
    auto dgv2 = g.up(gv0);
    g.ops->chunked_attention_backward(nullptr, dgv2.data(), ddout.data(), dqk.data(), dv.data(),
                                      dperm.data(), out_r.data(), lse.data(), p);
    std::vector<double> gq2 = to_double(gq0);
    ref.chunked_attention_backward(gq2.data(), nullptr, doutd.data(), qkd.data(), vd.data(),
                                   perm.data(), orr.data(), ls.data(), p);
    expect_close(g.down(dgq2), gq2, 2e-4, 1e-4, "chunked dqk only");
    // dgq has now received the same increment twice.
    std::vector<double> twice(gq.size());
    for (size_t k = 0; k < gq.size(); ++k) twice[k] = gq[k] + (gq2[k] - double(gq0[k]));
    expect_close(g.down(dgq), twice, 4e-4, 1e-4, "chunked dqk accumulates");
    std::vector<float> inc1 = g.down(dgv2);
    expect_close(inc1, gv, 1e-4, 1e-4, "chunked dv only");
    auto dgv3 = g.up(gv0);
    g.ops->chunked_attention_backward(nullptr, dgv3.data(), ddout.data(), dqk.data(), dv.data(),
                                      dperm.data(), out_r.data(), lse.data(), p);
    EXPECT_EQ(g.down(dgv3), inc1) << "chunked backward is bitwise reproducible";
  }
}

TEST(CudaOps, FullAttention) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<double> ref;
  struct Case { int64_t L; int dh; bool causal; };
  for (const Case c : {Case{97, 64, true}, Case{97, 64, false}, Case{300, 128, true},
                       Case{16, 7, true}, Case{1, 32, true}}) {
    SCOPED_TRACE("L=" + std::to_string(c.L) + " dh=" + std::to_string(c.dh) +
                 (c.causal ? " causal" : ""));
    AttentionParams p;
    p.L = c.L;
    p.dh = c.dh;
    p.ld = c.dh + 5;
    p.causal = c.causal;
    const int64_t n = c.L * p.ld;
    const auto qk = random_vec(n, 70, -1.5f, 1.5f), v = random_vec(n, 71),
               dout = random_vec(n, 72);
    auto dqk = g.up(qk), dv = g.up(v), ddout = g.up(dout);
    Buffer<float> out(*g.ops, n), lse(*g.ops, c.L);
    g.ops->fill(out.data(), 0.0f, n);
    std::vector<double> o(static_cast<size_t>(n), 0.0), ls(static_cast<size_t>(c.L));
    const auto qkd = to_double(qk), vd = to_double(v), doutd = to_double(dout);
    g.ops->full_attention_forward(out.data(), lse.data(), dqk.data(), dv.data(), p);
    ref.full_attention_forward(o.data(), ls.data(), qkd.data(), vd.data(), p);
    expect_close(g.down(out), o, 1e-4, 1e-4, "full out");
    expect_close(g.down(lse), ls, 1e-4, 1e-5, "full lse");

    const auto gq0 = random_vec(n, 73), gv0 = random_vec(n, 74);
    auto dgq = g.up(gq0), dgv = g.up(gv0);
    std::vector<double> gq = to_double(gq0), gv = to_double(gv0);
    g.ops->full_attention_backward(dgq.data(), dgv.data(), ddout.data(), out.data(), dqk.data(),
                                   dv.data(), lse.data(), p);
    ref.full_attention_backward(gq.data(), gv.data(), doutd.data(), o.data(), qkd.data(),
                                vd.data(), ls.data(), p);
    expect_close(g.down(dgq), gq, 2e-4, 1e-4, "full dqk");
    expect_close(g.down(dgv), gv, 1e-4, 1e-4, "full dv");
  }
}

TEST(CudaOps, AttentionRejectsWideHeads) {
  REQUIRE_GPU();
  Gpu g;
  AttentionParams p;
  p.L = 8;
  p.dh = 129;
  p.ld = 129;
  p.chunk = 4;
  Buffer<float> x(*g.ops, 8 * 129), o(*g.ops, 8 * 129), lse(*g.ops, 8);
  EXPECT_THROW(g.ops->full_attention_forward(o.data(), lse.data(), x.data(), x.data(), p),
               ShapeError);
}

// ---------------------------------------------------------------- loss

TEST(CudaOps, SoftmaxCrossEntropyArgmax) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  for (auto [N, V] : {std::pair<int64_t, int>{97, 256}, {33, 1025}, {4, 7}}) {
    auto logits = random_vec(N * V, 80, -5.0f, 5.0f);
    // Ties for argmax: row 1 has its maximum twice.
    logits[static_cast<size_t>(V) + 3] = 9.0f;
    logits[static_cast<size_t>(V) + 5] = 9.0f;
    std::vector<int32_t> targets(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) targets[static_cast<size_t>(i)] = i % 5 == 2 ? -1 : int32_t((i * 13) % V);
    auto dl = g.up(logits);
    auto dt = g.up_i(targets);
    Buffer<float> loss(*g.ops, N), dlog(*g.ops, N * V);
    std::vector<float> lw(static_cast<size_t>(N)), dw(static_cast<size_t>(N * V));
    g.ops->softmax_cross_entropy(loss.data(), dlog.data(), dl.data(), dt.data(), N, V, 0.01f);
    cpu.softmax_cross_entropy(lw.data(), dw.data(), logits.data(), targets.data(), N, V, 0.01f);
    expect_close(g.down(loss), lw, 1e-5, 1e-5, "cross-entropy loss");
    expect_close(g.down(dlog), dw, 1e-9, 1e-5, "cross-entropy dlogits");

    IntBuffer<float> am(*g.ops, N);
    std::vector<int32_t> amc(static_cast<size_t>(N));
    g.ops->argmax_rows(am.data(), dl.data(), N, V);
    cpu.argmax_rows(amc.data(), logits.data(), N, V);
    EXPECT_EQ(g.down_i(am), amc) << "argmax_rows";

    // dlogits may alias logits.
    g.ops->softmax_cross_entropy(loss.data(), dl.data(), dl.data(), dt.data(), N, V, 0.01f);
    expect_close(g.down(dl), dw, 1e-9, 1e-5, "cross-entropy in place");
  }
}

// ---------------------------------------------------------------- optimizers

TEST(CudaOps, AdamW) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  const int64_t n = 1025;
  std::vector<float> p = random_vec(n, 90), m(static_cast<size_t>(n), 0.0f), v(static_cast<size_t>(n), 0.0f);
  auto dp = g.up(p), dm = g.up(m), dv = g.up(v);
  AdamWParams ap;
  ap.lr = 1e-2f;
  ap.weight_decay = 0.1f;
  for (int step = 1; step <= 3; ++step) {
    ap.step = step;
    const auto grad = random_vec(n, 91 + uint64_t(step));
    auto dg = g.up(grad);
    g.ops->adamw_update(dp.data(), dg.data(), dm.data(), dv.data(), n, ap);
    cpu.adamw_update(p.data(), grad.data(), m.data(), v.data(), n, ap);
  }
  expect_close(g.down(dp), p, 1e-6, 1e-5, "adamw param");
  expect_close(g.down(dm), m, 1e-7, 1e-5, "adamw m");
  expect_close(g.down(dv), v, 1e-9, 1e-5, "adamw v");
}

TEST(CudaOps, Adafactor) {
  REQUIRE_GPU();
  Gpu g;
  CpuOps<float> cpu;
  struct Case { int64_t rows, cols; float beta1; };
  for (const Case c : {Case{97, 65, 0.0f}, Case{97, 65, 0.9f}, Case{1, 1025, 0.0f},
                       Case{1025, 1, 0.9f}, Case{600, 300, 0.0f}}) {
    SCOPED_TRACE(std::to_string(c.rows) + "x" + std::to_string(c.cols));
    const int64_t n = c.rows * c.cols;
    const bool factored = c.rows > 1 && c.cols > 1;
    std::vector<float> p = random_vec(n, 100), m(static_cast<size_t>(n), 0.0f),
                       vr(static_cast<size_t>(factored ? c.rows : n), 0.0f), vc(static_cast<size_t>(c.cols), 0.0f);
    auto dp = g.up(p), dm = g.up(m), dvr = g.up(vr), dvc = g.up(vc);
    AdafactorParams ap;
    ap.lr = 1e-2f;
    ap.beta1 = c.beta1;
    ap.weight_decay = 0.01f;
    ap.clip_threshold = 0.5f;  // makes the clipping branch matter
    for (int step = 1; step <= 3; ++step) {
      ap.step = step;
      const auto grad = random_vec(n, 101 + uint64_t(step));
      auto dg = g.up(grad);
      g.ops->adafactor_update(dp.data(), dg.data(), dm.data(), dvr.data(), dvc.data(), c.rows,
                              c.cols, ap);
      cpu.adafactor_update(p.data(), grad.data(), m.data(), vr.data(), vc.data(), c.rows, c.cols,
                           ap);
    }
    expect_close(g.down(dp), p, 1e-6, 1e-5, "adafactor param");
    expect_close(g.down(dvr), vr, 1e-9, 1e-5, "adafactor vr");
    if (factored) expect_close(g.down(dvc), vc, 1e-9, 1e-5, "adafactor vc");
    if (c.beta1 > 0) expect_close(g.down(dm), m, 1e-7, 1e-5, "adafactor m");
  }
}

}  // namespace
