// LSH rotations, hashing and the per-round sort (CPU reference).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/errors.h"
#include "kernels/common/lsh_checks.h"
#include "kernels/common/params.h"
#include "kernels/common/philox.h"
#include "kernels/cpu/lsh.h"
#include "tests/common/gradcheck.h"

namespace reformer::cpu {
namespace {

using test::fill_random;

std::vector<double> rotations(uint64_t seed, uint64_t step, int layer, int head, int n_hashes,
                              int dh, int n_buckets, int factor0 = 0) {
  std::vector<double> R(size_t(n_hashes) * size_t(dh) *
                        size_t(rotation_cols(n_buckets, factor0)));
  lsh_rotations(R.data(), seed, step, layer, head, n_hashes, dh, n_buckets, factor0);
  return R;
}

// An operand as the hash sees it: rounded to bf16 through fp32.
template <class T>
T hashed(T x) {
  return T(lsh_round(float(x)));
}

// buckets[r, i] by the definition: argmax over concat(y, -y), lowest index on
// ties, y = x R with both rounded (hashed).
template <class T>
std::vector<int32_t> naive_hash(const std::vector<T>& qk, int64_t ld, const std::vector<T>& R,
                                int64_t L, int dh, int n_hashes, int n_buckets) {
  const int half = n_buckets / 2;
  std::vector<int32_t> b(size_t(n_hashes) * size_t(L));
  for (int r = 0; r < n_hashes; ++r)
    for (int64_t i = 0; i < L; ++i) {
      std::vector<T> y(static_cast<size_t>(n_buckets));
      for (int k = 0; k < half; ++k) {
        T s = 0;
        for (int d = 0; d < dh; ++d)
          s += hashed(qk[size_t(i * ld + d)]) * hashed(R[size_t((int64_t(r) * dh + d) * half + k)]);
        y[size_t(k)] = s;
        y[size_t(half + k)] = -s;
      }
      b[size_t(r * L + i)] = int32_t(std::max_element(y.begin(), y.end()) - y.begin());
    }
  return b;
}

// Factorized buckets by the definition (HF's ReformerModel): y = x R_r over
// f0/2 + f1/2 columns; b0 = argmax(concat(y[:f0/2], -y[:f0/2])),
// b1 = argmax(concat(y[f0/2:], -y[f0/2:])), bucket = b0 + f0 * b1.
template <class T>
std::vector<int32_t> naive_factored_hash(const std::vector<T>& qk, int64_t ld,
                                         const std::vector<T>& R, int64_t L, int dh, int n_hashes,
                                         int n_buckets, int f0) {
  const int f1 = n_buckets / f0, cols = f0 / 2 + f1 / 2;
  std::vector<int32_t> b(size_t(n_hashes) * size_t(L));
  for (int r = 0; r < n_hashes; ++r)
    for (int64_t i = 0; i < L; ++i) {
      std::vector<T> y(static_cast<size_t>(cols));
      for (int k = 0; k < cols; ++k) {
        T s = 0;
        for (int d = 0; d < dh; ++d)
          s += hashed(qk[size_t(i * ld + d)]) * hashed(R[size_t((int64_t(r) * dh + d) * cols + k)]);
        y[size_t(k)] = s;
      }
      std::vector<T> c0, c1;
      for (int k = 0; k < f0 / 2; ++k) c0.push_back(y[size_t(k)]);
      for (int k = 0; k < f0 / 2; ++k) c0.push_back(-y[size_t(k)]);
      for (int k = f0 / 2; k < cols; ++k) c1.push_back(y[size_t(k)]);
      for (int k = f0 / 2; k < cols; ++k) c1.push_back(-y[size_t(k)]);
      const auto b0 = int32_t(std::max_element(c0.begin(), c0.end()) - c0.begin());
      const auto b1 = int32_t(std::max_element(c1.begin(), c1.end()) - c1.begin());
      b[size_t(r * L + i)] = b0 + f0 * b1;
    }
  return b;
}

std::vector<int32_t> random_buckets(int64_t n, int n_buckets, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, n_buckets - 1);
  std::vector<int32_t> b(static_cast<size_t>(n));
  for (auto& x : b) x = dist(gen);
  return b;
}

std::vector<int32_t> sorted(const std::vector<int32_t>& buckets, int64_t L, int n_hashes,
                            int n_buckets) {
  std::vector<int32_t> perm(size_t(n_hashes) * size_t(L));
  lsh_sort(perm.data(), buckets.data(), L, n_hashes, n_buckets);
  return perm;
}

// ---------------------------------------------------------------- rotations

TEST(LshRotations, DeterministicForSameKey) {
  const auto a = rotations(7, 3, 2, 1, 3, 5, 8);
  const auto b = rotations(7, 3, 2, 1, 3, 5, 8);
  EXPECT_EQ(a, b);
  // The float instance draws the same numbers (rng_normal is computed in fp32).
  std::vector<float> f(a.size());
  lsh_rotations(f.data(), 7, 3, 2, 1, 3, 5, 8, 0);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(double(f[i]), a[i]) << i;
}

TEST(LshRotations, DifferForDifferentSeedStepLayerHead) {
  const auto base = rotations(7, 3, 2, 1, 2, 5, 8);
  const std::vector<std::vector<double>> others = {
      rotations(8, 3, 2, 1, 2, 5, 8), rotations(7, 4, 2, 1, 2, 5, 8),
      rotations(7, 3, 3, 1, 2, 5, 8), rotations(7, 3, 2, 0, 2, 5, 8)};
  for (const auto& o : others) {
    int equal = 0;
    for (size_t i = 0; i < base.size(); ++i) equal += base[i] == o[i];
    EXPECT_EQ(equal, 0);
  }
}

TEST(LshRotations, ElementIIsStreamElementI) {
  const int n_hashes = 3, dh = 7, n_buckets = 6;
  const auto R = rotations(11, 5, 1, 2, n_hashes, dh, n_buckets);
  const RngKey key = make_key(11, RngPurpose::rotations, 5, 1, 2);
  for (size_t i = 0; i < R.size(); ++i) EXPECT_EQ(R[i], double(lsh_round(rng_normal(key, i)))) << i;
  // Round 0 of a 3-round draw is the whole of a 1-round draw.
  const auto one = rotations(11, 5, 1, 2, 1, dh, n_buckets);
  EXPECT_TRUE(std::equal(one.begin(), one.end(), R.begin()));
}

TEST(LshRotations, FactorizedSizeAndStream) {
  // 64 buckets as 8 * 8: 4 + 4 columns per round rather than 32.
  EXPECT_EQ(rotation_cols(64, 0), 32);
  EXPECT_EQ(rotation_cols(64, 8), 8);
  EXPECT_EQ(rotation_cols(32768, 128), 64 + 128);
  EXPECT_EQ(rotation_cols(4, 2), 2);
  const int n_hashes = 3, dh = 7, n_buckets = 64, f0 = 8;
  const auto R = rotations(11, 5, 1, 2, n_hashes, dh, n_buckets, f0);
  ASSERT_EQ(R.size(), size_t(n_hashes * dh * 8));
  EXPECT_EQ(R, rotations(11, 5, 1, 2, n_hashes, dh, n_buckets, f0));  // deterministic
  // Element i is stream element i, as without factors: a prefix of the plain draw.
  const auto plain = rotations(11, 5, 1, 2, n_hashes, dh, n_buckets);
  EXPECT_TRUE(std::equal(R.begin(), R.end(), plain.begin()));
  // Guard against writing past the end: the buffer's tail stays untouched.
  std::vector<float> Rf(R.size() + 5, -7.0f);
  lsh_rotations(Rf.data(), 11, 5, 1, 2, n_hashes, dh, n_buckets, f0);
  for (size_t i = 0; i < R.size(); ++i) EXPECT_EQ(double(Rf[i]), R[i]) << i;
  for (size_t i = R.size(); i < Rf.size(); ++i) EXPECT_EQ(Rf[i], -7.0f) << i;
}

TEST(LshRotations, StandardNormalStatistics) {
  const auto R = rotations(1234, 0, 0, 0, 4, 64, 512);  // 65536 draws
  const double n = double(R.size());
  double mean = 0, m2 = 0, m3 = 0, m4 = 0, within1 = 0;
  for (double x : R) mean += x;
  mean /= n;
  for (double x : R) {
    const double d = x - mean;
    m2 += d * d;
    m3 += d * d * d;
    m4 += d * d * d * d;
    within1 += std::fabs(x) < 1.0;
  }
  m2 /= n;
  m3 /= n;
  m4 /= n;
  // Standard errors at n = 65536: mean 0.004, variance 0.0055, skewness
  // 0.0096, kurtosis 0.019, P(|x| < 1) 0.0018; bounds are about 5 of them.
  EXPECT_NEAR(mean, 0.0, 0.02);
  EXPECT_NEAR(m2, 1.0, 0.03);
  EXPECT_NEAR(m3 / std::pow(m2, 1.5), 0.0, 0.05);
  EXPECT_NEAR(m4 / (m2 * m2), 3.0, 0.1);
  EXPECT_NEAR(within1 / n, 0.682689, 0.01);
}

TEST(LshRotations, RejectsOddOrTooFewBuckets) {
  std::vector<double> R(100);
  EXPECT_THROW(lsh_rotations(R.data(), 1, 0, 0, 0, 1, 5, 7, 0), ShapeError);
  EXPECT_THROW(lsh_rotations(R.data(), 1, 0, 0, 0, 1, 5, 0, 0), ShapeError);
  // factor0 must be 0 or an even factor with an even cofactor.
  for (int f0 : {-2, 1, 3, 6, 16, 32})
    EXPECT_THROW(lsh_rotations(R.data(), 1, 0, 0, 0, 1, 5, 16, f0), ShapeError) << f0;
  std::vector<int32_t> b(1);
  const std::vector<double> x(5, 1.0);
  EXPECT_THROW(lsh_hash(b.data(), x.data(), 5, R.data(), 1, 5, 1, 16, 6), ShapeError);
  EXPECT_NO_THROW(lsh_rotations(R.data(), 1, 0, 0, 0, 1, 5, 16, 8));
}

// ---------------------------------------------------------------- hash

TEST(LshHash, MatchesNaiveArgmaxDouble) {
  const int64_t L = 40, ld = 9;
  const int dh = 7, n_hashes = 3, n_buckets = 8;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 1);
  const auto R = rotations(3, 1, 0, 0, n_hashes, dh, n_buckets);
  std::vector<int32_t> b(size_t(n_hashes * L));
  lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  EXPECT_EQ(b, naive_hash(qk, ld, R, L, dh, n_hashes, n_buckets));
}

