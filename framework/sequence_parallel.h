// Sequence parallelism (DeepSpeed-Ulysses layout for LSH attention).
//
// Each rank of a group of `sp` holds L / sp consecutive positions of every
// [L, H * dh] activation. Attention needs whole sequences, so an all-to-all
// turns the sequence shards into head shards: every rank gets [L, H / sp * dh],
// the heads it owns over all positions, attends, and a second all-to-all turns
// the result back. The model does this in attention passes: a pass exchanges
// the columns of the few heads every rank attends in it ([L / sp, sp * cols]
// for [L, cols] per rank). LSH shares QK, so qk and v are all that travel forward
// (and their gradients back).
#pragma once

#include <cstdint>

#include "distributed/communicator.h"
#include "framework/config.h"
#include "kernels/ops.h"

namespace reformer {

// Throws ConfigError when a sequence-parallel group of `sp` ranks cannot
// shard this model (positions or heads do not divide, a shard shorter than
// an attention chunk), saying what would work. `has_group` is false when
// sp > 1 but no communicator was given.
void check_sequence_shard(const Config& cfg, int sp, bool has_group);

template <class T>
class HeadExchange {
 public:
  // comm: the sequence-parallel group (its rank order is the position
  // order); local_len = L / sp positions per rank; cols columns per rank:
  // a local row holds sp * cols columns, block r (columns r * cols ..) being
  // the ones rank r attends (its heads of the current attention pass).
  HeadExchange(Ops<T>& ops, Communicator& comm, int64_t local_len, int cols);

  // heads_out[L, cols] (rows in global position order) <- every rank's
  // local[L/sp, sp * cols] restricted to this rank's column block.
  void to_heads(const T* local, T* heads_out);
  // local_out[L/sp, sp * cols] <- every rank's heads[L, cols] restricted to
  // this rank's positions (block r of the columns from rank r).
  void to_sequence(const T* heads, T* local_out);

 private:
  Ops<T>& ops_;
  Communicator& comm_;
  int64_t Ll_;     // positions per rank
  int HD_;         // sp * cols: columns of a local row
  int cols_;       // columns per rank
  Buffer<T> buf_;  // [sp, Ll, cols] staging for the exchange
};

extern template class HeadExchange<float>;
extern template class HeadExchange<double>;

}  // namespace reformer
