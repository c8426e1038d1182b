// Checks of every communicator call with inputs whose results are exact
// (small integers in fp32 and fp64, byte patterns), each returning the number
// of wrong elements (as nccl-tests' "verifiable" does) so that every rank
// makes the same collectives whatever it finds. Shared by the MPI suite
// (host buffers) and the NCCL suite (device buffers): a Memory says how to
// allocate buffers and move data in and out of them.
//
// Every rank of the communicator must call the same check with the same
// arguments in the same order.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "distributed/communicator.h"

namespace reformer::test {

// Where the buffers of a communicator live. download() returns data only once
// the communicator's results are complete (device: after its compute stream).
struct Memory {
  std::function<void*(size_t bytes)> alloc;
  std::function<void(void*)> release;
  std::function<void(void* dst, const void* src, size_t bytes)> upload;
  std::function<void(void* dst, const void* src, size_t bytes)> download;
};

inline Memory host_memory() {
  return {[](size_t b) { return static_cast<void*>(new char[b > 0 ? b : 1]); },
          [](void* p) { delete[] static_cast<char*>(p); },
          [](void* d, const void* s, size_t b) { if (b) std::memcpy(d, s, b); },
          [](void* d, const void* s, size_t b) { if (b) std::memcpy(d, s, b); }};
}

// A buffer of `n` T in `mem`, filled from / read back into host vectors.
template <class T>
class Buffer {
 public:
  Buffer(const Memory& mem, int64_t n) : mem_(mem), n_(n), p_(static_cast<T*>(mem.alloc(bytes()))) {}
  Buffer(const Memory& mem, const std::vector<T>& v) : Buffer(mem, int64_t(v.size())) {
    mem_.upload(p_, v.data(), bytes());
  }
  ~Buffer() { mem_.release(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() { return p_; }
  std::vector<T> read() const {
    std::vector<T> v(static_cast<size_t>(n_));
    mem_.download(v.data(), p_, bytes());
    return v;
  }

 private:
  size_t bytes() const { return size_t(n_) * sizeof(T); }
  const Memory& mem_;
  int64_t n_;
  T* p_;
};

using Byte = unsigned char;

// Byte i of what rank `from` sends to rank `to` (any pattern that differs by
// sender, receiver and position).
inline Byte pattern(int from, int to, int64_t i) { return Byte((from * 13 + to * 29 + i) % 251); }

// Rank r contributes (r + 1) * v(i) with v(i) = i % 7 + 1, so element i sums
// to v(i) * p * (p + 1) / 2 whatever the reduction order.
template <class T>
std::vector<T> contribution(int rank, int64_t n, int64_t first = 0) {
  std::vector<T> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[size_t(i)] = T((rank + 1) * ((first + i) % 7 + 1));
  return x;
}

template <class T>
int64_t count_wrong_sum(const std::vector<T>& got, int p, int64_t first = 0) {
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i)
    wrong += got[i] != T(((first + int64_t(i)) % 7 + 1) * p * (p + 1) / 2);
  return wrong;
}

template <class T>
int64_t allreduce_wrong(Communicator& c, const Memory& mem, int64_t n) {
  Buffer<T> b(mem, contribution<T>(c.rank(), n));
  c.allreduce_sum(b.get(), n);
  return count_wrong_sum(b.read(), c.size());
}

inline int64_t allreduce_async_wrong(Communicator& c, const Memory& mem, int64_t n) {
  Buffer<float> a(mem, contribution<float>(c.rank(), n)), b(mem, contribution<float>(c.rank(), n));
  std::unique_ptr<Work> wa = c.allreduce_sum_async(a.get(), n);
  std::unique_ptr<Work> wb = c.allreduce_sum_async(b.get(), n);
  wa->wait();
  const int64_t wrong = count_wrong_sum(a.read(), c.size());
  wb.reset();  // destroying an unwaited Work waits
  return wrong + count_wrong_sum(b.read(), c.size());
}

inline int64_t broadcast_wrong(Communicator& c, const Memory& mem, int64_t bytes, int root) {
  std::vector<Byte> v(static_cast<size_t>(bytes), Byte(255 - c.rank()));
  if (c.rank() == root)
    for (int64_t i = 0; i < bytes; ++i) v[size_t(i)] = pattern(root, 0, i);
  Buffer<Byte> b(mem, v);
  c.broadcast(b.get(), bytes, root);
  int64_t wrong = 0;
  const std::vector<Byte> got = b.read();
  for (int64_t i = 0; i < bytes; ++i) wrong += got[size_t(i)] != pattern(root, 0, i);
  return wrong;
}

inline int64_t allgather_wrong(Communicator& c, const Memory& mem, int64_t bytes) {
  const int p = c.size();
  std::vector<Byte> v(static_cast<size_t>(bytes));
  for (int64_t i = 0; i < bytes; ++i) v[size_t(i)] = pattern(c.rank(), 0, i);
  Buffer<Byte> s(mem, v), r(mem, std::vector<Byte>(size_t(bytes * p), 0));
  c.allgather(s.get(), r.get(), bytes);
  const std::vector<Byte> got = r.read();
  int64_t wrong = 0;
  for (int from = 0; from < p; ++from)
    for (int64_t i = 0; i < bytes; ++i) wrong += got[size_t(from * bytes + i)] != pattern(from, 0, i);
  return wrong;
}

// Block b of rank r's input is contribution(r) at positions b * n ..; rank q
// receives the sums of block q.
inline int64_t reduce_scatter_wrong(Communicator& c, const Memory& mem, int64_t n) {
  const int p = c.size();
  Buffer<float> s(mem, contribution<float>(c.rank(), n * p));
  Buffer<float> r(mem, std::vector<float>(size_t(n), -1.f));
  c.reduce_scatter_sum(s.get(), r.get(), n);
  return count_wrong_sum(r.read(), p, int64_t(c.rank()) * n);
}

inline int64_t alltoall_wrong(Communicator& c, const Memory& mem, int64_t bytes) {
  const int p = c.size(), me = c.rank();
  std::vector<Byte> v(static_cast<size_t>(bytes * p));
  for (int to = 0; to < p; ++to)
    for (int64_t i = 0; i < bytes; ++i) v[size_t(to * bytes + i)] = pattern(me, to, i);
  Buffer<Byte> s(mem, v), r(mem, std::vector<Byte>(size_t(bytes * p), 0));
  c.alltoall(s.get(), r.get(), bytes);
  const std::vector<Byte> got = r.read();
  int64_t wrong = 0;
  for (int from = 0; from < p; ++from)
    for (int64_t i = 0; i < bytes; ++i) wrong += got[size_t(from * bytes + i)] != pattern(from, me, i);
  return wrong;
}

// Rank s sends count(s, d) bytes to rank d: multiples of `unit`, zero for
// about a quarter of the pairs; blocks are packed with a 3-byte gap so that
// offsets matter. Bytes outside the blocks must stay untouched.
inline int64_t alltoallv_wrong(Communicator& c, const Memory& mem, int64_t unit) {
  const int p = c.size(), me = c.rank();
  auto count = [unit](int s, int d) { return int64_t((s * 3 + d * 5 + 1) % 4) * unit; };
  constexpr int64_t kGap = 3;
  constexpr Byte kUntouched = 0xEE;
  std::vector<int64_t> sc(static_cast<size_t>(p)), so(static_cast<size_t>(p)), rc(static_cast<size_t>(p)), ro(static_cast<size_t>(p));
  int64_t send_total = 0, recv_total = 0;
  for (int r = 0; r < p; ++r) {
    sc[size_t(r)] = count(me, r);
    so[size_t(r)] = send_total;
    send_total += sc[size_t(r)] + kGap;
    rc[size_t(r)] = count(r, me);
    ro[size_t(r)] = recv_total;
    recv_total += rc[size_t(r)] + kGap;
  }
  std::vector<Byte> v(static_cast<size_t>(send_total), 0);
  for (int to = 0; to < p; ++to)
    for (int64_t i = 0; i < sc[size_t(to)]; ++i) v[size_t(so[size_t(to)] + i)] = pattern(me, to, i);
  Buffer<Byte> s(mem, v), r(mem, std::vector<Byte>(size_t(recv_total), kUntouched));
  c.alltoallv(s.get(), sc.data(), so.data(), r.get(), rc.data(), ro.data());
  const std::vector<Byte> got = r.read();
  int64_t wrong = 0;
  for (int from = 0; from < p; ++from) {
    for (int64_t i = 0; i < rc[size_t(from)]; ++i)
      wrong += got[size_t(ro[size_t(from)] + i)] != pattern(from, me, i);
    for (int64_t i = 0; i < kGap; ++i)
      wrong += got[size_t(ro[size_t(from)] + rc[size_t(from)] + i)] != kUntouched;
  }
  return wrong;
}

// alltoallv_rows of two arrays (3- and 8-byte rows): rank s sends count(s,
// d) rows to rank d, about a quarter of the pairs none, scaled by `rows`.
// Bytes past the received rows must stay untouched.
inline int64_t alltoallv_rows_wrong(Communicator& c, const Memory& mem, int64_t rows) {
  const int p = c.size(), me = c.rank();
  auto count = [rows](int s, int d) { return int64_t((s * 3 + d * 5 + 1) % 4) * rows; };
  constexpr Byte kUntouched = 0xEE;
  const int64_t widths[2] = {3, 8};
  std::vector<int64_t> sr(static_cast<size_t>(p)), rr(static_cast<size_t>(p));
  int64_t ns = 0, nr = 0;
  for (int r = 0; r < p; ++r) {
    ns += sr[size_t(r)] = count(me, r);
    nr += rr[size_t(r)] = count(r, me);
  }
  std::vector<std::unique_ptr<Buffer<Byte>>> sends, recvs;
  std::vector<Communicator::RowArray> arrays;
  for (int a = 0; a < 2; ++a) {
    const int64_t w = widths[a];
    std::vector<Byte> v(static_cast<size_t>(ns * w));
    int64_t at = 0;
    for (int to = 0; to < p; ++to)
      for (int64_t i = 0; i < sr[size_t(to)] * w; ++i) v[size_t(at++)] = pattern(me, to, i + a);
    sends.push_back(std::make_unique<Buffer<Byte>>(mem, v));
    recvs.push_back(std::make_unique<Buffer<Byte>>(
        mem, std::vector<Byte>(size_t(nr * w + 5), kUntouched)));
    arrays.push_back({sends.back()->get(), recvs.back()->get(), w});
  }
  c.alltoallv_rows(arrays.data(), 2, sr.data(), rr.data());
  int64_t wrong = 0;
  for (int a = 0; a < 2; ++a) {
    const int64_t w = widths[a];
    const std::vector<Byte> got = recvs[size_t(a)]->read();
    int64_t at = 0;
    for (int from = 0; from < p; ++from)
      for (int64_t i = 0; i < rr[size_t(from)] * w; ++i)
        wrong += got[size_t(at++)] != pattern(from, me, i + a);
    for (int64_t i = 0; i < 5; ++i) wrong += got[size_t(at + i)] != kUntouched;
  }
  return wrong;
}

// Each rank sends to its right neighbour and receives from its left one
// (even ranks send first, odd ranks receive first, so blocking sends meet).
inline int64_t ring_wrong(Communicator& c, const Memory& mem, int64_t bytes) {
  const int p = c.size(), me = c.rank(), right = (me + 1) % p, left = (me + p - 1) % p;
  std::vector<Byte> v(static_cast<size_t>(bytes));
  for (int64_t i = 0; i < bytes; ++i) v[size_t(i)] = pattern(me, right, i);
  Buffer<Byte> s(mem, v), r(mem, std::vector<Byte>(size_t(bytes), 0));
  if (me % 2 == 0) {
    c.send(s.get(), bytes, right);
    c.recv(r.get(), bytes, left);
  } else {
    c.recv(r.get(), bytes, left);
    c.send(s.get(), bytes, right);
  }
  const std::vector<Byte> got = r.read();
  int64_t wrong = 0;
  for (int64_t i = 0; i < bytes; ++i) wrong += got[size_t(i)] != pattern(left, me, i);
  return wrong;
}

// Splits into even and odd world ranks, ordered by descending rank; checks
// sizes, ranks and a sum inside each group. Returns the number of mismatches.
inline int64_t split_wrong(Communicator& c, const Memory& mem) {
  const int p = c.size(), me = c.rank();
  std::unique_ptr<Communicator> g = c.split(/*color*/ me % 2, /*key*/ -me);
  int64_t wrong = 0;
  int expect_size = 0, expect_rank = 0, expect_sum = 0;
  for (int r = me % 2; r < p; r += 2) {
    ++expect_size;
    expect_rank += r > me;
    expect_sum += r + 1;
  }
  wrong += g->size() != expect_size;
  wrong += g->rank() != expect_rank;
  Buffer<float> b(mem, std::vector<float>(5, float(me + 1)));
  g->allreduce_sum(b.get(), 5);
  for (float x : b.read()) wrong += x != float(expect_sum);
  return wrong;
}

}  // namespace reformer::test
