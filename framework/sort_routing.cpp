#include "framework/sort_routing.h"

#include <algorithm>
#include <string>

#include "kernels/common/routing_checks.h"
#include "kernels/errors.h"

namespace reformer {

SortRound plan_sort_round(const int32_t* hist, int64_t rank_stride, int n_buckets,
                          const SortRouteParams& p) {
  check_sort_route(p);
  const int sp = p.sp, nb = n_buckets;
  const int64_t L = p.L;
  auto c = [&](int k, int b) { return int64_t(hist[k * rank_stride + b]); };
  // G[k][b]: rank k's first slot in bucket b; P[k][b]: its positions in buckets < b.
  std::vector<int64_t> G(size_t(sp) * nb), P(size_t(sp) * (nb + 1), 0);
  int64_t acc = 0;
  for (int b = 0; b < nb; ++b)
    for (int k = 0; k < sp; ++k) {
      G[size_t(k) * nb + b] = acc;
      acc += c(k, b);
      P[size_t(k) * (nb + 1) + b + 1] = P[size_t(k) * (nb + 1) + b] + c(k, b);
    }
  if (acc != L * sp)
    throw ShapeError("sort mode: the ranks' bucket histograms sum to " + std::to_string(acc) +
                     " positions, not " + std::to_string(L * sp));
  SortRound out;
  out.delta.resize(size_t(nb));
  for (int b = 0; b < nb; ++b)
    out.delta[size_t(b)] =
        int32_t(G[size_t(p.me) * nb + b] - P[size_t(p.me) * (nb + 1) + b]);
  // Rank k's slots below x.
  auto below = [&](int k, int64_t x) -> int64_t {
    const int64_t* g = &G[size_t(k) * nb];
    const int64_t b = std::upper_bound(g, g + nb, x) - g - 1;
    if (b < 0) return 0;
    return P[size_t(k) * (nb + 1) + b] + std::clamp<int64_t>(x - g[b], 0, c(k, int(b)));
  };
  auto in = [&](int k, int64_t a, int64_t e) { return a < e ? below(k, e) - below(k, a) : 0; };
  // Rows of rank j's positions that rank k holds: its own slots, its right
  // halo (the first right_rows slots of k + 1, sent by sort_route's first
  // neighbour rule) and its left halo (the last left_rows of k - 1 that the
  // first rule did not take).
  auto rows = [&](int j, int k) {
    int64_t n = in(j, k * L, k * L + L);
    if (p.right(k) > 0) {
      const int o = (k + 1) % sp;
      n += in(j, o * L, o * L + std::min(p.right_rows, L));
    }
    if (p.left(k) > 0) {
      const int o = (k + sp - 1) % sp;
      const int64_t first = (p.wrap || o > 0) ? p.right_rows : 0;
      n += in(j, o * L + std::max(L - p.left_rows, first), o * L + L);
    }
    return n;
  };
  out.send_n.resize(size_t(sp));
  out.recv_n.resize(size_t(sp));
  for (int k = 0; k < sp; ++k) {
    out.send_n[size_t(k)] = rows(p.me, k);
    out.recv_n[size_t(k)] = rows(k, p.me);
  }
  return out;
}

}  // namespace reformer
