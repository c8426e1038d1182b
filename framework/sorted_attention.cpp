#include "framework/sorted_attention.h"

#include <algorithm>
#include <string>

#include "framework/attention.h"
#include "kernels/errors.h"

namespace reformer {

// Device buffers (sized by the plan, names "sort ...") and host bookkeeping.
template <class T>
struct SortedAttention<T>::State {
  int sp = 1, me = 0, H = 0, dh = 0, R = 1, nb = 2, f0 = 0;
  int64_t L = 0, cb_rows = 0, ca_rows = 0;
  std::vector<int> lsh_index;          // per layer: its bucket buffer, -1 for local layers
  std::vector<IntBuffer<T>> buckets;   // per LSH layer [H, R, L]
  Buffer<T> rot;                       // one head's rotations [R, dh, cols]
  Buffer<T> parts, dparts;             // a head's rounds side by side [L, R dh]
  Buffer<T> lse, w;                    // the head's rounds' log-sum-exps and weights [L, R]
  Buffer<T> xs, xr;                    // exchange rows [Nx, 2 dh + 1]
  IntBuffer<T> slots_send, slots_recv; // [Nx] each row's slot at its destination
  IntBuffer<T> idx;                    // [4, Nx]: rows to send, dout rows, own entry, halo entry
  IntBuffer<T> hist;                   // [sp + 1, R, nb]: every rank's histogram, then this rank's
  IntBuffer<T> counts;                 // [2, sp] rows to and from every rank
  Buffer<T> lqk, lv, ldout, lout, ldqk, ldv;  // the slots this rank attends [Nl, dh]
  Buffer<T> llse;                      // [Nl]
  IntBuffer<T> lperm;                  // [Nl] slot -> row
  int64_t Nx = 0, Nl = 0;

  // The layer being run.
  bool wrap = true;
  int rounds = 1, nbk = 1;
  std::vector<int32_t> hb;             // this head's bucket ids [rounds, L] (host)
  std::vector<int32_t> hh;             // gathered histograms [sp, rounds, nbk] (host)
  int hashed_l = -1, hashed_h = -1;    // the (layer, head) hb and hh belong to

