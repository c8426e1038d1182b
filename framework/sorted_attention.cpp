#include "framework/sorted_attention.h"

#include <algorithm>
#include <initializer_list>
#include <string>

#include "framework/attention.h"
#include "framework/sort_routing.h"
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
  Buffer<T> lse, w;                    // per slot, the head's rounds' log-sum-exps and weights [L, R]
  int64_t slot_stride = 0;             // elements of one slot of lse, w
  int Hp = 1;                          // slots: the heads of a pass
  Buffer<T> xs;                        // exchange rows: [Nx, dh] twice, then [Nx]
  IntBuffer<T> order;                  // per slot [R, L]: the head's positions sorted per round (LSH)
  IntBuffer<T> delta;                  // per slot [R, nb]: sort_route's slot offsets per round
  IntBuffer<T> route;                  // sort_route's send [3, Nx] and back [2, L]
  IntBuffer<T> slots_recv;             // [Nx] each received row's local slot
  IntBuffer<T> hist;                   // [sp + 1, R, nb]: every rank's histogram, then this rank's
  Buffer<T> lqk, lv, ldout, lout, ldqk, ldv;  // the slots this rank attends [Nl, dh]
  Buffer<T> llse;                      // [Nl]
  IntBuffer<T> lperm;                  // [Nl] slot -> row
  int64_t Nx = 0, Nl = 0;
  bool narrow = false;                 // dh-wide rows travel in the stash's precision
  StreamSpans spans;                   // time in the group's collectives

  // The layer being run, and per slot the head it holds.
  int layer = -1;
  bool wrap = true;
  int rounds = 1, nbk = 1;
  struct Slot {
    int l = -1, h = -1;                // the (layer, head) hashed into it
    const int32_t* buckets = nullptr;  // its bucket ids [rounds, L] (LSH), null for local layers
    std::vector<SortRound> plan;       // per round: deltas and row counts
  };
  std::vector<Slot> slots;
  int cur = 0;                         // the slot being run

  // Layer l's kind: LSH (R rounds, nb buckets, wrapping) or local (one bucket).
  void set_layer(int l) {
    layer = l;
    wrap = lsh_index[size_t(l)] >= 0;
    rounds = wrap ? R : 1;
    nbk = wrap ? nb : 1;
  }
  int32_t* slot_order() { return order.data() + int64_t(cur) * R * L; }
  int32_t* slot_delta() { return delta.data() + int64_t(cur) * (delta.size() / Hp); }
  SortRouteParams route_params() const {
    SortRouteParams p;
    p.L = L;
    p.sp = sp;
    p.me = me;
    p.left_rows = cb_rows;
    p.right_rows = ca_rows;
    p.wrap = wrap;
    p.capacity = Nx;
    return p;
  }
  const int32_t* send_rows() const { return route.data(); }         // [Nx] position per entry
  const int32_t* send_slots() const { return route.data() + Nx; }   // [Nx] slot at the destination
  const int32_t* dout_rows() const { return route.data() + 2 * Nx; }  // [Nx] position, -1 for halo
  const int32_t* back(int h) const { return route.data() + 3 * Nx + h * L; }  // own (0), halo (1)
};

// One (head, round): rows to and from every rank.
template <class T>
struct SortedAttention<T>::Route {
  std::vector<int64_t> send_n, recv_n;
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
  if (!s.buckets.empty()) {
    s.rot = buf("rotations");
    s.order = ibuf("sort order");
  }
  s.parts = buf("sort parts");
  s.dparts = buf("sort dparts");
  s.lse = buf("sort lse");
  s.w = buf("sort weights");
  s.xs = buf("sort send");
  s.delta = ibuf("sort deltas");
  s.route = ibuf("sort routing");
  s.slots_recv = ibuf("sort slots recv");
  s.hist = ibuf("sort histograms");
  s.lqk = buf("sort qk");
  s.lv = buf("sort v");
  s.ldout = buf("sort dout");
  s.lout = buf("sort out");
  s.ldqk = buf("sort dqk");
  s.ldv = buf("sort dv");
  s.llse = buf("sort slot lse");
  s.lperm = ibuf("sort perm");
  s.Hp = attention_heads_per_pass(cfg, s.sp, int(sizeof(T)));
  s.slot_stride = s.lse.size() / s.Hp;
  s.slots.resize(size_t(s.Hp));
  s.Nx = s.slots_recv.size();
  s.Nl = s.lperm.size();
  // As the head exchange's Wire::operand (framework/sequence_parallel.h);
  // even rows keep every packed row on an element of T.
  s.narrow = cfg.attention.precision == AttentionPrecision::bf16 && s.dh % 2 == 0 &&
             ops.stash_elems(s.dh) < s.dh;
}