// Several heads side by side in one call (kernels/ops.h): head j's columns
// of qk, its rotations after head j - 1's and its buckets after head j - 1's,
// each head as a call of its own hashes it (plain and factorized buckets,
// rows wider than the heads).
TEST(LshHash, HeadsSideBySideEqualCallsOfTheirOwn) {
  for (const int factor0 : {0, 4}) {
    const int64_t L = 30, ld = 3 * 6 + 2;
    const int dh = 6, n_hashes = 2, n_buckets = 16, heads = 3;
    const int64_t nR = int64_t(n_hashes) * dh * rotation_cols(n_buckets, factor0);
    std::vector<double> qk(size_t(L * ld)), R(size_t(heads * nR));
    fill_random(qk.data(), int64_t(qk.size()), 4);
    for (int j = 0; j < heads; ++j)
      lsh_rotations(R.data() + j * nR, 3, 1, 0, j, n_hashes, dh, n_buckets, factor0);
    std::vector<int32_t> all(size_t(heads * n_hashes * L)), one(size_t(n_hashes * L));
    lsh_hash(all.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, factor0, heads);
    for (int j = 0; j < heads; ++j) {
      lsh_hash(one.data(), qk.data() + j * dh, ld, R.data() + j * nR, L, dh, n_hashes, n_buckets,
               factor0);
      EXPECT_TRUE(std::equal(one.begin(), one.end(), all.begin() + j * n_hashes * L))
          << "factor0 " << factor0 << ", head " << j;
    }
  }
}

