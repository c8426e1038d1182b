// Argument checks shared by the CPU and CUDA sequence-parallel routing ops
// (bucket_histogram, sort_route, invert_index; kernels/ops.h).
#pragma once

#include <cstdint>
#include <climits>
#include <string>

#include "kernels/common/params.h"
#include "kernels/errors.h"

namespace reformer {

inline void check_bucket_histogram(int64_t L, int n_hashes, int n_buckets) {
  if (L < 0 || n_hashes < 0 || n_buckets < 1)
    throw ShapeError("bucket_histogram: need L >= 0, n_hashes >= 0 and n_buckets >= 1, got " +
                     std::to_string(L) + ", " + std::to_string(n_hashes) + ", " +
                     std::to_string(n_buckets));
}

// Two or more ranks, each position in at most one halo (left_rows +
// right_rows <= L), global slots and entries within int32.
inline void check_sort_route(const SortRouteParams& p) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.sp < 2 || p.me < 0 || p.me >= p.sp)
    throw ShapeError("sort_route: rank " + s(p.me) + " of " + s(p.sp) + " (need sp >= 2)");
  if (p.L < 1 || p.left_rows < 0 || p.right_rows < 0 || p.left_rows + p.right_rows > p.L)
    throw ShapeError("sort_route: halos of " + s(p.left_rows) + " and " + s(p.right_rows) +
                     " rows need at least as many positions per rank, got " + s(p.L));
  if (p.L * p.sp > INT32_MAX || p.capacity < 0 || p.capacity > INT32_MAX)
    throw ShapeError("sort_route: " + s(p.sp) + " ranks of " + s(p.L) + " positions and " +
                     s(p.capacity) + " entries must fit int32");
}

inline void check_invert_index(int64_t n) {
  if (n < 0 || n > INT32_MAX)
    throw ShapeError("invert_index: n = " + std::to_string(n) + " outside [0, 2^31)");
}

}  // namespace reformer