  int64_t left(int k) const { return wrap || k > 0 ? cb_rows : 0; }
  int64_t right(int k) const { return wrap || k < sp - 1 ? ca_rows : 0; }
};

// One (head, round): entries in destination order, within a destination in
// position order.
template <class T>
struct SortedAttention<T>::Route {
  std::vector<int32_t> send_idx;   // position of each entry
  std::vector<int32_t> send_slot;  // its slot in the destination's local order
  std::vector<int32_t> dout_idx;   // the position for the owner's entry, -1 for a halo copy
  std::vector<int32_t> own;        // [L] each position's owner entry
  std::vector<int32_t> halo;       // [L] its halo entry or -1
  std::vector<int64_t> send_n, recv_n;  // rows to and from every rank
  int64_t n_send = 0, n_local = 0;
};

template <class T>
SortedAttention<T>::SortedAttention(const Config& cfg, Ops<T>& ops, Communicator& comm,
                                    const MemoryPlan& plan)
    : cfg_(cfg), ops_(ops), comm_(comm), s_(std::make_unique<State>()) {
  State& s = *s_;
  s.sp = comm.size();
  s.me = comm.rank();
  s.H = cfg.model.n_heads;
  s.dh = cfg.head_dim();
  s.R = cfg.attention.n_hashes;
  s.nb = cfg.buckets();
  s.f0 = cfg.bucket_factor0();
  s.L = cfg.model.max_len / s.sp;
  s.cb_rows = int64_t(cfg.attention.chunks_before) * cfg.attention.bucket_size;
  s.ca_rows = int64_t(cfg.attention.chunks_after) * cfg.attention.bucket_size;
  auto buf = [&](const char* name) { return Buffer<T>(ops, plan.count(name)); };
  auto ibuf = [&](const char* name) { return IntBuffer<T>(ops, plan.count(name)); };
  for (int l = 0; l < cfg.model.n_layers; ++l) {
    const bool lsh = uses_lsh(cfg, l, cfg.model.max_len);
    s.lsh_index.push_back(lsh ? int(s.buckets.size()) : -1);
    if (lsh) s.buckets.push_back(ibuf("sort buckets"));
  }
  if (!s.buckets.empty()) s.rot = buf("rotations");
  s.parts = buf("sort parts");
  s.dparts = buf("sort dparts");
  s.lse = buf("sort lse");
  s.w = buf("sort weights");
  s.xs = buf("sort send");
  s.xr = buf("sort recv");
  s.slots_send = ibuf("sort slots send");
  s.slots_recv = ibuf("sort slots recv");
  s.idx = ibuf("sort routing");
  s.hist = ibuf("sort histograms");
  s.counts = ibuf("sort counts");
  s.lqk = buf("sort qk");
  s.lv = buf("sort v");
  s.ldout = buf("sort dout");
  s.lout = buf("sort out");
  s.ldqk = buf("sort dqk");
  s.ldv = buf("sort dv");
  s.llse = buf("sort slot lse");
  s.lperm = ibuf("sort perm");
  s.Nx = s.slots_send.size();
  s.Nl = s.lperm.size();
}

template <class T>
SortedAttention<T>::~SortedAttention() = default;

// The layer's kind, and for head h its bucket ids (host) and every rank's
// histograms: LSH hashes (or reads the saved ids), local has one bucket.
template <class T>
void SortedAttention<T>::hash_head(int l, int h, const T* qk, uint64_t step, bool rehash) {
  State& s = *s_;
  const int li = s.lsh_index[size_t(l)];
  s.wrap = li >= 0;
  s.rounds = li >= 0 ? s.R : 1;
  s.nbk = li >= 0 ? s.nb : 1;
  s.hb.assign(size_t(s.rounds) * size_t(s.L), 0);
  if (li >= 0) {
    int32_t* b = s.buckets[size_t(li)].data() + int64_t(h) * s.R * s.L;
    if (rehash) {
      ops_.lsh_rotations(s.rot.data(), cfg_.training.seed, step, l, h, s.R, s.dh, s.nb, s.f0);
      ops_.lsh_hash(b, qk, s.dh, s.rot.data(), s.L, s.dh, s.R, s.nb, s.f0);
    }
    ops_.to_host_i32(s.hb.data(), b, s.rounds * s.L);
  }
  const int64_t per_rank = int64_t(s.rounds) * s.nbk;
  std::vector<int32_t> mine(static_cast<size_t>(per_rank), 0);
  for (int r = 0; r < s.rounds; ++r)
    for (int64_t i = 0; i < s.L; ++i) ++mine[size_t(r * s.nbk + s.hb[size_t(r * s.L + i)])];
  int32_t* send = s.hist.data() + int64_t(s.sp) * per_rank;
  ops_.from_host_i32(send, mine.data(), per_rank);
  comm_.allgather(send, s.hist.data(), per_rank * int64_t(sizeof(int32_t)));
  s.hh.resize(size_t(s.sp * per_rank));
  ops_.to_host_i32(s.hh.data(), s.hist.data(), s.sp * per_rank);
  s.hashed_l = l;
  s.hashed_h = h;
}

// Round r of the current head: each position's global slot (bucket, then
// position: the ranks before this one first), its owner (slot / L) and, near
// the ends of the owner's range, the neighbour whose halo holds it.
template <class T>
void SortedAttention<T>::route(int r, Route& rt) {
  State& s = *s_;
  const int sp = s.sp, nbk = s.nbk;
  const int64_t L = s.L;
  std::vector<int64_t> next(static_cast<size_t>(nbk));  // next slot of this rank per bucket
  int64_t acc = 0;
  for (int b = 0; b < nbk; ++b)
    for (int k = 0; k < sp; ++k) {
      if (k == s.me) next[size_t(b)] = acc;
      acc += s.hh[size_t((int64_t(k) * s.rounds + r) * nbk + b)];
    }
  REFORMER_REQUIRE(acc == L * sp, ShapeError,
                   "sort mode: the ranks' bucket histograms sum to " + std::to_string(acc) +
                       " positions, not " + std::to_string(L * sp));
  // Destinations of each position: (rank, slot there); the owner first.
  struct Dest { int rank; int32_t slot; };
  std::vector<Dest> dest(static_cast<size_t>(2 * L));
  std::vector<int> nd(static_cast<size_t>(L));
  rt.send_n.assign(size_t(sp), 0);
  const int32_t* b = s.hb.data() + int64_t(r) * L;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t slot = next[size_t(b[i])]++;
    const int o = int(slot / L);
    const int64_t q = slot % L;
    Dest* d = &dest[size_t(2 * i)];
    int n = 0;
    d[n++] = {o, int32_t(s.left(o) + q)};
    if (q < s.ca_rows && (s.wrap || o > 0)) {  // in the right halo of the left neighbour
      const int k = (o + sp - 1) % sp;
      d[n++] = {k, int32_t(s.left(k) + L + q)};
    } else if (q >= L - s.cb_rows && (s.wrap || o < sp - 1)) {  // the left halo of the right one
      const int k = (o + 1) % sp;
      d[n++] = {k, int32_t(q - (L - s.cb_rows))};
    }
    nd[size_t(i)] = n;
    for (int j = 0; j < n; ++j) ++rt.send_n[size_t(d[j].rank)];
  }
  std::vector<int64_t> at(static_cast<size_t>(sp), 0);
  for (int k = 1; k < sp; ++k) at[size_t(k)] = at[size_t(k - 1)] + rt.send_n[size_t(k - 1)];
  rt.n_send = at[size_t(sp - 1)] + rt.send_n[size_t(sp - 1)];
  REFORMER_REQUIRE(rt.n_send <= s.Nx, ShapeError, "sort mode: more rows to send than planned");
  rt.send_idx.assign(size_t(rt.n_send), 0);
  rt.send_slot.assign(size_t(rt.n_send), 0);
  rt.dout_idx.assign(size_t(rt.n_send), -1);
  rt.own.assign(size_t(L), -1);
  rt.halo.assign(size_t(L), -1);
  for (int64_t i = 0; i < L; ++i)
    for (int j = 0; j < nd[size_t(i)]; ++j) {
      const Dest& d = dest[size_t(2 * i + j)];
      const int64_t e = at[size_t(d.rank)]++;
      rt.send_idx[size_t(e)] = int32_t(i);
      rt.send_slot[size_t(e)] = d.slot;
      if (j == 0) {
        rt.dout_idx[size_t(e)] = int32_t(i);
        rt.own[size_t(i)] = int32_t(e);
      } else {
        rt.halo[size_t(i)] = int32_t(e);
      }
    }
}