TEST(LshHash, MatchesNaiveArgmaxFloat) {
  const int64_t L = 24, ld = 6;
  const int dh = 5, n_hashes = 2, n_buckets = 16;
  std::vector<double> qd(size_t(L * ld));
  fill_random(qd.data(), int64_t(qd.size()), 2);
  std::vector<float> qk(qd.begin(), qd.end());
  std::vector<float> R(size_t(n_hashes * dh * n_buckets / 2));
  lsh_rotations(R.data(), 5, 2, 1, 0, n_hashes, dh, n_buckets, 0);
  std::vector<int32_t> b(size_t(n_hashes * L));
  lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  EXPECT_EQ(b, naive_hash(qk, ld, R, L, dh, n_hashes, n_buckets));
}

TEST(LshHash, ScaleInvariant) {
  const int64_t L = 40, ld = 7;
  const int dh = 7, n_hashes = 4, n_buckets = 10;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 3);
  std::vector<double> qk2(qk), qk_half(qk);
  for (auto& x : qk2) x *= 2;
  for (auto& x : qk_half) x *= 0.5;
  const auto R = rotations(9, 0, 0, 0, n_hashes, dh, n_buckets);
  std::vector<int32_t> b(size_t(n_hashes * L)), b2(b.size()), bh(b.size());
  lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  lsh_hash(b2.data(), qk2.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  lsh_hash(bh.data(), qk_half.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  EXPECT_EQ(b, b2);
  EXPECT_EQ(b, bh);
}

TEST(LshRotations, BFloat16Values) {
  // Every entry keeps 8 significant bits, and they are not all integers or 0.
  const auto R = rotations(4, 2, 0, 1, 2, 16, 64);
  int fractional = 0;
  for (double x : R) {
    int e = 0;
    const double m = std::frexp(x, &e);  // x = m 2^e, 0.5 <= |m| < 1
    EXPECT_EQ(m * 256.0, std::trunc(m * 256.0)) << x;
    fractional += x != std::trunc(x);
  }
  EXPECT_GT(fractional, int(R.size()) / 2);
}

TEST(LshHash, SeesOperandsRoundedToBFloat16) {
  // x and x moved within its bf16 rounding interval hash alike; moved past
  // it, the buckets change somewhere. R given unrounded hashes as rounded.
  const int64_t L = 64, ld = 6;
  const int dh = 6, n_hashes = 2, n_buckets = 32;
  std::vector<float> x(size_t(L * ld));
  std::vector<double> xd(x.size());
  fill_random(xd.data(), int64_t(xd.size()), 21);
  for (size_t e = 0; e < x.size(); ++e) x[e] = lsh_round(float(xd[e]));
  std::vector<float> inside(x), past(x), R(size_t(n_hashes * dh * n_buckets / 2));
  for (size_t e = 0; e < x.size(); ++e) {
    inside[e] = x[e] * (1.0f + 0x1p-10f);  // a quarter ulp of bf16's 8 bits
    past[e] = x[e] * (1.0f + float(e % 7) * 0x1p-5f);
  }
  lsh_rotations(R.data(), 3, 0, 0, 0, n_hashes, dh, n_buckets, 0);
  std::vector<float> R_off(R);
  for (float& r : R_off) r *= 1.0f - 0x1p-11f;
  std::vector<int32_t> b(size_t(n_hashes * L)), bi(b.size()), bp(b.size()), br(b.size());
  lsh_hash(b.data(), x.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  lsh_hash(bi.data(), inside.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  lsh_hash(bp.data(), past.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  lsh_hash(br.data(), x.data(), ld, R_off.data(), L, dh, n_hashes, n_buckets, 0);
  EXPECT_EQ(b, bi);
  EXPECT_EQ(b, br);
  EXPECT_NE(b, bp);
}

TEST(LshHash, BucketsInRangeAndUsed) {
  const int64_t L = 200, ld = 5;
  const int dh = 5, n_hashes = 2;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 4);
  for (int n_buckets : {2, 4, 8}) {
    const auto R = rotations(1, 0, 0, 0, n_hashes, dh, n_buckets);
    std::vector<int32_t> b(size_t(n_hashes * L));
    lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
    std::vector<int> count(size_t(n_buckets), 0);
    for (int32_t x : b) {
      ASSERT_GE(x, 0);
      ASSERT_LT(x, n_buckets);
      ++count[size_t(x)];
    }
    // 200 random points per round over at most 8 buckets: every bucket is hit.
    for (int c : count) EXPECT_GT(c, 0) << "n_buckets " << n_buckets;
  }
}

TEST(LshHash, NegatedInputMapsToOppositeBucket) {
  const int64_t L = 40, ld = 8;
  const int dh = 5, n_hashes = 3, n_buckets = 12, half = n_buckets / 2;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 5);
  std::vector<double> neg(qk);
  for (auto& x : neg) x = -x;
  const auto R = rotations(2, 0, 0, 0, n_hashes, dh, n_buckets);
  std::vector<int32_t> b(size_t(n_hashes * L)), bn(b.size());
  lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  lsh_hash(bn.data(), neg.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  for (size_t k = 0; k < b.size(); ++k) EXPECT_EQ(bn[k], (b[k] + half) % n_buckets) << k;
}

TEST(LshHash, TiesPickLowestIndex) {
  // dh = 1, two rotation columns equal to 1: y = (x, x), concat = (x, x, -x, -x).
  const std::vector<double> R = {1.0, 1.0};
  const std::vector<double> qk = {2.0, -3.0, 0.0};
  std::vector<int32_t> b(3);
  lsh_hash(b.data(), qk.data(), 1, R.data(), 3, 1, 1, 4, 0);
  EXPECT_EQ(b, (std::vector<int32_t>{0, 2, 0}));
}

// The op interface's form: a T Operand hashes as the plain rows; the CPU
// keeps no bf16 operands and refuses them.
TEST(LshHash, OperandFormRefusesBf16) {
  const std::vector<double> R = {1.0, 1.0};
  const std::vector<double> qk = {2.0, -3.0, 0.0};
  std::vector<int32_t> b(3, -1);
  lsh_hash(b.data(), Operand<double>{qk.data()}, 1, R.data(), 3, 1, 1, 4, 0, 1);
  EXPECT_EQ(b, (std::vector<int32_t>{0, 2, 0}));
  EXPECT_THROW(lsh_hash(b.data(), Operand<double>{qk.data(), true}, 1, R.data(), 3, 1, 1, 4, 0, 1),
               ShapeError);
}

TEST(LshHash, FactorizedMatchesNaiveDouble) {
  const int64_t L = 60, ld = 9;
  const int dh = 7, n_hashes = 3;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 11);
  // Equal and unequal factors, and the smallest (2 * 2).
  for (const auto& [n_buckets, f0] : {std::pair{16, 4}, std::pair{32, 4}, std::pair{4, 2},
                                     std::pair{24, 6}}) {
    const auto R = rotations(3, 1, 0, 0, n_hashes, dh, n_buckets, f0);
    std::vector<int32_t> b(size_t(n_hashes * L));
    lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, f0);
    EXPECT_EQ(b, naive_factored_hash(qk, ld, R, L, dh, n_hashes, n_buckets, f0))
        << n_buckets << " = " << f0 << " * " << n_buckets / f0;
  }
}

TEST(LshHash, FactorizedMatchesNaiveFloat) {
  const int64_t L = 33, ld = 6;
  const int dh = 5, n_hashes = 2, n_buckets = 128, f0 = 8;
  std::vector<double> qd(size_t(L * ld));
  fill_random(qd.data(), int64_t(qd.size()), 12);
  std::vector<float> qk(qd.begin(), qd.end());
  std::vector<float> R(size_t(n_hashes * dh * rotation_cols(n_buckets, f0)));
  lsh_rotations(R.data(), 5, 2, 1, 0, n_hashes, dh, n_buckets, f0);
  std::vector<int32_t> b(size_t(n_hashes * L));
  lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, f0);
  EXPECT_EQ(b, naive_factored_hash(qk, ld, R, L, dh, n_hashes, n_buckets, f0));
}

