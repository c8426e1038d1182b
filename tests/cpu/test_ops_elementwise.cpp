// CPU elementwise ops and dropout.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/common/philox.h"
#include "kernels/cpu/elementwise.h"
#include "tests/common/gradcheck.h"

namespace reformer {
namespace {

using Vec = std::vector<double>;

using test::random_vec;

TEST(Elementwise, FillCopyScale) {
  std::vector<float> x(9), y(9);
  cpu::fill(x.data(), 2.5f, 9);
  for (float v : x) EXPECT_EQ(v, 2.5f);
  cpu::scale(x.data(), -2.0f, 9);
  for (float v : x) EXPECT_EQ(v, -5.0f);
  cpu::copy(y.data(), x.data(), 9);
  EXPECT_EQ(x, y);
}

TEST(Elementwise, AddSubAxpyAndAliasing) {
  const Vec a = random_vec(11, 1), b = random_vec(11, 2);
  Vec out(11);
  cpu::add(out.data(), a.data(), b.data(), 11);
  for (size_t i = 0; i < 11; ++i) EXPECT_EQ(out[i], a[i] + b[i]);
  cpu::sub(out.data(), a.data(), b.data(), 11);
  for (size_t i = 0; i < 11; ++i) EXPECT_EQ(out[i], a[i] - b[i]);
  Vec acc = a;
  cpu::add(acc.data(), acc.data(), b.data(), 11);  // out aliases a
  for (size_t i = 0; i < 11; ++i) EXPECT_EQ(acc[i], a[i] + b[i]);
  acc = b;
  cpu::sub(acc.data(), a.data(), acc.data(), 11);  // out aliases b
  for (size_t i = 0; i < 11; ++i) EXPECT_EQ(acc[i], a[i] - b[i]);
  Vec y = a;
  cpu::axpy(y.data(), 0.5, b.data(), 11);
  for (size_t i = 0; i < 11; ++i) EXPECT_EQ(y[i], a[i] + 0.5 * b[i]);
}

TEST(Elementwise, SumSquaresInDoubleAndDeterministic) {
  // fp32 values whose squares sum exactly in double but not in fp32.
  std::vector<float> x(7, 1.0f);
  x[0] = 4096.0f;  // 2^24 + 6 is not representable in fp32
  EXPECT_EQ(cpu::sum_squares(x.data(), 7), 16777216.0 + 6.0);
  // Many blocks: the result does not depend on the thread count.
  const Vec big = random_vec(100003, 3);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double s1 = cpu::sum_squares(big.data(), int64_t(big.size()));
  omp_set_num_threads(2);
  const double s2 = cpu::sum_squares(big.data(), int64_t(big.size()));
  omp_set_num_threads(saved);
  EXPECT_EQ(s1, s2);
  double ref = 0;
  for (double v : big) ref += v * v;
  EXPECT_NEAR(s1, ref, 1e-10 * ref);
  EXPECT_EQ(cpu::sum_squares<double>(nullptr, 0), 0.0);
}

TEST(Elementwise, Copy2dAndAdd2dRespectStrides) {
  const int rows = 3, cols = 4, ld_src = 5, ld_dst = 7;
  const Vec src = random_vec(rows * ld_src, 4);
  Vec dst(rows * ld_dst, -1.0);
  cpu::copy_2d(dst.data(), ld_dst, src.data(), ld_src, rows, cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < ld_dst; ++c)
      EXPECT_EQ(dst[size_t(r * ld_dst + c)], c < cols ? src[size_t(r * ld_src + c)] : -1.0);
  cpu::add_2d(dst.data(), ld_dst, src.data(), ld_src, rows, cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < ld_dst; ++c)
      EXPECT_EQ(dst[size_t(r * ld_dst + c)], c < cols ? 2 * src[size_t(r * ld_src + c)] : -1.0);
}

// The CPU stashes exactly: a strided stash holds the rows back to back, and
// unstashing it into other strides gives the values back.
TEST(Elementwise, Stash2dKeepsRowsContiguouslyAndBack) {
  const int rows = 3, cols = 4, ld_src = 6, ld_dst = 9;
  const Vec src = random_vec(rows * ld_src, 7);
  Vec kept(rows * cols, -1.0), dst(rows * ld_dst, -2.0);
  cpu::stash_2d(kept.data(), src.data() + 1, ld_src, rows, cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      EXPECT_EQ(kept[size_t(r * cols + c)], src[size_t(r * ld_src + 1 + c)]);
  cpu::unstash_2d(dst.data(), ld_dst, kept.data(), rows, cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < ld_dst; ++c)
      EXPECT_EQ(dst[size_t(r * ld_dst + c)], c < cols ? src[size_t(r * ld_src + 1 + c)] : -2.0);
}

// ---------------------------------------------------------------- dropout

// In-place dropout of x with the (seed, step, layer, site) key at `offset`.
template <class T>
void drop(std::vector<T>& x, float p, uint64_t seed, uint64_t step, int layer, int site,
          int64_t offset) {
  cpu::dropout(x.data(), x.data(), int64_t(x.size()), p, seed, step, layer, site, offset, 1.0f,
               false);
}

TEST(Dropout, ZeroProbabilityIsIdentity) {
  const Vec x = random_vec(13, 5);
  Vec y = x;
  drop(y, 0.0f, 1, 2, 3, 4, 0);
  EXPECT_EQ(y, x);
}

TEST(Dropout, KeepsAboutOneMinusPAndRescales) {
  const int64_t n = 200001;
  const float p = 0.3f;
  std::vector<float> x(size_t(n), 1.0f);
  drop(x, p, 42, 7, 1, 0, 0);
  int64_t kept = 0;
  for (float v : x) {
    if (v != 0.0f) {
      ++kept;
      EXPECT_EQ(v, 1.0f / (1.0f - p));
    }
  }
  // Binomial(n, 0.7): standard deviation sqrt(n * 0.21) ~ 205, i.e. 0.001 of n;
  // 0.005 is five standard deviations.
  EXPECT_NEAR(double(kept) / double(n), 1.0 - p, 0.005);
}

TEST(Dropout, MaskIsTheStreamsDropoutUniform) {
  // Element i is kept iff dropout_uniform(key, offset + i) >= p: word
  // (offset + i) % 4 of Philox block (offset + i) / 4.
  const int64_t n = 37, offset = 6;
  const float p = 0.5f;
  std::vector<float> x(size_t(n), 1.0f);
  drop(x, p, 3, 4, 5, 1, offset);
  const RngKey key = make_key(3, RngPurpose::dropout, 4, 5, 1);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t g = uint64_t(offset + i);
    const bool keep = u32_to_unit(rng_block(key, g / 4).v[g % 4]) >= p;
    EXPECT_EQ(x[size_t(i)] != 0.0f, keep) << i;
    kept += keep;
  }
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, n);
}

TEST(Dropout, SameKeySameMask) {
  const Vec x = random_vec(101, 6);
  Vec a = x, b = x;
  drop(a, 0.5f, 9, 3, 2, 1, 17);
  drop(b, 0.5f, 9, 3, 2, 1, 17);
  EXPECT_EQ(a, b);
}

TEST(Dropout, GradientGetsTheSameMask) {
  // Backward of y = dropout(x) is dropout applied to dy with the same key.
  const Vec x = random_vec(101, 7), dy = random_vec(101, 8);
  Vec y = x, dx = dy;
  drop(y, 0.25f, 9, 3, 2, 1, 0);
  drop(dx, 0.25f, 9, 3, 2, 1, 0);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(y[i] == 0.0, dx[i] == 0.0) << i;
    if (y[i] != 0.0) {
      EXPECT_DOUBLE_EQ(y[i] / x[i], dx[i] / dy[i]);  // both scaled by 1 / (1 - p)
    }
  }
}

