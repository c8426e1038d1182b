// Routing of the distributed bucket sort (CPU reference): bucket histograms,
// each position's destinations, and the inverse of a permutation.
// Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

#include "kernels/common/params.h"

namespace reformer::cpu {

void bucket_histogram(int32_t* hist, const int32_t* buckets, int64_t L, int n_hashes,
                      int n_buckets);
void sort_route(int32_t* send, int32_t* back, const int32_t* order, const int32_t* buckets,
                const int32_t* delta, const SortRouteParams& p);
void invert_index(int32_t* dst, const int32_t* src, int64_t n);

}  // namespace reformer::cpu