TEST(LshHash, FactorizedBucketsInRangeAndUsed) {
  const int64_t L = 400, ld = 5;
  const int dh = 5, n_hashes = 2;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 13);
  for (const auto& [n_buckets, f0] : {std::pair{4, 2}, std::pair{8, 2}, std::pair{16, 4}}) {
    const auto R = rotations(1, 0, 0, 0, n_hashes, dh, n_buckets, f0);
    std::vector<int32_t> b(size_t(n_hashes * L));
    lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, f0);
    std::vector<int> count(size_t(n_buckets), 0);
    for (int32_t x : b) {
      ASSERT_GE(x, 0);
      ASSERT_LT(x, n_buckets);
      ++count[size_t(x)];
    }
    // 800 random points over at most 16 buckets: every bucket is hit.
    for (int c : count) EXPECT_GT(c, 0) << "n_buckets " << n_buckets << " f0 " << f0;
    // The sort accepts them.
    const auto perm = sorted(b, L, n_hashes, n_buckets);
    EXPECT_EQ(perm.size(), b.size());
  }
}

TEST(LshHash, FactorizedNegatedInputFlipsBothFactors) {
  const int64_t L = 40, ld = 8;
  const int dh = 5, n_hashes = 3, n_buckets = 32, f0 = 4, f1 = n_buckets / f0;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 14);
  std::vector<double> neg(qk);
  for (auto& x : neg) x = -x;
  const auto R = rotations(2, 0, 0, 0, n_hashes, dh, n_buckets, f0);
  std::vector<int32_t> b(size_t(n_hashes * L)), bn(b.size());
  lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, f0);
  lsh_hash(bn.data(), neg.data(), ld, R.data(), L, dh, n_hashes, n_buckets, f0);
  for (size_t k = 0; k < b.size(); ++k) {
    const int b0 = b[k] % f0, b1 = b[k] / f0;
    EXPECT_EQ(bn[k], (b0 + f0 / 2) % f0 + f0 * ((b1 + f1 / 2) % f1)) << k;
  }
}

