// Conformance of the sequence-parallel routing ops (harness: conformance.h):
// bucket_histogram, sort_route and invert_index are integer ops, equal bit
// for bit on every backend. sort_route's inputs are one rank's share of a
// simulated sequence: its sorted order and bucket ids, and the slot offsets
// the host plan gives from every rank's histogram (framework/sort_routing.h).
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "framework/sort_routing.h"
#include "kernels/cpu/lsh.h"
#include "kernels/cpu/routing.h"
#include "tests/gpu/conformance.h"

using namespace reformer;
using namespace reformer::conformance;

namespace {

std::string sz(int64_t n) { return std::to_string(n); }

std::vector<int32_t> random_ids(int64_t n, int range, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = int32_t(rng() % uint32_t(range));
  return v;
}

void add_histogram(std::vector<Case>& cases) {
  struct H {
    int64_t L;
    int rounds, nb, distinct;  // ids drawn from the first `distinct` buckets
  };
  for (const H h : {H{1000, 3, 64, 64}, H{int64_t(1) << 18, 2, 4096, 4096},
                    H{int64_t(1) << 18, 1, 4096, 2}, H{97, 1, 1, 1}}) {
    Case c = make_case("bucket_histogram L" + sz(h.L) + " r" + sz(h.rounds) + " nb" + sz(h.nb) +
                           " distinct" + sz(h.distinct),
                       OpId::bucket_histogram,
                       {ints("buckets", random_ids(h.L * h.rounds, h.distinct, 3)),
                        int_output("hist", int64_t(h.rounds) * h.nb)},
                       [=](auto& ops, auto& t) {
                         ops.bucket_histogram(t.i("hist"), t.i("buckets"), h.L, h.rounds, h.nb);
                       });
    c.bitwise = true;
    cases.push_back(c);
  }
}

void add_route(std::vector<Case>& cases) {
  struct R {
    int sp, me;
    int64_t L, left, right;
    bool wrap;
    int nb, distinct;  // nb 1: a local layer (no order, no bucket ids)
  };
  for (const R r : {R{2, 0, 4096, 128, 0, true, 128, 128}, R{2, 1, 4096, 128, 0, true, 128, 128},
                    R{4, 2, 1000, 64, 64, false, 32, 32}, R{4, 0, 1 << 17, 64, 0, true, 4096, 3},
                    R{3, 2, 960, 64, 64, false, 1, 1}, R{8, 5, 1 << 14, 128, 64, true, 1024, 1024}}) {
    const int64_t L = r.L, N = L * r.sp;
    const auto all = random_ids(N, r.distinct, 11);
    std::vector<int32_t> hist(static_cast<size_t>(int64_t(r.sp) * r.nb));
    for (int k = 0; k < r.sp; ++k)
      cpu::bucket_histogram(hist.data() + int64_t(k) * r.nb, all.data() + k * L, L, 1, r.nb);
    SortRouteParams p;
    p.L = L;
    p.sp = r.sp;
    p.me = r.me;
    p.left_rows = r.left;
    p.right_rows = r.right;
    p.wrap = r.wrap;
    p.capacity = L + r.sp * (r.left + r.right);
    const SortRound plan = plan_sort_round(hist.data(), r.nb, r.nb, p);
    const std::vector<int32_t> mine(all.begin() + r.me * L, all.begin() + (r.me + 1) * L);
    std::vector<int32_t> order(static_cast<size_t>(L));
    const bool lsh = r.nb > 1;
    if (lsh) cpu::lsh_sort(order.data(), mine.data(), L, 1, r.nb);
    Case c = make_case(
        "sort_route sp" + sz(r.sp) + " me" + sz(r.me) + " L" + sz(L) + " halo" + sz(r.left) + "_" +
            sz(r.right) + (r.wrap ? " wrap" : "") + " nb" + sz(r.nb) + " distinct" + sz(r.distinct),
        OpId::sort_route,
        {ints("order", order), ints("buckets", mine), ints("delta", plan.delta),
         int_output("send", 3 * p.capacity), int_output("back", 2 * L)},
        [=](auto& ops, auto& t) {
          ops.sort_route(t.i("send"), t.i("back"), lsh ? t.i("order") : nullptr,
                         lsh ? t.i("buckets") : nullptr, t.i("delta"), p);
        });
    c.bitwise = true;
    cases.push_back(c);
  }
}

void add_invert(std::vector<Case>& cases) {
  for (const int64_t n : {int64_t(1), int64_t(1000), int64_t(1) << 20}) {
    std::vector<int32_t> src(static_cast<size_t>(n));
    std::iota(src.begin(), src.end(), 0);
    std::shuffle(src.begin(), src.end(), std::mt19937(uint32_t(n)));
    Case c = make_case("invert_index n" + sz(n), OpId::invert_index,
                       {ints("src", src), int_output("dst", n)},
                       [=](auto& ops, auto& t) { ops.invert_index(t.i("dst"), t.i("src"), n); });
    c.bitwise = true;
    cases.push_back(c);
  }
}

std::vector<Case> routing_cases() {
  std::vector<Case> cases;
  add_histogram(cases);
  add_route(cases);
  add_invert(cases);
  return cases;
}

}  // namespace

REFORMER_CONFORMANCE_SUITE(RoutingOps, routing_cases());
