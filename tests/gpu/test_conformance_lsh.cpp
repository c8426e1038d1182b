// Conformance of the LSH ops (harness: conformance.h). lsh_rotations and
// lsh_sort are list cases against the fp64 reference; lsh_hash is checked
// per backend against the CPU with near-tie analysis: the bucket is an argmax
// of the same exact products of bf16-rounded operands (lsh_round) summed in
// another order on CUDA, so only a near-tie may flip - fewer than 0.5%
// mismatches (at least 2 allowed), each within 2^-12 of the products'
// magnitude.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/errors.h"
#include "kernels/common/lsh_checks.h"
#include "tests/gpu/conformance.h"

using namespace reformer;
using namespace reformer::conformance;

namespace {

std::vector<float> random_vec(int64_t n, uint64_t seed) {
  const auto v = random_values(n, seed);
  return std::vector<float>(v.begin(), v.end());
}

// Host-side helpers around one backend's Ops<float>.
struct Dev {
  Ops<float>* ops;
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
    std::vector<float> h(size_t(b.size()));
    ops->to_host(h.data(), b.data(), b.size());
    return h;
  }
  std::vector<int32_t> down_i(const IntBuffer<float>& b) {
    std::vector<int32_t> h(size_t(b.size()));
    ops->to_host_i32(h.data(), b.data(), b.size());
    return h;
  }
};

// Runs f on every backend of `backends`, one trace per backend.
template <class F>
void on_each(std::vector<Backend> backends, F f) {
  if (backends.empty()) GTEST_SKIP() << "no device backend (REFORMER_CONFORMANCE_CPU=1 checks the CPU)";
  for (Backend& b : backends) {
    SCOPED_TRACE("backend " + b.name);
    Dev g{b.ops.get()};
    f(g);
  }
}

// Random bucket ids in [0, n_buckets), [rounds, L].
std::vector<int32_t> random_buckets(int64_t L, int rounds, int n_buckets, uint64_t seed) {
  std::vector<int32_t> b(static_cast<size_t>(L * rounds));
  const RngKey key = make_key(seed, RngPurpose::test, 1);
  for (size_t k = 0; k < b.size(); ++k) b[k] = int32_t(rng_u32(key, k) % uint32_t(n_buckets));
  return b;
}

// ---------------------------------------------------------------- list cases

std::vector<Case> lsh_cases() {
  std::vector<Case> cases;
  // Same counter-RNG stream; device logf / cosf differ from the host's by an
  // ulp or two, which near a zero of the cosine is an absolute error of ~1e-6.
  const Tol rot_tol{1e-5, 1e-5};
  struct Rot {
    int n_hashes, dh, n_buckets, factor0;
  };
  for (const Rot r : {Rot{4, 64, 32, 0}, Rot{3, 37, 198, 0}, Rot{2, 16, 24, 6}}) {
    const int64_t n = int64_t(r.n_hashes) * r.dh * rotation_cols(r.n_buckets, r.factor0);
    cases.push_back(make_case(
        "lsh_rotations h" + std::to_string(r.n_hashes) + " dh" + std::to_string(r.dh) + " nb" +
            std::to_string(r.n_buckets) + " f" + std::to_string(r.factor0),
        OpId::lsh_rotations, {output("R", n, 1, rot_tol)}, [=](auto& ops, auto& t) {
          ops.lsh_rotations(t("R"), 7, 3, 1, 2, r.n_hashes, r.dh, r.n_buckets, r.factor0);
        }));
  }
  // Sorting identical buckets gives identical permutations: 32-bit keys at
  // odd lengths, and a long sequence with many buckets (64-bit keys).
  struct Sort {
    int64_t L;
    int n_hashes, n_buckets;
  };
  for (const Sort s : {Sort{1025, 4, 32}, Sort{97, 3, 2}, Sort{int64_t(1) << 20, 2, 4096}}) {
    Case c = make_case("lsh_sort L" + std::to_string(s.L) + " h" + std::to_string(s.n_hashes) +
                           " nb" + std::to_string(s.n_buckets),
                       OpId::lsh_sort,
                       {ints("buckets", random_buckets(s.L, s.n_hashes, s.n_buckets, 9)),
                        int_output("perm", s.L * s.n_hashes)},
                       [=](auto& ops, auto& t) {
                         ops.lsh_sort(t.i("perm"), t.i("buckets"), s.L, s.n_hashes, s.n_buckets);
                       });
    c.bitwise = true;
    cases.push_back(c);
  }
  // Bucket ids packed into 16 bits and back, bit for bit; an odd count.
  for (const Sort s : {Sort{1025, 3, 65536}, Sort{int64_t(1) << 20, 4, 32768}}) {
    const int64_t n = s.L * s.n_hashes;
    const std::string tag = " n" + std::to_string(n) + " nb" + std::to_string(s.n_buckets);
    Case pack = make_case("lsh_pack_buckets" + tag, OpId::lsh_pack_buckets,
                          {ints("buckets", random_buckets(s.L, s.n_hashes, s.n_buckets, 11)),
                           int_output("packed", lsh_packed_elems(n))},
                          [=](auto& ops, auto& t) {
                            ops.lsh_pack_buckets(t.i("packed"), t.i("buckets"), n, s.n_buckets);
                          });
    pack.bitwise = true;
    cases.push_back(pack);
    std::vector<int32_t> packed(size_t(lsh_packed_elems(n)));
    const std::vector<int32_t> ids = random_buckets(s.L, s.n_hashes, s.n_buckets, 12);
    CpuOps<float>().lsh_pack_buckets(packed.data(), ids.data(), n, s.n_buckets);
    Case unpack = make_case("lsh_unpack_buckets" + tag, OpId::lsh_unpack_buckets,
                            {ints("packed", packed), int_output("buckets", n)},
                            [=](auto& ops, auto& t) {
                              ops.lsh_unpack_buckets(t.i("buckets"), t.i("packed"), n);
                            });
    unpack.bitwise = true;
    cases.push_back(unpack);
  }
  return cases;
}

