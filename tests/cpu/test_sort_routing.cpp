// The routing of the distributed bucket sort on simulated ranks: the host
// plan (framework/sort_routing.h) from the ranks' histograms, and the CPU
// ops bucket_histogram, sort_route and invert_index, against a global
// stable sort by (bucket, position) of the whole sequence.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "framework/sort_routing.h"
#include "kernels/cpu/lsh.h"
#include "kernels/cpu/routing.h"
#include "kernels/errors.h"

namespace reformer {
namespace {

struct Layout {
  int sp;
  int64_t L, left, right;
  bool wrap;
  int nb;        // buckets; 1 = local layer (no order, no bucket ids)
  int skew;      // > 0: only this many distinct buckets occur
};

std::string name(const Layout& y) {
  return "sp " + std::to_string(y.sp) + " L " + std::to_string(y.L) + " halo " +
         std::to_string(y.left) + "/" + std::to_string(y.right) + (y.wrap ? " wrap" : "") +
         " nb " + std::to_string(y.nb) + " skew " + std::to_string(y.skew);
}

// Every rank's routing, then what each rank receives, checked against the
// sorted order of the whole sequence.
void check_layout(const Layout& y) {
  SCOPED_TRACE(name(y));
  const int sp = y.sp, nb = y.nb;
  const int64_t L = y.L, N = L * sp;
  std::mt19937 rng(uint32_t(L * 31 + sp));
  std::vector<int32_t> bucket(size_t(N), 0);  // by global position
  if (nb > 1)
    for (auto& b : bucket) b = int32_t(rng() % uint32_t(y.skew > 0 ? y.skew : nb));
  // The global sorted order and each position's global slot.
  std::vector<int32_t> by_slot(static_cast<size_t>(N));
  std::iota(by_slot.begin(), by_slot.end(), 0);
  std::stable_sort(by_slot.begin(), by_slot.end(),
                   [&](int32_t a, int32_t b) { return bucket[size_t(a)] < bucket[size_t(b)]; });
  // Histograms.
  std::vector<int32_t> hist(size_t(sp) * nb);
  for (int k = 0; k < sp; ++k)
    cpu::bucket_histogram(hist.data() + int64_t(k) * nb, bucket.data() + k * L, L, 1, nb);
  SortRouteParams p;
  p.L = L;
  p.sp = sp;
  p.left_rows = y.left;
  p.right_rows = y.right;
  p.wrap = y.wrap;
  p.capacity = 2 * L;
  // Per sender: its plan and entries.
  std::vector<SortRound> plan(static_cast<size_t>(sp));
  std::vector<std::vector<int32_t>> send(static_cast<size_t>(sp)), back(static_cast<size_t>(sp));
  for (int k = 0; k < sp; ++k) {
    p.me = k;
    plan[size_t(k)] = plan_sort_round(hist.data(), nb, nb, p);
    std::vector<int32_t> order(static_cast<size_t>(L));
    const int32_t* b = bucket.data() + k * L;
    if (nb > 1) cpu::lsh_sort(order.data(), b, L, 1, nb);
    send[size_t(k)].assign(size_t(3 * p.capacity), -7);
    back[size_t(k)].assign(size_t(2 * L), -7);
    cpu::sort_route(send[size_t(k)].data(), back[size_t(k)].data(), nb > 1 ? order.data() : nullptr,
                    nb > 1 ? b : nullptr, plan[size_t(k)].delta.data(), p);
    // back points at this position's entries, the owner's carrying dout.
    const auto& s = send[size_t(k)];
    int64_t n = 0;
    for (int d = 0; d < sp; ++d) n += plan[size_t(k)].send_n[size_t(d)];
    for (int64_t i = 0; i < L; ++i) {
      const int32_t e = back[size_t(k)][size_t(i)], h = back[size_t(k)][size_t(L + i)];
      ASSERT_TRUE(e >= 0 && e < n) << "position " << i;
      EXPECT_EQ(s[size_t(e)], i);
      EXPECT_EQ(s[size_t(2 * p.capacity + e)], i);
      if (h >= 0) {
        ASSERT_LT(h, n);
        EXPECT_EQ(s[size_t(h)], i);
        EXPECT_EQ(s[size_t(2 * p.capacity + h)], -1);
      }
    }
    if (n < p.capacity) EXPECT_EQ(s[size_t(n)], -7) << "an entry past the planned count";
  }
  // Per receiver: rows from every rank in rank order, as the planned counts cut them.
  for (int k = 0; k < sp; ++k) {
    SCOPED_TRACE("receiver " + std::to_string(k));
    const int64_t left = y.wrap || k > 0 ? y.left : 0, right = y.wrap || k < sp - 1 ? y.right : 0;
    const int64_t n_local = left + L + right;
    std::vector<int32_t> pos_of_slot(size_t(n_local), -1);
    int64_t rows = 0, last = -1;
    for (int j = 0; j < sp; ++j) {
      EXPECT_EQ(plan[size_t(k)].recv_n[size_t(j)], plan[size_t(j)].send_n[size_t(k)]);
      int64_t e0 = 0;
      for (int d = 0; d < k; ++d) e0 += plan[size_t(j)].send_n[size_t(d)];
      for (int64_t e = e0; e < e0 + plan[size_t(j)].send_n[size_t(k)]; ++e, ++rows) {
        const int64_t pos = j * L + send[size_t(j)][size_t(e)];
        EXPECT_GT(pos, last) << "rows arrive in position order";
        last = pos;
        const int32_t slot = send[size_t(j)][size_t(p.capacity + e)];
        ASSERT_TRUE(slot >= 0 && slot < n_local) << "slot " << slot;
        EXPECT_EQ(pos_of_slot[size_t(slot)], -1) << "slot " << slot << " twice";
        pos_of_slot[size_t(slot)] = int32_t(pos);
      }
    }
    ASSERT_EQ(rows, n_local);
    // Local slot s holds global slot k L - left + s (mod N when wrapping).
    for (int64_t s = 0; s < n_local; ++s) {
      const int64_t g = ((k * L - left + s) % N + N) % N;
      EXPECT_EQ(pos_of_slot[size_t(s)], by_slot[size_t(g)]) << "local slot " << s;
    }
    // lperm on the receiver: the inverse of the arrival order's slots.
    std::vector<int32_t> slots;
    for (int j = 0; j < sp; ++j) {
      int64_t e0 = 0;
      for (int d = 0; d < k; ++d) e0 += plan[size_t(j)].send_n[size_t(d)];
      for (int64_t e = e0; e < e0 + plan[size_t(j)].send_n[size_t(k)]; ++e)
        slots.push_back(send[size_t(j)][size_t(p.capacity + e)]);
    }
    std::vector<int32_t> perm(slots.size());
    cpu::invert_index(perm.data(), slots.data(), int64_t(slots.size()));
    for (size_t r = 0; r < slots.size(); ++r) EXPECT_EQ(perm[size_t(slots[r])], int32_t(r));
  }
}

TEST(SortRouting, MatchesTheGlobalSortedOrder) {
  for (const Layout& y : {Layout{2, 512, 64, 0, true, 16, 0}, Layout{4, 256, 32, 32, false, 64, 0},
                          Layout{4, 256, 32, 32, true, 64, 2}, Layout{3, 96, 16, 16, false, 1, 0},
                          Layout{3, 96, 16, 16, true, 1, 0}, Layout{5, 64, 64, 0, true, 8, 1},
                          Layout{2, 1000, 128, 64, true, 1024, 0}}) {
    check_layout(y);
    if (HasFatalFailure()) return;
  }
}

TEST(SortRouting, RefusesBadInput) {
  SortRouteParams p;
  p.L = 16;
  p.sp = 2;
  p.left_rows = 8;
  p.capacity = 32;
  std::vector<int32_t> hist = {10, 6, 6, 6};  // sums to 28, not 32
  EXPECT_THROW(plan_sort_round(hist.data(), 2, 2, p), ShapeError);
  p.left_rows = 12;
  p.right_rows = 8;  // 20 halo rows > 16 positions
  hist = {10, 6, 6, 10};
  EXPECT_THROW(plan_sort_round(hist.data(), 2, 2, p), ShapeError);
  // A slot past the sequence.
  p.left_rows = 8;
  p.right_rows = 0;
  std::vector<int32_t> send(96), back(32), delta = {20};
  EXPECT_THROW(cpu::sort_route(send.data(), back.data(), nullptr, nullptr, delta.data(), p),
               ShapeError);
  // Too small a capacity.
  delta = {0};
  p.capacity = 20;
  EXPECT_THROW(cpu::sort_route(send.data(), back.data(), nullptr, nullptr, delta.data(), p),
               ShapeError);
  const std::vector<int32_t> twice = {0, 1, 1}, outside = {0, 3, 1};
  std::vector<int32_t> dst(3);
  EXPECT_THROW(cpu::invert_index(dst.data(), twice.data(), 3), ShapeError);
  EXPECT_THROW(cpu::invert_index(dst.data(), outside.data(), 3), ShapeError);
  const std::vector<int32_t> bad_bucket = {0, 5};
  EXPECT_THROW(cpu::bucket_histogram(dst.data(), bad_bucket.data(), 2, 1, 2), ShapeError);
}

}  // namespace
}  // namespace reformer