template <class T>
SortedAttention<T>::~SortedAttention() = default;

template <class T>
void SortedAttention<T>::set_clock(StreamClock* clock) {
  s_->spans.set_clock(clock);
}

template <class T>
double SortedAttention<T>::take_ms() {
  return s_->spans.take_ms();
}

// For head h of layer l, into the current slot: its sorted order per round
// (LSH), every rank's bucket histograms and from them each round's plan.
// LSH hashes (or reuses the saved ids), local layers have one bucket. One
// host wait per head (the gathered histograms).
template <class T>
void SortedAttention<T>::hash_head(int l, int h, const T* qk, int64_t ld, uint64_t step,
                                   bool rehash) {
  State& s = *s_;
  s.set_layer(l);
  typename State::Slot& slot = s.slots[size_t(s.cur)];
  const int li = s.lsh_index[size_t(l)];
  const int64_t per_rank = int64_t(s.rounds) * s.nbk;
  int32_t* mine = s.hist.data() + int64_t(s.sp) * per_rank;
  slot.buckets = nullptr;
  if (li >= 0) {
    int32_t* b = s.buckets[size_t(li)].data() + int64_t(h) * s.R * s.L;
    if (rehash) {
      ops_.lsh_rotations(s.rot.data(), cfg_.training.seed, step, l, h, s.R, s.dh, s.nb, s.f0);
      ops_.lsh_hash(b, qk, ld, s.rot.data(), s.L, s.dh, s.R, s.nb, s.f0, 1);
    }
    ops_.lsh_sort(s.slot_order(), b, s.L, s.R, s.nb);
    ops_.bucket_histogram(mine, b, s.L, s.R, s.nb);
    slot.buckets = b;
  } else {
    const int32_t all = int32_t(s.L);
    ops_.from_host_i32(mine, &all, 1);
  }
  const int64_t t = s.spans.begin();
  comm_.allgather(mine, s.hist.data(), per_rank * int64_t(sizeof(int32_t)));
  std::vector<int32_t> hh(static_cast<size_t>(s.sp * per_rank));
  ops_.to_host_i32(hh.data(), s.hist.data(), s.sp * per_rank);
  s.spans.end(t);
  slot.plan.clear();
  std::vector<int32_t> delta(static_cast<size_t>(per_rank));
  for (int r = 0; r < s.rounds; ++r) {
    slot.plan.push_back(
        plan_sort_round(hh.data() + int64_t(r) * s.nbk, per_rank, s.nbk, s.route_params()));
    std::copy(slot.plan.back().delta.begin(), slot.plan.back().delta.end(),
              delta.begin() + int64_t(r) * s.nbk);
  }
  ops_.from_host_i32(s.slot_delta(), delta.data(), per_rank);
  slot.l = l;
  slot.h = h;
}

// Round r of the current head: the row counts from the plan, and on the
// device each position's destinations (sort_route).
template <class T>
void SortedAttention<T>::route(int r, Route& rt) {
  State& s = *s_;
  const typename State::Slot& slot = s.slots[size_t(s.cur)];
  const SortRound& pr = slot.plan[size_t(r)];
  rt.send_n = pr.send_n;
  rt.recv_n = pr.recv_n;
  rt.n_send = rt.n_local = 0;
  for (int k = 0; k < s.sp; ++k) {
    rt.n_send += rt.send_n[size_t(k)];
    rt.n_local += rt.recv_n[size_t(k)];
  }
  REFORMER_REQUIRE(rt.n_send <= s.Nx, ShapeError, "sort mode: more rows to send than planned");
  const SortRouteParams p = s.route_params();
  REFORMER_REQUIRE(rt.n_local == p.left(s.me) + s.L + p.right(s.me) && rt.n_local <= s.Nl,
                   ShapeError,
                   "sort mode: rank " + std::to_string(s.me) + " receives " +
                       std::to_string(rt.n_local) + " rows for its slots and halo");
  const int32_t* order = slot.buckets ? s.slot_order() + int64_t(r) * s.L : nullptr;
  const int32_t* buckets = slot.buckets ? slot.buckets + int64_t(r) * s.L : nullptr;
  ops_.sort_route(s.route.data(), s.route.data() + 3 * s.Nx, order, buckets,
                  s.slot_delta() + int64_t(r) * s.nbk, p);
}