TEST(LshHash, FactorizedTiesPickLowestIndex) {
  // dh = 1, 4 = 2 * 2 buckets, columns (1, 1): y0 = (x), y1 = (x).
  // x > 0: b0 = 0, b1 = 0; x < 0: b0 = 1, b1 = 1 -> 3; x = 0: all tie -> 0.
  const std::vector<double> R = {1.0, 1.0};
  const std::vector<double> qk = {2.0, -3.0, 0.0};
  std::vector<int32_t> b(3);
  lsh_hash(b.data(), qk.data(), 1, R.data(), 3, 1, 1, 4, 2);
  EXPECT_EQ(b, (std::vector<int32_t>{0, 3, 0}));
}

// ---------------------------------------------------------------- sort

TEST(LshSort, IsPermutationPerRound) {
  const int64_t L = 97;
  const int n_hashes = 3, n_buckets = 8;
  const auto b = random_buckets(n_hashes * L, n_buckets, 1);
  const auto perm = sorted(b, L, n_hashes, n_buckets);
  for (int r = 0; r < n_hashes; ++r) {
    std::vector<int32_t> p(perm.begin() + r * L, perm.begin() + (r + 1) * L);
    std::sort(p.begin(), p.end());
    for (int64_t s = 0; s < L; ++s) EXPECT_EQ(p[size_t(s)], s);
  }
}