REFORMER_CONFORMANCE_SUITE(LshOps, lsh_cases());

// ---------------------------------------------------------------- lsh_hash near ties

// Hashes L random positions (rows ld apart from qk offset off) on the GPU and
// checks the rounds of positions `check` (all if empty) against the CPU, with
// factor0 as in Ops::lsh_hash. A bucket may differ only at a near-tie: in each
// factor's block where the CPU's and the GPU's choices differ, the two must
// score within 2^-12 of the sum of their products' magnitudes (fp32 sums of
// the same exact products in two orders differ by a few 2^-24; the margin
// covers tensor-core accumulation). Returns the number of mismatches.
int64_t hash_mismatches(Dev& g, int64_t L, int dh, int n_hashes, int n_buckets, int64_t ld,
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
                  factor0, 1);
  const auto bg = g.down_i(buckets);

  std::vector<int32_t> bc;  // [n_hashes, check.size()]
  if (check.empty()) {
    for (int64_t i = 0; i < L; ++i) check.push_back(i);
    bc.resize(static_cast<size_t>(n_hashes * L));
    cpu.lsh_hash(bc.data(), qk.data() + off, ld, Rc.data(), L, dh, n_hashes, n_buckets, factor0,
                 1);
  } else {
    const int64_t n = int64_t(check.size());
    bc.resize(static_cast<size_t>(n_hashes * n));
    std::vector<int32_t> one(static_cast<size_t>(n_hashes));
    for (int64_t c = 0; c < n; ++c) {
      cpu.lsh_hash(one.data(), qk.data() + off + check[size_t(c)] * ld, ld, Rc.data(), 1, dh,
                   n_hashes, n_buckets, factor0, 1);
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
            const double t = double(lsh_round(x[d])) *
                             double(lsh_round(Rr[int64_t(d) * cols + blk.c0 + b % blk.n]));
            s += t;
            a += std::fabs(t);
          }
          *mag = a;
          return b < blk.n ? s : -s;
        };
        double mg = 0.0, mw = 0.0;
        const double sg = score(bg_j, &mg), sw = score(bw_j, &mw);
        EXPECT_LE(std::fabs(sw - sg), std::ldexp(1.0, -12) * (mg + mw))
            << "not a near-tie: round " << r << " position " << i << " block at " << blk.c0
            << " gpu " << got << " (" << sg << ") cpu " << want << " (" << sw << ")";
      }
    }
  }
  return mismatches;
}

// Many buckets: argmax over 1024 candidates.
void hash_many_buckets(Dev& g) {
  const int64_t L = 4096;
  const int n_hashes = 2;
  const int64_t m = hash_mismatches(g, L, 64, n_hashes, 1024, 64, 0, {}, 11);
  EXPECT_LT(double(m), 0.005 * double(n_hashes * L)) << m << " hash mismatches";
}