TEST(Dropout, DifferentSiteOrStepGivesDifferentMask) {
  const int64_t n = 257;
  auto mask = [&](uint64_t step, int site) {
    std::vector<float> x(size_t(n), 1.0f);
    drop(x, 0.5f, 9, step, 2, site, 0);
    return x;
  };
  EXPECT_NE(mask(3, 0), mask(3, 1));
  EXPECT_NE(mask(3, 0), mask(4, 0));
}

TEST(Dropout, OffsetIsAGlobalElementIndex) {
  // Dropping a shard [offset, offset + m) equals the same slice of one call on
  // the whole, for shards that start and end inside a Philox block.
  const int64_t n = 64;
  const Vec x = random_vec(n, 9);
  Vec whole = x;
  drop(whole, 0.4f, 5, 1, 0, 2, 0);
  for (int64_t offset : {0, 1, 3, 4, 23}) {
    for (int64_t m : {1, 2, 19, 40}) {
      Vec shard(x.begin() + offset, x.begin() + offset + m);
      drop(shard, 0.4f, 5, 1, 0, 2, offset);
      for (int64_t i = 0; i < m; ++i)
        EXPECT_EQ(shard[size_t(i)], whole[size_t(offset + i)]) << offset << " " << m << " " << i;
    }
  }
}

TEST(Dropout, IntoAnotherBufferAndAddedWithASign) {
  // out = dropout(x) leaves x alone; out += alpha dropout(x) adds the same
  // dropped-out values times alpha.
  const int64_t n = 53, offset = 10;
  const Vec x = random_vec(n, 10), base = random_vec(n, 11);
  Vec dropped = x;
  drop(dropped, 0.3f, 8, 2, 1, 0, offset);
  Vec out(size_t(n), 7.0);
  cpu::dropout(out.data(), x.data(), n, 0.3f, 8, 2, 1, 0, offset, 1.0f, false);
  EXPECT_EQ(out, dropped);
  for (float alpha : {1.0f, -1.0f, 0.5f}) {
    Vec acc = base;
    cpu::dropout(acc.data(), x.data(), n, 0.3f, 8, 2, 1, 0, offset, alpha, true);
    for (int64_t i = 0; i < n; ++i)
      EXPECT_EQ(acc[size_t(i)], base[size_t(i)] + double(alpha) * dropped[size_t(i)]) << i;
    // Onto a residual elsewhere: the same values, base left alone.
    Vec elsewhere(size_t(n), 5.0);
    cpu::dropout(elsewhere.data(), x.data(), n, 0.3f, 8, 2, 1, 0, offset, alpha, true,
                 base.data());
    EXPECT_EQ(elsewhere, acc);
  }
  // p = 0 still writes or adds.
  Vec acc = base;
  cpu::dropout(acc.data(), x.data(), n, 0.0f, 8, 2, 1, 0, offset, -1.0f, true);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(acc[size_t(i)], base[size_t(i)] - x[size_t(i)]) << i;
}

}  // namespace
}  // namespace reformer