namespace {

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

// Arrays of rows, each contiguous on both sides, in one exchange: to the
// slots' ranks (out: send_n rows to each rank, recv_n from each) or back
// (the reverse).
template <class T>
void SortedAttention<T>::exchange(const Route& rt, bool out,
                                  std::initializer_list<Communicator::RowArray> arrays) {
  exchange(rt, out, arrays.begin(), int(arrays.size()));
}

template <class T>
void SortedAttention<T>::exchange(const Route& rt, bool out, const Communicator::RowArray* arrays,
                                  int n) {
  const int64_t t = s_->spans.begin();
  comm_.alltoallv_rows(arrays, n, out ? rt.send_n.data() : rt.recv_n.data(),
                       out ? rt.recv_n.data() : rt.send_n.data());
  s_->spans.end(t);
}

// Two arrays of dh-wide rows to the slots' ranks with one that travels
// exact: fill(k, dst) writes array k's rt.n_send rows (row stride dh) into
// dst, and they arrive in recv0, recv1 ([n_local, dh], position order).
// Narrow: each array is filled into the scratch's second half (b), stashed
// into its half of the first (a), received packed into the halves of b
// and unstashed from there.
template <class T>
template <class Fill>
void SortedAttention<T>::send_pair(const Route& rt, Fill fill, T* recv0, T* recv1,
                                   const Communicator::RowArray& exact) {
  State& s = *s_;
  const int dh = s.dh;
  T* a = s.xs.data();
  T* b = a + s.Nx * dh;
  if (!s.narrow) {
    fill(0, a);
    fill(1, b);
    const int64_t row = int64_t(sizeof(T)) * dh;
    exchange(rt, true, {{a, recv0, row}, {b, recv1, row}, exact});
    return;
  }
  const int64_t half = ops_.stash_elems(s.Nx * dh), row = ops_.stash_elems(dh) * int64_t(sizeof(T));
  for (int k = 0; k < 2; ++k) {
    fill(k, b);
    ops_.stash(a + k * half, b, rt.n_send * dh);
  }
  exchange(rt, true, {{a, b, row}, {a + half, b + half, row}, exact});
  ops_.unstash(recv0, b, rt.n_local * dh);
  ops_.unstash(recv1, b + half, rt.n_local * dh);
}

// The reverse: the n (1 or 2) arrays src[k] ([n_local, dh]) back to the
// positions' ranks with `exact` (when non-null); use(k, rows) is handed
// array k's rt.n_send received rows (row stride dh) in turn, array 0's in
// a and array 1's in b (narrow: both in b, one after the other).
template <class T>
template <class Use>
void SortedAttention<T>::return_rows(const Route& rt, const T* const* src, int n, Use use,
                                     const Communicator::RowArray* exact) {
  State& s = *s_;
  const int dh = s.dh;
  T* a = s.xs.data();
  T* b = a + s.Nx * dh;
  std::vector<Communicator::RowArray> arrays;
  if (!s.narrow) {
    const int64_t row = int64_t(sizeof(T)) * dh;
    for (int k = 0; k < n; ++k) arrays.push_back({src[k], k == 0 ? a : b, row});
    if (exact) arrays.push_back(*exact);
    exchange(rt, false, arrays.data(), int(arrays.size()));
    for (int k = 0; k < n; ++k) use(k, k == 0 ? a : b);
    return;
  }
  const int64_t half = ops_.stash_elems(s.Nx * dh), row = ops_.stash_elems(dh) * int64_t(sizeof(T));
  for (int k = 0; k < n; ++k) {
    ops_.stash(b + k * half, src[k], rt.n_local * dh);
    arrays.push_back({b + k * half, a + k * half, row});
  }
  if (exact) arrays.push_back(*exact);
  exchange(rt, false, arrays.data(), int(arrays.size()));
  for (int k = 0; k < n; ++k) {
    ops_.unstash(b, a + k * half, rt.n_send * dh);
    use(k, b);
  }
}

// Sends the round's qk and v rows of the head ([L, dh] each) to their
// slots' ranks; the receiving side gets them in position order in lqk, lv
// and builds the slot -> row order lperm.
template <class T>
void SortedAttention<T>::send_rows(Route& rt, const T* qk, const T* v, int64_t ld) {
  State& s = *s_;
  const int dh = s.dh;
  send_pair(
      rt,
      [&](int k, T* dst) {
        ops_.gather_rows(dst, dh, k == 0 ? qk : v, ld, s.send_rows(), rt.n_send, dh, false);
      },
      s.lqk.data(), s.lv.data(),
      {s.send_slots(), s.slots_recv.data(), int64_t(sizeof(int32_t))});
  ops_.invert_index(s.lperm.data(), s.slots_recv.data(), rt.n_local);
}

template <class T>
void SortedAttention<T>::forward_head(int l, int h, int slot, const T* qk, const T* v,
                                      int64_t ld, T* ao, uint64_t step, bool rehash) {
  State& s = *s_;
  const int dh = s.dh;
  const int64_t L = s.L;
  T* a = s.xs.data();
  T* c = a + 2 * s.Nx * dh;
  T* lse = s.lse.data() + slot * s.slot_stride;
  T* w = s.w.data() + slot * s.slot_stride;
  REFORMER_REQUIRE(slot >= 0 && slot < s.Hp, ShapeError,
                   "sort mode: slot " + std::to_string(slot) + " of " + std::to_string(s.Hp));
  s.cur = slot;
  hash_head(l, h, qk, ld, step, rehash);
  const int R = s.rounds;
  for (int r = 0; r < R; ++r) {
    Route rt;
    route(r, rt);
    send_rows(rt, qk, v, ld);
    const AttentionParams p = slot_params(cfg_, rt.n_local, dh);
    ops_.chunked_attention_forward(s.lout.data(), nullptr, s.llse.data(), s.lqk.data(),
                                   s.lv.data(), s.lperm.data(), p);
    // Outputs and log-sum-exps back to the positions' ranks, in the order they came.
    const int32_t* own = s.back(0);
    const T* out = s.lout.data();
    const Communicator::RowArray lse_rows{s.llse.data(), c, int64_t(sizeof(T))};
    return_rows(
        rt, &out, 1,
        [&](int, const T* rows) {
          ops_.gather_rows(s.parts.data() + int64_t(r) * dh, int64_t(R) * dh, rows, dh, own, L,
                           dh, false);
        },
        &lse_rows);
    ops_.gather_rows(lse + r, R, c, 1, own, L, 1, false);
  }
  ops_.lse_combine_forward(ao, w, s.parts.data(), lse, round_combine(L, R, dh, ld));
}

template <class T>
void SortedAttention<T>::backward_head(int l, int h, int slot, const T* qk, const T* v,
                                       int64_t ld, const T* ao, const T* dao, T* dqk, T* dv) {
  State& s = *s_;
  const int dh = s.dh;
  const int64_t L = s.L;
  T* c = s.xs.data() + 2 * s.Nx * dh;  // the rounds' lse rows (after the pair's scratch)
  const T* lse = s.lse.data() + slot * s.slot_stride;
  const T* w = s.w.data() + slot * s.slot_stride;
  // The sorted order and the plan its forward_head() left in the slot.
  REFORMER_REQUIRE(slot >= 0 && slot < s.Hp && s.slots[size_t(slot)].l == l &&
                       s.slots[size_t(slot)].h == h,
                   ShapeError,
                   "sort mode: backward_head(" + std::to_string(l) + ", " + std::to_string(h) +
                       ") must follow forward_head() of that head into slot " +
                       std::to_string(slot));
  s.cur = slot;
  s.set_layer(l);
  const int R = s.rounds;
  // Each round's share of the head's output gradient: dparts[:, r] = w_r dao.
  ops_.fill(s.dparts.data(), T(0), L * R * dh);
  ops_.lse_combine_backward(s.dparts.data(), dao, w, round_combine(L, R, dh, ld));
  for (int r = 0; r < R; ++r) {
    Route rt;
    route(r, rt);
    send_rows(rt, qk, v, ld);
    // To the same rows: w_r dout (zero for halo copies, which only serve
    // as keys), the combined output (the D term) and the round's lse.
    ops_.gather_rows(c, 1, lse + r, R, s.send_rows(), rt.n_send, 1, false);
    send_pair(
        rt,
        [&](int k, T* dst) {
          if (k == 0)
            ops_.gather_rows(dst, dh, s.dparts.data() + int64_t(r) * dh, int64_t(R) * dh,
                             s.dout_rows(), rt.n_send, dh, false);
          else
            ops_.gather_rows(dst, dh, ao, ld, s.send_rows(), rt.n_send, dh, false);
        },
        s.ldout.data(), s.lout.data(), {c, s.llse.data(), int64_t(sizeof(T))});
    const AttentionParams p = slot_params(cfg_, rt.n_local, dh);
    ops_.fill(s.ldqk.data(), T(0), rt.n_local * dh);
    ops_.fill(s.ldv.data(), T(0), rt.n_local * dh);
    ops_.chunked_attention_backward(s.ldqk.data(), s.ldv.data(), s.ldout.data(), s.lqk.data(),
                                    s.lv.data(), s.lperm.data(), s.lout.data(), dh, s.llse.data(),
                                    p);
    // dqk, dv back in the order the rows came; a position adds its own
    // row's and its halo copy's (every position has an owner entry: round
    // 0's sets dqk and dv).
    const T* grads[2] = {s.ldqk.data(), s.ldv.data()};
    return_rows(
        rt, grads, 2,
        [&](int k, const T* rows) {
          for (int part = 0; part < 2; ++part)
            ops_.gather_rows(k == 0 ? dqk : dv, ld, rows, dh, s.back(part), L, dh,
                             r > 0 || part > 0);
        },
        nullptr);
  }
}

template class SortedAttention<float>;
template class SortedAttention<double>;

}  // namespace reformer