TEST(LshSort, BucketsNondecreasingTiesByPosition) {
  const int64_t L = 64;
  const int n_hashes = 2, n_buckets = 4;
  const auto b = random_buckets(n_hashes * L, n_buckets, 2);
  const auto perm = sorted(b, L, n_hashes, n_buckets);
  for (int r = 0; r < n_hashes; ++r)
    for (int64_t s = 1; s < L; ++s) {
      const int32_t i0 = perm[size_t(r * L + s - 1)], i1 = perm[size_t(r * L + s)];
      const int32_t b0 = b[size_t(r * L + i0)], b1 = b[size_t(r * L + i1)];
      ASSERT_LE(b0, b1);
      if (b0 == b1) {
        EXPECT_LT(i0, i1);
      }
    }
}

TEST(LshSort, EqualsStdStableSortWithManyTies) {
  const int64_t L = 101;
  const int n_hashes = 4, n_buckets = 6;
  const auto b = random_buckets(n_hashes * L, n_buckets, 3);
  const auto perm = sorted(b, L, n_hashes, n_buckets);
  for (int r = 0; r < n_hashes; ++r) {
    std::vector<int32_t> ref(static_cast<size_t>(L));
    std::iota(ref.begin(), ref.end(), 0);
    std::stable_sort(ref.begin(), ref.end(), [&](int32_t x, int32_t y) {
      return b[size_t(r * L + x)] < b[size_t(r * L + y)];
    });
    EXPECT_TRUE(std::equal(ref.begin(), ref.end(), perm.begin() + r * L)) << "round " << r;
  }
}