// Odd sizes: unaligned rows, n_buckets/2 not a multiple of 4, one bucket pair.
void hash_odd_sizes(Dev& g) {
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
void hash_factorized(Dev& g) {
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
  g.ops->lsh_hash(buckets.data(), dqk.data(), dh, dR.data(), L, dh, nh, nb, f0, 1);
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
  EXPECT_THROW(g.ops->lsh_hash(buckets.data(), dqk.data(), dh, dR.data(), L, dh, nh, nb, 6, 1),
               ShapeError);
}

// Products of 1 GiB: positions are hashed in several chunks on CUDA (a head
// width without the fused kernel, so the products are written); sampled
// positions (chunk edges among them) are checked against the CPU.
void hash_chunked(Dev& g) {
  const int64_t L = 65536;
  const int n_hashes = 4;
  std::vector<int64_t> check;
  for (int64_t i = 0; i < L; i += 61) check.push_back(i);
  for (int64_t e = 1024; e < L; e *= 2)
    for (int64_t i : {e - 1, e, e + 1}) check.push_back(i);
  for (int64_t i : {3 * L / 4 - 1, 3 * L / 4, L - 1}) check.push_back(i);
  const int64_t m = hash_mismatches(g, L, 48, n_hashes, 2048, 2 * 48, 0, check, 13);
  const int64_t n = n_hashes * int64_t(check.size());
  EXPECT_LE(m, std::max<int64_t>(2, n / 200)) << m << " hash mismatches of " << n;
}

// The models' shapes, which CUDA hashes with the product and the argmax in
// one kernel (head widths 32, 64, 128): one head's rows inside a row of all
// heads, several rotation tiles per round, a partial last tile, lengths that
// are not a multiple of the kernel's 128 positions, factorized buckets with
// the block edge inside a tile, and the enwik8 recipe's 2048 buckets at 64K
// (sampled positions).
void hash_fused_shapes(Dev& g) {
  struct Case {
    int64_t L;
    int dh, n_hashes, n_buckets, factor0;
    int64_t ld, off;
  };
  for (const Case& c :
       {Case{5000, 128, 4, 1024, 32, 1024, 256}, Case{300, 32, 2, 256, 0, 32, 0},
        Case{777, 64, 3, 96, 0, 64, 0}, Case{1000, 64, 2, 192, 8, 3 * 64 + 1, 7},
        Case{129, 128, 1, 2048, 0, 128, 0}}) {
    const int64_t n = c.n_hashes * c.L;
    const int64_t m =
        hash_mismatches(g, c.L, c.dh, c.n_hashes, c.n_buckets, c.ld, c.off, {}, 15, c.factor0);
    EXPECT_LE(m, std::max<int64_t>(2, n / 200))
        << m << " hash mismatches at L=" << c.L << " dh=" << c.dh << " n_buckets=" << c.n_buckets
        << " factor0=" << c.factor0;
  }
  const int64_t L = 65536;
  std::vector<int64_t> check;
  for (int64_t i = 0; i < L; i += 97) check.push_back(i);
  for (int64_t i : {int64_t(127), int64_t(128), L - 129, L - 1}) check.push_back(i);
  const int64_t m = hash_mismatches(g, L, 128, 4, 2048, 1024, 128, check, 16);
  const int64_t n = 4 * int64_t(check.size());
  EXPECT_LE(m, std::max<int64_t>(2, n / 200)) << m << " hash mismatches of " << n;
}

// Timing of lsh_hash (and lsh_sort) at long lengths; prints, asserts nothing.
void hash_timing(Dev& g) {
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
                      factor0, 1);
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


// The plain hash of the old suite's shape: rows of a wider buffer, 16 pairs.
void hash_basic(Dev& g) {
  const int64_t L = 1025;
  const int64_t m = hash_mismatches(g, L, 64, 4, 32, 3 * 64 + 1, 5, {}, 50);
  EXPECT_LT(double(m), 0.005 * double(4 * L)) << m << " hash mismatches";
}

// lsh_sort's contract: bucket ids lie in [0, n_buckets). An id outside is
// reported as ShapeError - at once on the CPU, at the next host
// synchronisation point on a device (which does not wait inside the op) -
// and the error is reported once: the Ops stays usable.
void sort_rejects_out_of_range(Dev& g) {
  const int64_t L = 97;
  auto b = random_buckets(L, 2, 8, 3);
  b[17] = 8;
  auto db = g.up_i(b);
  IntBuffer<float> perm(*g.ops, 2 * L);
  EXPECT_THROW(
      {
        g.ops->lsh_sort(perm.data(), db.data(), L, 2, 8);
        g.ops->synchronize();
      },
      ShapeError);
  b[17] = 7;
  auto ok = g.up_i(b);
  g.ops->lsh_sort(perm.data(), ok.data(), L, 2, 8);
  EXPECT_NO_THROW(g.down_i(perm));
}

// lsh_pack_buckets checks its ids as lsh_sort does: an id outside [0,
// n_buckets) is a ShapeError, on a device at the next synchronisation.
void pack_rejects_out_of_range(Dev& g) {
  const int64_t L = 97;
  auto b = random_buckets(L, 2, 8, 3);
  b[30] = -2;
  auto db = g.up_i(b);
  IntBuffer<float> packed(*g.ops, lsh_packed_elems(2 * L));
  EXPECT_THROW(
      {
        g.ops->lsh_pack_buckets(packed.data(), db.data(), 2 * L, 8);
        g.ops->synchronize();
      },
      ShapeError);
  b[30] = 5;
  auto ok = g.up_i(b);
  g.ops->lsh_pack_buckets(packed.data(), ok.data(), 2 * L, 8);
  EXPECT_NO_THROW(g.down_i(packed));
}

// lsh_hash of several heads side by side in one call (a pass's heads; CUDA:
// one launch over positions x heads) gives each head the bits of a call of
// its own, whose buckets the cases above check against the CPU: widths the
// fused kernel takes (64; 128 with factorized buckets) and one it does not
// (48, head by head), rows wider than the heads (ld = heads dh + 5).
void hash_heads_in_one_call(Dev& g) {
  for (const auto& [dh, n_buckets, factor0] : {std::tuple{64, 16, 0}, std::tuple{128, 64, 8},
                                               std::tuple{48, 16, 0}}) {
    SCOPED_TRACE("dh " + std::to_string(dh));
    const int heads = 3, n_hashes = 2;
    const int64_t L = 1000, ld = int64_t(heads) * dh + 5;
    const int64_t nR = int64_t(n_hashes) * dh * rotation_cols(n_buckets, factor0);
    IntBuffer<float> all(*g.ops, heads * n_hashes * L), one(*g.ops, n_hashes * L);
    Buffer<float> R(*g.ops, heads * nR);
    for (int j = 0; j < heads; ++j)
      g.ops->lsh_rotations(R.data() + j * nR, 9, 2, 1, j, n_hashes, dh, n_buckets, factor0);
    auto qk = g.up(random_vec(L * ld, 31));
    g.ops->lsh_hash(all.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, factor0,
                    heads);
    const auto got = g.down_i(all);
    for (int j = 0; j < heads; ++j) {
      g.ops->lsh_hash(one.data(), qk.data() + j * dh, ld, R.data() + j * nR, L, dh, n_hashes,
                      n_buckets, factor0, 1);
      const auto want = g.down_i(one);
      EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin() + j * n_hashes * L))
          << "head " << j;
    }
  }
}

