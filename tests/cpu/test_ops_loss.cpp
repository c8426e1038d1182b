// CPU softmax cross-entropy and row argmax.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/cross_entropy.h"
#include "tests/common/gradcheck.h"

namespace reformer {
namespace {

using Vec = std::vector<double>;

using test::random_vec;

constexpr int N = 5, V = 7;

TEST(CrossEntropy, LossMatchesDirectFormula) {
  const Vec logits = random_vec(N * V, 1, 3.0);
  const std::vector<int32_t> targets = {0, 6, 3, 3, 1};
  Vec loss(N);
  cpu::softmax_cross_entropy(loss.data(), static_cast<double*>(nullptr), logits.data(),
                             targets.data(), N, V, 1.0);
  for (int n = 0; n < N; ++n) {
    double z = 0;
    for (int v = 0; v < V; ++v) z += std::exp(logits[size_t(n * V + v)]);
    const double want = -std::log(std::exp(logits[size_t(n * V + targets[size_t(n)])]) / z);
    EXPECT_NEAR(loss[size_t(n)], want, 1e-14);
  }
}

TEST(CrossEntropy, GradientFiniteDifference) {
  Vec logits = random_vec(N * V, 2, 3.0);
  const std::vector<int32_t> targets = {2, 6, 0, 5, 4};
  const double scale = 0.37;
  // Loss: scale * sum_n loss[n], whose gradient the op writes.
  auto total = [&] {
    Vec loss(N);
    cpu::softmax_cross_entropy(loss.data(), static_cast<double*>(nullptr), logits.data(),
                               targets.data(), N, V, 1.0);
    double s = 0;
    for (double l : loss) s += l;
    return scale * s;
  };
  Vec loss(N), dlogits(N * V, 99.0);  // overwritten, not accumulated
  cpu::softmax_cross_entropy(loss.data(), dlogits.data(), logits.data(), targets.data(), N, V,
                             scale);
  const Vec numeric = test::numeric_grad(total, logits.data(), N * V);
  // Central differences in double, h = 1e-6: error ~1e-9 absolute on an O(1)
  // loss, so 1e-6 relative with an absolute floor of 1e-8.
  EXPECT_LE(test::max_rel_err(dlogits.data(), numeric.data(), N * V, 1e-2), 1e-6);
}

TEST(CrossEntropy, IgnoredTargetsGiveZeroLossAndGradient) {
  const Vec logits = random_vec(N * V, 3, 3.0);
  const std::vector<int32_t> targets = {1, -1, 4, -1, 0};
  Vec loss(N, 5.0), dlogits(N * V, 5.0);
  cpu::softmax_cross_entropy(loss.data(), dlogits.data(), logits.data(), targets.data(), N, V, 1.0);
  for (int n : {1, 3}) {
    EXPECT_EQ(loss[size_t(n)], 0.0);
    for (int v = 0; v < V; ++v) EXPECT_EQ(dlogits[size_t(n * V + v)], 0.0);
  }
  for (int n : {0, 2, 4}) {
    EXPECT_GT(loss[size_t(n)], 0.0);
    double row = 0;  // softmax - onehot sums to zero
    for (int v = 0; v < V; ++v) row += dlogits[size_t(n * V + v)];
    EXPECT_NEAR(row, 0.0, 1e-15);
  }
}

TEST(CrossEntropy, GradientMayAliasLogits) {
  const Vec logits = random_vec(N * V, 4, 3.0);
  const std::vector<int32_t> targets = {3, 2, -1, 0, 6};
  Vec loss(N), dlogits(N * V);
  cpu::softmax_cross_entropy(loss.data(), dlogits.data(), logits.data(), targets.data(), N, V, 0.5);
  Vec inplace = logits, loss2(N);
  cpu::softmax_cross_entropy(loss2.data(), inplace.data(), inplace.data(), targets.data(), N, V,
                             0.5);
  EXPECT_EQ(loss2, loss);
  EXPECT_EQ(inplace, dlogits);
}

TEST(CrossEntropy, StableForLargeLogitsInFloat) {
  // exp(1000) overflows in any precision; max subtraction keeps it finite.
  std::vector<float> logits = {1000.0f, 999.0f, 998.0f};
  const std::vector<int32_t> targets = {1};
  std::vector<float> loss(1), dlogits(3);
  cpu::softmax_cross_entropy(loss.data(), dlogits.data(), logits.data(), targets.data(), 1, 3,
                             1.0f);
  const double want = std::log(std::exp(1.0) + 1.0 + std::exp(-1.0));
  EXPECT_NEAR(loss[0], want, 1e-6);
  for (float g : dlogits) EXPECT_TRUE(std::isfinite(g));
}

TEST(Argmax, LowestIndexOnTies) {
  const std::vector<float> logits = {0.f, 2.f, 2.f, 1.f,  //
                                     5.f, 5.f, 5.f, 5.f,  //
                                     -3.f, -2.f, -1.f, -1.5f};
  std::vector<int32_t> out(3);
  cpu::argmax_rows(out.data(), logits.data(), 3, 4);
  EXPECT_EQ(out, (std::vector<int32_t>{1, 0, 2}));
}

}  // namespace
}  // namespace reformer
