// Sequence-parallel attention by a distributed bucket sort
// (parallel.sp_mode: sort; docs/sequence-parallel.md, "Sort mode").
//
// Each rank of the group keeps its L = max_len / sp positions. For every
// head and hash round, the sorted order of the whole sequence (by bucket,
// then position) is cut into sp equal ranges of slots, one per rank: every
// rank hashes its own positions, the ranks' bucket histograms are gathered,
// and prefix sums give each position its global slot. One all-to-all-v per
// (head, round) sends each position's qk and v rows to the rank owning its
// slot, and also to the neighbour whose look-back (chunks_before chunks) or
// look-ahead (chunks_after) window reaches it. Rows arrive in position order
// (ranks hold consecutive positions and send in position order), so the
// receiving rank attends over [left halo | own slots | right halo] with the
// ordinary chunked attention op, whose masks compare row indices. Outputs
// and log-sum-exps go back by the inverse exchange, and each head's rounds
// are combined by their log-sum-exps on the sequence side (lse_combine).
// Local layers are the same with one bucket (slots = positions): only the
// halo rows travel. The backward mirrors it: each round's share of the
// output gradient (w_r dout; zero for halo rows) with the combined output
// and the rounds' log-sum-exps travel to the slot owners, the one-round
// chunked backward runs there, and dqk, dv come back and add up at their
// positions (a halo row's key gradient included).
//
// The rows of qk, v, outputs and their gradients travel in bf16 where the
// attention reads them so (AttentionPrecision::bf16 on a device; Wire::operand,
// framework/sequence_parallel.h), through the send scratch; log-sum-exps,
// slots and everything on the CPU travel exact.
//
// Work per rank is L positions of every head and round whatever the bucket
// skew, and sp is not bounded by the head count; the price is R times the
// traffic of the heads mode (every round of every head travels). The
// routing runs on the device (lsh_sort, bucket_histogram, sort_route,
// invert_index); the host computes each round's row counts from the
// gathered histograms (framework/sort_routing.h): one host wait per head.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <vector>

#include "distributed/communicator.h"
#include "framework/config.h"
#include "framework/memory_plan.h"
#include "kernels/ops.h"
#include "kernels/profiling_ops.h"

namespace reformer {

template <class T>
class SortedAttention {
 public:
  // comm: the sequence-parallel group (rank order = position order). The
  // buffers come from `plan` (plan_memory under sp_mode sort).
  SortedAttention(const Config& cfg, Ops<T>& ops, Communicator& comm, const MemoryPlan& plan);
  ~SortedAttention();
  SortedAttention(const SortedAttention&) = delete;
  SortedAttention& operator=(const SortedAttention&) = delete;

  // Head h of layer l for this rank's positions: ao [L, dh] (row stride ld)
  // <- its attention from qk, v [L, dh] (row stride ld; the rank's
  // projections on the head). An LSH layer hashes with the rotations keyed
  // by `step` and saves the bucket ids when `rehash`, else reuses the saved
  // ones. The head's sorted order, routing plan and round weights are kept
  // in `slot` (< the heads of a pass, attention_heads_per_pass) for
  // backward_head. Every rank of the group
  // calls it for the same heads in the same order.
  void forward_head(int l, int h, int slot, const T* qk, const T* v, int64_t ld, T* ao,
                    uint64_t step, bool rehash);
  // dqk, dv [L, dh] (row stride ld) <- (overwritten) the head's gradients for
  // dao [L, dh], after forward_head() of the same head into the same slot on
  // the same qk, v (heads in other slots may come between); ao is its
  // output. Throws ShapeError when the slot holds another head.
  void backward_head(int l, int h, int slot, const T* qk, const T* v, int64_t ld, const T* ao,
                     const T* dao, T* dqk, T* dv);
  // Times the group's collectives (the histograms' gather and download, the
  // rows' all-to-alls) on `clock` (the compute stream's; nullptr: off):
  // take_ms() returns the milliseconds the stream spent in them since the
  // last take.
  void set_clock(StreamClock* clock);
  double take_ms();

 private:
  struct Route;  // where each position's rows go in one (head, round)
  void hash_head(int l, int h, const T* qk, int64_t ld, uint64_t step, bool rehash);
  void route(int r, Route& rt);
  void send_rows(Route& rt, const T* qk, const T* v, int64_t ld);
  void exchange(const Route& rt, bool out, std::initializer_list<Communicator::RowArray> arrays);
  void exchange(const Route& rt, bool out, const Communicator::RowArray* arrays, int n);
  template <class Fill>
  void send_pair(const Route& rt, Fill fill, T* recv0, T* recv1,
                 const Communicator::RowArray& exact);
  template <class Use>
  void return_rows(const Route& rt, const T* const* src, int n, Use use,
                   const Communicator::RowArray* exact);

  const Config& cfg_;
  Ops<T>& ops_;
  Communicator& comm_;
  struct State;
  std::unique_ptr<State> s_;
};

extern template class SortedAttention<float>;
extern template class SortedAttention<double>;

}  // namespace reformer