TEST(LshSort, IndependentOfTiePresentation) {
  const int64_t L = 50;
  const int n_hashes = 2, n_buckets = 4;
  const auto b = random_buckets(n_hashes * L, n_buckets, 4);
  const auto perm = sorted(b, L, n_hashes, n_buckets);
  for (int r = 0; r < n_hashes; ++r) {
    // Present the positions in reverse order and sort by (bucket, position).
    std::vector<int32_t> ref(static_cast<size_t>(L));
    std::iota(ref.rbegin(), ref.rend(), 0);
    std::sort(ref.begin(), ref.end(), [&](int32_t x, int32_t y) {
      const int32_t bx = b[size_t(r * L + x)], by = b[size_t(r * L + y)];
      return bx != by ? bx < by : x < y;
    });
    EXPECT_TRUE(std::equal(ref.begin(), ref.end(), perm.begin() + r * L)) << "round " << r;
  }
}

TEST(LshSort, RoundsAreSortedIndependently) {
  const int64_t L = 36;
  const int n_hashes = 3, n_buckets = 8;
  const auto b = random_buckets(n_hashes * L, n_buckets, 5);
  const auto perm = sorted(b, L, n_hashes, n_buckets);
  for (int r = 0; r < n_hashes; ++r) {
    const std::vector<int32_t> br(b.begin() + r * L, b.begin() + (r + 1) * L);
    const auto one = sorted(br, L, 1, n_buckets);
    EXPECT_TRUE(std::equal(one.begin(), one.end(), perm.begin() + r * L)) << "round " << r;
  }
}

TEST(LshSort, SingleBucketGivesIdentity) {
  const int64_t L = 12;
  const std::vector<int32_t> b(size_t(2 * L), 3);  // all in bucket 3 of 8; others empty
  const auto perm = sorted(b, L, 2, 8);
  for (int r = 0; r < 2; ++r)
    for (int64_t s = 0; s < L; ++s) EXPECT_EQ(perm[size_t(r * L + s)], s);
}

TEST(LshSort, RejectsOutOfRangeBucket) {
  std::vector<int32_t> b = {0, 1, 4, 2}, perm(4);
  EXPECT_THROW(lsh_sort(perm.data(), b.data(), 4, 1, 4), ShapeError);
  b[2] = -1;
  EXPECT_THROW(lsh_sort(perm.data(), b.data(), 4, 1, 4), ShapeError);
}