namespace {

// Bytes of `rows[k]` rows of `width` elements of `size` bytes per rank and
// their offsets, ranks in order.
void row_bytes(const std::vector<int64_t>& rows, int64_t width, int64_t size,
               std::vector<int64_t>* bytes, std::vector<int64_t>* off) {
  bytes->assign(rows.size(), 0);
  off->assign(rows.size(), 0);
  int64_t a = 0;
  for (size_t k = 0; k < rows.size(); ++k) {
    (*bytes)[k] = rows[k] * width * size;
    (*off)[k] = a;
    a += (*bytes)[k];
  }
}

// A head's R rounds at each of L positions: parts [L, R dh], their
// log-sum-exps [L, R], the combined output with row stride ld.
LseCombineParams round_combine(int64_t L, int R, int dh, int64_t ld) {
  LseCombineParams cp;
  cp.N = L;
  cp.parts = R;
  cp.rounds = 1;
  cp.dh = dh;
  cp.ld_parts = int64_t(R) * dh;
  cp.ld_lse = R;
  cp.ld_out = ld;
  return cp;
}

// One round's chunked attention over n slot rows in position order (the
// halos stand for the wrapped chunks, so no wrap).
AttentionParams slot_params(const Config& cfg, int64_t n, int dh) {
  AttentionShape shape;
  shape.L = n;
  shape.dh = dh;
  shape.ld = dh;
  AttentionParams p = attention_params(cfg, shape);
  p.n_rounds = 1;
  p.wrap = false;
  return p;
}

}  // namespace