TEST(LshHash, Basic) { on_each(all_backends(), hash_basic); }
TEST(LshHash, HeadsInOneCallEqualCallsOfTheirOwn) {
  on_each(all_backends(), hash_heads_in_one_call);
}
TEST(LshHash, ManyBuckets) { on_each(all_backends(), hash_many_buckets); }
TEST(LshHash, OddSizes) { on_each(all_backends(), hash_odd_sizes); }
TEST(LshHash, Factorized) { on_each(all_backends(), hash_factorized); }
// The products of 1 GiB are hashed in chunks on CUDA: device backends only.
TEST(LshHash, Chunked) { on_each(device_backends(), hash_chunked); }
TEST(LshHash, FusedShapes) { on_each(all_backends(), hash_fused_shapes); }
TEST(LshSort, RejectsOutOfRangeBuckets) { on_each(all_backends(), sort_rejects_out_of_range); }
TEST(LshPack, RejectsOutOfRangeBuckets) { on_each(all_backends(), pack_rejects_out_of_range); }
// Timing of lsh_hash (and lsh_sort) at long lengths; prints, asserts nothing.
// Run with --gtest_also_run_disabled_tests.
TEST(LshHash, DISABLED_Timing) { on_each(device_backends(), hash_timing); }

}  // namespace