// Bucket ids packed two to an int32 (id k in bits 16 (k % 2) of element k /
// 2, an odd count's last high half 0) come back as they were; an id outside
// [0, n_buckets) or more than 2^16 buckets is refused.
TEST(LshPack, RoundTripsAndRejects) {
  const std::vector<int32_t> b = {0, 65535, 7, 40000, 1};
  std::vector<int32_t> packed(size_t(lsh_packed_elems(5)), -1), back(5, -1);
  ASSERT_EQ(packed.size(), 3u);
  lsh_pack_buckets(packed.data(), b.data(), 5, 65536);
  EXPECT_EQ(uint32_t(packed[0]), 0xffff0000u);
  EXPECT_EQ(uint32_t(packed[1]), (40000u << 16) | 7u);
  EXPECT_EQ(packed[2], 1);
  lsh_unpack_buckets(back.data(), packed.data(), 5);
  EXPECT_EQ(back, b);
  EXPECT_THROW(lsh_pack_buckets(packed.data(), b.data(), 5, 40000), ShapeError);
  EXPECT_THROW(lsh_pack_buckets(packed.data(), b.data(), 1, 65538), ShapeError);
  const std::vector<int32_t> neg = {3, -1};
  EXPECT_THROW(lsh_pack_buckets(packed.data(), neg.data(), 2, 8), ShapeError);
}

TEST(LshPipeline, HashThenSortGroupsBuckets) {
  const int64_t L = 40, ld = 7;
  const int dh = 5, n_hashes = 2, n_buckets = 8;
  std::vector<double> qk(size_t(L * ld));
  fill_random(qk.data(), int64_t(qk.size()), 6);
  const auto R = rotations(4, 7, 1, 3, n_hashes, dh, n_buckets);
  std::vector<int32_t> b(size_t(n_hashes * L));
  lsh_hash(b.data(), qk.data(), ld, R.data(), L, dh, n_hashes, n_buckets, 0);
  const auto perm = sorted(b, L, n_hashes, n_buckets);
  for (int r = 0; r < n_hashes; ++r)
    for (int64_t s = 1; s < L; ++s) {
      const int32_t i0 = perm[size_t(r * L + s - 1)], i1 = perm[size_t(r * L + s)];
      const auto key0 = std::pair(b[size_t(r * L + i0)], i0);
      const auto key1 = std::pair(b[size_t(r * L + i1)], i1);
      EXPECT_LT(key0, key1);
    }
}

// Decoding step by step: each call files the new position's bucket and
// returns, per unit, exactly the positions so far in that bucket, in order.
TEST(LshDecodeKeys, GathersSameBucketPositionsInOrder) {
  const int units = 3;
  const int64_t cap = 9;
  std::vector<int32_t> history(size_t(units * cap), -1), keys(size_t(units * cap), -7),
      sets(size_t(2 * units));
  std::vector<std::vector<int32_t>> fed(units);
  for (int64_t pos = 0; pos < cap; ++pos) {
    std::vector<int32_t> b(units);
    for (int u = 0; u < units; ++u) b[size_t(u)] = int32_t((pos * (u + 2) + u) % 3);
    lsh_decode_keys(keys.data(), sets.data(), history.data(), b.data(), 1, units, cap, pos);
    for (int u = 0; u < units; ++u) {
      fed[size_t(u)].push_back(b[size_t(u)]);
      std::vector<int32_t> want;
      for (int64_t j = 0; j <= pos; ++j)
        if (fed[size_t(u)][size_t(j)] == b[size_t(u)]) want.push_back(int32_t(j));
      EXPECT_EQ(sets[size_t(2 * u)], u * cap);
      ASSERT_EQ(sets[size_t(2 * u + 1)], int32_t(want.size())) << "unit " << u << " pos " << pos;
      const int32_t* got = keys.data() + u * cap;
      EXPECT_EQ(std::vector<int32_t>(got, got + want.size()), want);
      EXPECT_EQ(history[size_t(u * cap + pos)], b[size_t(u)]);
    }
  }
  EXPECT_THROW(lsh_decode_keys(keys.data(), sets.data(), history.data(), history.data(), 1,
                               units, cap, cap),
               ShapeError);
}

}  // namespace
}  // namespace reformer::cpu