// Sends the round's qk and v rows of the head ([L, dh] each) to their slots' ranks; the receiving side gets them in
// position order into lqk, lv and builds the slot -> row order lperm. Fills
// rt.recv_n and rt.n_local.
template <class T>
void SortedAttention<T>::send_rows(Route& rt, const T* qk, const T* v) {
  State& s = *s_;
  const int sp = s.sp, dh = s.dh;
  const int64_t ld = dh, W = 2 * dh;
  int32_t* idx = s.idx.data();
  ops_.from_host_i32(idx, rt.send_idx.data(), rt.n_send);
  ops_.from_host_i32(idx + s.Nx, rt.dout_idx.data(), rt.n_send);
  ops_.from_host_i32(idx + 2 * s.Nx, rt.own.data(), s.L);
  ops_.from_host_i32(idx + 3 * s.Nx, rt.halo.data(), s.L);
  ops_.from_host_i32(s.slots_send.data(), rt.send_slot.data(), rt.n_send);
  // Row counts both ways.
  std::vector<int32_t> n32(static_cast<size_t>(sp));
  for (int k = 0; k < sp; ++k) n32[size_t(k)] = int32_t(rt.send_n[size_t(k)]);
  ops_.from_host_i32(s.counts.data(), n32.data(), sp);
  comm_.alltoall(s.counts.data(), s.counts.data() + sp, int64_t(sizeof(int32_t)));
  ops_.to_host_i32(n32.data(), s.counts.data() + sp, sp);
  rt.recv_n.assign(size_t(sp), 0);
  rt.n_local = 0;
  for (int k = 0; k < sp; ++k) rt.n_local += (rt.recv_n[size_t(k)] = n32[size_t(k)]);
  REFORMER_REQUIRE(rt.n_local == s.left(s.me) + s.L + s.right(s.me) && rt.n_local <= s.Nl,
                   ShapeError,
                   "sort mode: rank " + std::to_string(s.me) + " received " +
                       std::to_string(rt.n_local) + " rows for its slots and halo");
  ops_.gather_rows(s.xs.data(), W, qk, ld, idx, rt.n_send, dh, false);
  ops_.gather_rows(s.xs.data() + dh, W, v, ld, idx, rt.n_send, dh, false);
  std::vector<int64_t> sb, so, rb, ro;
  row_bytes(rt.send_n, W, int64_t(sizeof(T)), &sb, &so);
  row_bytes(rt.recv_n, W, int64_t(sizeof(T)), &rb, &ro);
  comm_.alltoallv(s.xs.data(), sb.data(), so.data(), s.xr.data(), rb.data(), ro.data());
  row_bytes(rt.send_n, 1, int64_t(sizeof(int32_t)), &sb, &so);
  row_bytes(rt.recv_n, 1, int64_t(sizeof(int32_t)), &rb, &ro);
  comm_.alltoallv(s.slots_send.data(), sb.data(), so.data(), s.slots_recv.data(), rb.data(),
                  ro.data());
  std::vector<int32_t> slot(static_cast<size_t>(rt.n_local)), perm(slot.size(), -1);
  ops_.to_host_i32(slot.data(), s.slots_recv.data(), rt.n_local);
  for (int64_t k = 0; k < rt.n_local; ++k) {
    const int32_t q = slot[size_t(k)];
    REFORMER_REQUIRE(q >= 0 && q < rt.n_local && perm[size_t(q)] < 0, ShapeError,
                     "sort mode: slot " + std::to_string(q) + " arrived twice or out of range");
    perm[size_t(q)] = int32_t(k);
  }
  ops_.from_host_i32(s.lperm.data(), perm.data(), rt.n_local);
  ops_.copy_2d(s.lqk.data(), dh, s.xr.data(), W, rt.n_local, dh);
  ops_.copy_2d(s.lv.data(), dh, s.xr.data() + dh, W, rt.n_local, dh);
}

template <class T>
void SortedAttention<T>::forward_head(int l, int h, const T* qk, const T* v, T* ao,
                                      uint64_t step, bool rehash) {
  State& s = *s_;
  const int dh = s.dh;
  const int64_t L = s.L, W = dh + 1;
  hash_head(l, h, qk, step, rehash);
  const int R = s.rounds;
  for (int r = 0; r < R; ++r) {
    Route rt;
    route(r, rt);
    send_rows(rt, qk, v);
    const AttentionParams p = slot_params(cfg_, rt.n_local, dh);
    ops_.chunked_attention_forward(s.ldout.data(), s.lout.data(), s.llse.data(), s.lqk.data(),
                                   s.lv.data(), s.lperm.data(), p);
    // Outputs and log-sum-exps back to the positions' ranks, in the order they came.
    ops_.copy_2d(s.xr.data(), W, s.lout.data(), dh, rt.n_local, dh);
    ops_.copy_2d(s.xr.data() + dh, W, s.llse.data(), 1, rt.n_local, 1);
    std::vector<int64_t> sb, so, rb, ro;
    row_bytes(rt.recv_n, W, int64_t(sizeof(T)), &sb, &so);
    row_bytes(rt.send_n, W, int64_t(sizeof(T)), &rb, &ro);
    comm_.alltoallv(s.xr.data(), sb.data(), so.data(), s.xs.data(), rb.data(), ro.data());
    const int32_t* own = s.idx.data() + 2 * s.Nx;
    ops_.gather_rows(s.parts.data() + int64_t(r) * dh, int64_t(R) * dh, s.xs.data(), W, own, L,
                     dh, false);
    ops_.gather_rows(s.lse.data() + r, R, s.xs.data() + dh, W, own, L, 1, false);
  }
  ops_.lse_combine_forward(ao, s.w.data(), s.parts.data(), s.lse.data(),
                           round_combine(L, R, dh, dh));
}

