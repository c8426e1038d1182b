#include "framework/sequence_parallel.h"

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
  if (m.n_heads % sp != 0)
    throw ConfigError("parallel.sp = " + s(sp) + " does not divide model.n_heads = " +
                      s(m.n_heads) + ": sequence-parallel attention gives each rank n_heads / sp "
                      "heads over the whole sequence; use an sp that divides " + s(m.n_heads));
  if (m.max_len / sp < cfg.attention.bucket_size)
    throw ConfigError("parallel.sp = " + s(sp) + " leaves " + s(m.max_len / sp) +
                      " positions per rank, fewer than attention.bucket_size = " +
                      s(cfg.attention.bucket_size) + "; use at most sp = " +
                      s(m.max_len / cfg.attention.bucket_size));
}

template <class T>
HeadExchange<T>::HeadExchange(Ops<T>& ops, Communicator& comm, int64_t local_len, int cols)
    : ops_(ops), comm_(comm), Ll_(local_len), HD_(comm.size() * cols), cols_(cols),
      buf_(ops, int64_t(comm.size()) * local_len * cols) {}

template <class T>
void HeadExchange<T>::to_heads(const T* local, T* heads_out) {
  // Block r of the send buffer: this rank's positions, rank r's head columns.
  const int sp = comm_.size();
  const int64_t block = Ll_ * cols_;
  for (int r = 0; r < sp; ++r)
    ops_.copy_2d(buf_.data() + r * block, cols_, local + int64_t(r) * cols_, HD_, Ll_, cols_);
  // Block s received holds rank s's positions: [L, cols] in position order.
  comm_.alltoall(buf_.data(), heads_out, block * int64_t(sizeof(T)));
}

template <class T>
void HeadExchange<T>::to_sequence(const T* heads, T* local_out) {
  // Block r of `heads` (rank r's positions) goes to rank r; block s received
  // holds rank s's head columns for this rank's positions.
  const int sp = comm_.size();
  const int64_t block = Ll_ * cols_;
  comm_.alltoall(heads, buf_.data(), block * int64_t(sizeof(T)));
  for (int s = 0; s < sp; ++s)
    ops_.copy_2d(local_out + int64_t(s) * cols_, HD_, buf_.data() + s * block, cols_, Ll_, cols_);
}

template class HeadExchange<float>;
template class HeadExchange<double>;

}  // namespace reformer
