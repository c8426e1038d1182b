// Host bookkeeping of one hash round of the distributed bucket sort
// (framework/sorted_attention.h), from every rank's bucket histogram alone:
// this rank's slot offsets for sort_route (kernels/ops.h) and the rows it
// sends to and receives from every rank, so no counts travel and the host
// never waits for the device within a round.
//
// Rank k's positions in bucket b take the global slots [G_k(b), G_k(b) +
// c_k(b)) with G_k(b) = (positions of all ranks in buckets < b) + (positions
// of ranks < k in bucket b). These ranges increase with b, so the number of
// rank k's slots below x is a binary search away, and every count of rows
// between two ranks is a difference of two such numbers over the receiving
// rank's own slots and halos.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/common/params.h"

namespace reformer {

struct SortRound {
  std::vector<int32_t> delta;   // [n_buckets] sort_route's delta for this rank
  std::vector<int64_t> send_n;  // [sp] rows this rank sends to every rank
  std::vector<int64_t> recv_n;  // [sp] rows it receives from every rank
};

// hist(k, b) = hist[k * rank_stride + b]: rank k's positions in bucket b
// (b < n_buckets) in this round. Throws ShapeError unless the histograms
// sum to sp * L.
SortRound plan_sort_round(const int32_t* hist, int64_t rank_stride, int n_buckets,
                          const SortRouteParams& p);

}  // namespace reformer
