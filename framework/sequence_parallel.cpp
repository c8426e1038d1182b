#include "framework/sequence_parallel.h"

#include <algorithm>
#include <string>

#include "kernels/errors.h"

namespace reformer {

void check_sequence_shard(const Config& cfg, int sp, bool has_group) {
  if (sp == 1) return;
  const auto s = [](int64_t x) { return std::to_string(x); };
  const ModelConfig& m = cfg.model;
  if (!has_group) throw ConfigError("parallel.sp = " + s(sp) + " needs a communicator group");
  if (m.max_len % sp != 0)
    throw ConfigError("parallel.sp = " + s(sp) + " does not divide model.max_len = " +
                      s(m.max_len) + ": each rank holds max_len / sp consecutive positions");
  const auto check_chunk = [&] {
    if (m.max_len / sp < cfg.attention.bucket_size)
      throw ConfigError("parallel.sp = " + s(sp) + " leaves " + s(m.max_len / sp) +
                        " positions per rank, fewer than attention.bucket_size = " +
                        s(cfg.attention.bucket_size) + "; use at most sp = " +
                        s(m.max_len / cfg.attention.bucket_size));
  };
  if (cfg.parallel.sp_mode == SpMode::sort) {
    check_chunk();
    // Whole chunks of slots per rank, and halos from the next rank only.
    const int64_t chunk = cfg.attention.bucket_size, per_rank = m.max_len / sp;
    const int64_t halo = cfg.attention.chunks_before + cfg.attention.chunks_after;
    if (per_rank % chunk != 0 || per_rank / chunk < std::max<int64_t>(1, halo))
      throw ConfigError("parallel.sp_mode: sort needs max_len / sp = " + s(per_rank) +
                        " to be a multiple of attention.bucket_size = " + s(chunk) +
                        " holding at least chunks_before + chunks_after = " + s(halo) +
                        " chunks");
    for (int l = 0; l < m.n_layers; ++l)
      if (cfg.attention_kind(l) == AttentionKind::full)
        throw ConfigError("parallel.sp_mode: sort runs lsh and local layers; layer " + s(l) +
                          " is full attention (use parallel.sp_mode: heads)");
    return;
  }
  const bool pairs = sp % m.n_heads == 0 && cfg.attention.n_hashes % (sp / m.n_heads) == 0;
  if (m.n_heads % sp != 0 && !pairs)
    throw ConfigError("parallel.sp = " + s(sp) + " does not fit model.n_heads = " +
                      s(m.n_heads) + " and attention.n_hashes = " + s(cfg.attention.n_hashes) +
                      ": sequence-parallel attention gives each rank n_heads / sp whole heads, "
                      "or, beyond n_heads, one head's share of its hash rounds (sp = n_heads * g "
                      "with g dividing n_hashes); use sp in {" + valid_sp_values(cfg) +
                      "}, or parallel.sp_mode: sort");
  check_chunk();
}

int sp_ranks_per_head(const Config& cfg, int sp) {
  if (cfg.parallel.sp_mode == SpMode::sort) return 1;
  return sp > cfg.model.n_heads ? sp / cfg.model.n_heads : 1;
}

std::string valid_sp_values(const Config& cfg) {
  const int H = cfg.model.n_heads, nh = cfg.attention.n_hashes;
  std::string out;
  auto add = [&](int v) { out += (out.empty() ? "" : ", ") + std::to_string(v); };
  for (int d = 1; d <= H; ++d)
    if (H % d == 0) add(d);
  for (int g = 2; g <= nh; ++g)
    if (nh % g == 0) add(H * g);
  return out;
}

template <class T>
HeadExchange<T>::HeadExchange(Ops<T>& ops, Communicator& comm, int64_t local_len, int cols,
                              int max_cols, bool narrow_operands, bool own_staging)
    : ops_(ops), comm_(comm), Ll_(local_len), cols_(cols),
      // Narrow only where a block of the stash starts on an element of T,
      // so that send and receive halves fit the exact exchange's buffer.
      narrow_(narrow_operands && local_len * cols % 2 == 0 &&
              ops.stash_elems(local_len * cols) < local_len * cols),
      buf_(ops, own_staging ? int64_t(comm.size()) * local_len * std::max(cols, max_cols) : 0) {}

template <class T>
T* HeadExchange<T>::staging(T* given) {
  if (given) return given;
  REFORMER_REQUIRE(buf_.data() != nullptr, ShapeError,
                   "HeadExchange: a call without staging on an exchange that holds none");
  return buf_.data();
}

template <class T>
void HeadExchange<T>::alltoall(const void* send, void* recv, int64_t bytes) {
  const int64_t t = spans_.begin();
  comm_.alltoall(send, recv, bytes);
  spans_.end(t);
}

template <class T>
void HeadExchange<T>::to_heads(const T* local, T* heads_out, Wire wire, T* buf) {
  buf = staging(buf);
  if (!narrow_ || wire == Wire::exact) {
    heads_exact(local, heads_out, cols_, buf);
    return;
  }
  // Block r of the send half: this rank's positions, rank r's head columns,
  // in the stash's precision; the receive half holds every rank's block for
  // this rank's heads, in position order.
  const int sp = comm_.size(), HD = sp * cols_;
  const int64_t block = Ll_ * cols_, half = ops_.stash_elems(sp * block);
  T* send = buf;
  T* recv = buf + half;
  for (int r = 0; r < sp; ++r)
    ops_.stash_2d(send + ops_.stash_elems(r * block), local + int64_t(r) * cols_, HD, Ll_, cols_);
  alltoall(send, recv, ops_.stash_elems(block) * int64_t(sizeof(T)));
  ops_.unstash(heads_out, recv, sp * block);
}

template <class T>
void HeadExchange<T>::to_sequence(const T* heads, T* local_out, Wire wire, T* buf) {
  buf = staging(buf);
  if (!narrow_ || wire == Wire::exact) {
    sequence_exact(heads, local_out, cols_, buf);
    return;
  }
  const int sp = comm_.size(), HD = sp * cols_;
  const int64_t block = Ll_ * cols_, half = ops_.stash_elems(sp * block);
  T* send = buf;
  T* recv = buf + half;
  ops_.stash(send, heads, sp * block);
  alltoall(send, recv, ops_.stash_elems(block) * int64_t(sizeof(T)));
  for (int s = 0; s < sp; ++s)
    ops_.unstash_2d(local_out + int64_t(s) * cols_, HD, recv + ops_.stash_elems(s * block), Ll_,
                    cols_);
}

template <class T>
void HeadExchange<T>::to_heads(const T* local, T* heads_out, int cols, T* buf) {
  heads_exact(local, heads_out, cols, staging(buf));
}

template <class T>
void HeadExchange<T>::to_sequence(const T* heads, T* local_out, int cols, T* buf) {
  sequence_exact(heads, local_out, cols, staging(buf));
}

template <class T>
void HeadExchange<T>::heads_exact(const T* local, T* heads_out, int cols, T* buf) {
  // Block r of the send buffer: this rank's positions, rank r's head columns.
  const int sp = comm_.size(), HD = sp * cols;
  const int64_t block = Ll_ * cols;
  for (int r = 0; r < sp; ++r)
    ops_.copy_2d(buf + r * block, cols, local + int64_t(r) * cols, HD, Ll_, cols);
  // Block s received holds rank s's positions: [L, cols] in position order.
  alltoall(buf, heads_out, block * int64_t(sizeof(T)));
}

template <class T>
void HeadExchange<T>::sequence_exact(const T* heads, T* local_out, int cols, T* buf) {
  // Block r of `heads` (rank r's positions) goes to rank r; block s received
  // holds rank s's head columns for this rank's positions.
  const int sp = comm_.size(), HD = sp * cols;
  const int64_t block = Ll_ * cols;
  alltoall(heads, buf, block * int64_t(sizeof(T)));
  for (int s = 0; s < sp; ++s)
    ops_.copy_2d(local_out + int64_t(s) * cols, HD, buf + s * block, cols, Ll_, cols);
}

template class HeadExchange<float>;
template class HeadExchange<double>;

}  // namespace reformer