template <class T>
void SortedAttention<T>::backward_head(int l, int h, const T* qk, const T* v, const T* ao,
                                       const T* dao, T* dqk, T* dv) {
  State& s = *s_;
  const int dh = s.dh;
  const int64_t L = s.L, W = 2 * dh + 1, Wg = 2 * dh;
  ops_.fill(dqk, T(0), L * dh);
  ops_.fill(dv, T(0), L * dh);
  // The bucket ids and histograms of the forward_head() just before.
  REFORMER_REQUIRE(s.hashed_l == l && s.hashed_h == h, ShapeError,
                   "sort mode: backward_head(" + std::to_string(l) + ", " + std::to_string(h) +
                       ") must follow forward_head() of the same head");
  const int R = s.rounds;
  // Each round's share of the head's output gradient: dparts[:, r] = w_r dao.
  ops_.fill(s.dparts.data(), T(0), L * R * dh);
  ops_.lse_combine_backward(s.dparts.data(), dao, s.w.data(), round_combine(L, R, dh, dh));
  for (int r = 0; r < R; ++r) {
    Route rt;
    route(r, rt);
    send_rows(rt, qk, v);
    // To the same rows: w_r dout (zero for halo copies, which only serve
    // as keys), the combined output (the D term) and the round's lse.
    const int32_t* rows = s.idx.data();
    const int32_t* dout_rows = s.idx.data() + s.Nx;
    ops_.gather_rows(s.xs.data(), W, s.dparts.data() + int64_t(r) * dh, int64_t(R) * dh,
                     dout_rows, rt.n_send, dh, false);
    ops_.gather_rows(s.xs.data() + dh, W, ao, dh, rows, rt.n_send, dh, false);
    ops_.gather_rows(s.xs.data() + 2 * dh, W, s.lse.data() + r, R, rows, rt.n_send, 1, false);
    std::vector<int64_t> sb, so, rb, ro;
    row_bytes(rt.send_n, W, int64_t(sizeof(T)), &sb, &so);
    row_bytes(rt.recv_n, W, int64_t(sizeof(T)), &rb, &ro);
    comm_.alltoallv(s.xs.data(), sb.data(), so.data(), s.xr.data(), rb.data(), ro.data());
    ops_.copy_2d(s.ldout.data(), dh, s.xr.data(), W, rt.n_local, dh);
    ops_.copy_2d(s.lout.data(), dh, s.xr.data() + dh, W, rt.n_local, dh);
    ops_.copy_2d(s.llse.data(), 1, s.xr.data() + 2 * dh, W, rt.n_local, 1);
    const AttentionParams p = slot_params(cfg_, rt.n_local, dh);
    ops_.fill(s.ldqk.data(), T(0), rt.n_local * dh);
    ops_.fill(s.ldv.data(), T(0), rt.n_local * dh);
    ops_.chunked_attention_backward(s.ldqk.data(), s.ldv.data(), s.ldout.data(), s.lqk.data(),
                                    s.lv.data(), s.lperm.data(), s.lout.data(), s.llse.data(), p);
    // dqk, dv back in the order the rows came; a position adds its own
    // row's and its halo copy's.
    ops_.copy_2d(s.xr.data(), Wg, s.ldqk.data(), dh, rt.n_local, dh);
    ops_.copy_2d(s.xr.data() + dh, Wg, s.ldv.data(), dh, rt.n_local, dh);
    row_bytes(rt.recv_n, Wg, int64_t(sizeof(T)), &sb, &so);
    row_bytes(rt.send_n, Wg, int64_t(sizeof(T)), &rb, &ro);
    comm_.alltoallv(s.xr.data(), sb.data(), so.data(), s.xs.data(), rb.data(), ro.data());
    for (int part = 2; part <= 3; ++part) {
      const int32_t* e = s.idx.data() + part * s.Nx;
      ops_.gather_rows(dqk, dh, s.xs.data(), Wg, e, L, dh, true);
      ops_.gather_rows(dv, dh, s.xs.data() + dh, Wg, e, L, dh, true);
    }
  }
}

template class SortedAttention<float>;
template class SortedAttention<double>;

}  // namespace reformer
