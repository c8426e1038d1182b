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
//
// Pairs: when sp exceeds the heads, sp = n_heads * g with g dividing
// attention.n_hashes, and the unit of work is a (head, hash rounds) pair:
// rank r attends head r / g with rounds k * n_hashes / g .. + n_hashes / g,
// k = r % g (local and full layers: a replica of the head). Its g ranks
// receive the same qk, v; each returns its output and per-round log-sum-exps,
// and the sequence side combines a head's g parts by their log-sum-exps
// (ops lse_combine_*). docs/sequence-parallel.md has the whole scheme.
#pragma once

#include <cstdint>
#include <string>

#include "distributed/communicator.h"
#include "framework/config.h"
#include "kernels/ops.h"
#include "kernels/profiling_ops.h"

namespace reformer {

// Throws ConfigError when a sequence-parallel group of `sp` ranks cannot
// shard this model (positions do not divide; a shard shorter than an
// attention chunk; heads mode: sp neither divides n_heads nor is n_heads * g
// with g dividing n_hashes; sort mode: a shard of partial chunks or fewer
// than chunks_before + chunks_after of them, or a full-attention layer),
// saying what would work. `has_group` is false when
// sp > 1 but no communicator was given.
void check_sequence_shard(const Config& cfg, int sp, bool has_group);

// Ranks per head: 1 when sp divides model.n_heads (each rank attends
// n_heads / sp whole heads), g = sp / n_heads in pairs mode. Assumes a layout
// check_sequence_shard accepts.
int sp_ranks_per_head(const Config& cfg, int sp);

// The sp values whose attention layout works for these heads and hash
// rounds ("1, 2, 4, 8"): the divisors of n_heads and n_heads * g for g > 1
// dividing n_hashes.
std::string valid_sp_values(const Config& cfg);

// What an exchange may round on its way: exact (log-sum-exps, and the
// parts of pairs mode, which combine in fp32), or `operand`: attention
// operands and their gradients, which the backend's attention and products
// read as bf16 (AttentionPrecision::bf16 on a device). Those travel in the
// backend's stash precision (Ops::stash_2d) where it is narrower: half the
// bytes on the wire, and the same bits in the consumer, which rounds them
// the same way (kernels/cuda/attention_mma.cuh, the staging).
enum class Wire { exact, operand };

template <class T>
class HeadExchange {
 public:
  // comm: the sequence-parallel group (its rank order is the position
  // order); local_len = L / sp positions per rank; cols columns per rank:
  // a local row holds sp * cols columns, block r (columns r * cols ..) being
  // the ones rank r attends (its heads of the current attention pass).
  // max_cols: the most columns a call passes (defaults to cols).
  // narrow_operands: Wire::operand calls may travel in the stash precision
  // (false: every call is exact). own_staging false: the exchange holds no
  // staging buffer, and every Wire call names one (below).
  HeadExchange(Ops<T>& ops, Communicator& comm, int64_t local_len, int cols, int max_cols = 0,
               bool narrow_operands = false, bool own_staging = true);
  // heads_out[L, cols] (rows in global position order) <- every rank's
  // local[L/sp, sp * cols] restricted to this rank's column block.
  // staging: L * cols elements the call may overwrite (null: the exchange's
  // own), overlapping neither local nor heads_out. local may be heads_out
  // (both have L * cols elements): the call reads all of it first.
  void to_heads(const T* local, T* heads_out, Wire wire, T* staging = nullptr);
  // local_out[L/sp, sp * cols] <- every rank's heads[L, cols] restricted to
  // this rank's positions (block r of the columns from rank r). staging
  // and in place as to_heads.
  void to_sequence(const T* heads, T* local_out, Wire wire, T* staging = nullptr);
  // The same with `cols` columns per rank in place of the constructor's
  // (at most max_cols), exact; staging (null: the exchange's own) holds
  // L * cols elements.
  void to_heads(const T* local, T* heads_out, int cols, T* staging = nullptr);
  void to_sequence(const T* heads, T* local_out, int cols, T* staging = nullptr);
  // True when Wire::operand calls travel narrower than T.
  bool narrow() const { return narrow_; }
  // Times every all-to-all on `clock` (the compute stream's; nullptr: off):
  // take_ms() returns the milliseconds the stream spent in them since the
  // last take.
  void set_clock(StreamClock* clock) { spans_.set_clock(clock); }
  double take_ms() { return spans_.take_ms(); }

 private:
  Ops<T>& ops_;
  Communicator& comm_;
  int64_t Ll_;     // positions per rank
  int cols_;       // columns per rank
  bool narrow_;    // Wire::operand calls go through the stash
  Buffer<T> buf_;  // [sp, Ll, max_cols] staging for the exchange (narrow: send, then receive)
  StreamSpans spans_;
  void alltoall(const void* send, void* recv, int64_t bytes);
  T* staging(T* given);
  void heads_exact(const T* local, T* heads_out, int cols, T* buf);
  void sequence_exact(const T* heads, T* local_out, int cols, T* buf);
};

extern template class HeadExchange<float>;
extern template class HeadExchange<double>;

}  // namespace reformer
