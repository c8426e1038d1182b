#include "kernels/cpu/routing.h"

#include <string>
#include <vector>

#include "kernels/common/routing_checks.h"

namespace reformer::cpu {

void bucket_histogram(int32_t* hist, const int32_t* buckets, int64_t L, int n_hashes,
                      int n_buckets) {
  check_bucket_histogram(L, n_hashes, n_buckets);
  for (int r = 0; r < n_hashes; ++r) {
    int32_t* h = hist + int64_t(r) * n_buckets;
    for (int b = 0; b < n_buckets; ++b) h[b] = 0;
    for (int64_t i = 0; i < L; ++i) {
      const int32_t b = buckets[int64_t(r) * L + i];
      if (b < 0 || b >= n_buckets)
        throw ShapeError("bucket_histogram: bucket id " + std::to_string(b) + " outside [0, " +
                         std::to_string(n_buckets) + ")");
      ++h[b];
    }
  }
}

void sort_route(int32_t* send, int32_t* back, const int32_t* order, const int32_t* buckets,
                const int32_t* delta, const SortRouteParams& p) {
  check_sort_route(p);
  const int64_t L = p.L, total = L * p.sp, cap = p.capacity;
  // Each position's destinations (rank, local slot there), the owner first.
  std::vector<int32_t> dest(size_t(4 * L), -1);
  for (int64_t j = 0; j < L; ++j) {
    const int64_t i = order ? order[j] : j;
    const int64_t g = int64_t(delta[buckets ? buckets[i] : 0]) + j;
    if (i < 0 || i >= L || g < 0 || g >= total)
      throw ShapeError("sort_route: position " + std::to_string(i) + " takes global slot " +
                       std::to_string(g) + ", outside [0, " + std::to_string(total) + ")");
    const int o = int(g / L);
    const int64_t q = g % L;
    int32_t* d = &dest[size_t(4 * i)];
    d[0] = o;
    d[1] = int32_t(p.left(o) + q);
    if (q < p.right_rows && (p.wrap || o > 0)) {
      const int k = (o + p.sp - 1) % p.sp;
      d[2] = k;
      d[3] = int32_t(p.left(k) + L + q);
    } else if (q >= L - p.left_rows && (p.wrap || o < p.sp - 1)) {
      d[2] = (o + 1) % p.sp;
      d[3] = int32_t(q - (L - p.left_rows));
    }
  }
  // Entries by destination, then position.
  int64_t e = 0;
  for (int k = 0; k < p.sp; ++k)
    for (int64_t i = 0; i < L; ++i)
      for (int h = 0; h < 2; ++h) {
        if (dest[size_t(4 * i + 2 * h)] != k) continue;
        if (e >= cap)
          throw ShapeError("sort_route: more than " + std::to_string(cap) + " entries to send");
        send[e] = int32_t(i);
        send[cap + e] = dest[size_t(4 * i + 2 * h + 1)];
        send[2 * cap + e] = h == 0 ? int32_t(i) : -1;
        back[h * L + i] = int32_t(e);
        ++e;
      }
  for (int64_t i = 0; i < L; ++i)
    if (dest[size_t(4 * i + 2)] < 0) back[L + i] = -1;
}

void invert_index(int32_t* dst, const int32_t* src, int64_t n) {
  check_invert_index(n);
  for (int64_t k = 0; k < n; ++k) dst[k] = -1;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t s = src[k];
    if (s < 0 || s >= n || dst[s] >= 0)
      throw ShapeError("invert_index: entry " + std::to_string(s) + " at " + std::to_string(k) +
                       (s < 0 || s >= n ? " lies outside [0, " + std::to_string(n) + ")"
                                        : " appears twice"));
    dst[s] = int32_t(k);
  }
}

}  // namespace reformer::cpu
