// An Ops<T> over CpuOps<T> that counts the bytes allocated through it: live
// now and the most at once. Every op forwards unchanged.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>

#include "kernels/cpu/cpu_ops.h"

namespace reformer::test {

template <class T>
class CountingOps final : public Ops<T> {
 public:
  const char* name() const override { return "cpu (counting)"; }
  int64_t peak_bytes() const override { return peak_; }
  int64_t live_bytes() const { return live_; }

  T* alloc(int64_t n) override { return note(inner_.alloc(n), n * int64_t(sizeof(T))); }
  void release(T* p) override { forget(p); inner_.release(p); }
  int32_t* alloc_i32(int64_t n) override { return note(inner_.alloc_i32(n), n * 4); }
  void release_i32(int32_t* p) override { forget(p); inner_.release_i32(p); }
  void to_host(T* host, const T* src, int64_t n) override { inner_.to_host(host, src, n); }
  void from_host(T* dst, const T* host, int64_t n) override { inner_.from_host(dst, host, n); }
  void to_host_i32(int32_t* host, const int32_t* src, int64_t n) override {
    inner_.to_host_i32(host, src, n);
  }
  void from_host_i32(int32_t* dst, const int32_t* host, int64_t n) override {
    inner_.from_host_i32(dst, host, n);
  }
  void synchronize() override {}
#define REFORMER_COUNTING_FORWARD(ret, name, params, args) \
  ret name params override { return inner_.name args; }
  REFORMER_COMPUTE_OPS(REFORMER_COUNTING_FORWARD)
#undef REFORMER_COUNTING_FORWARD

 private:
  template <class P>
  P* note(P* p, int64_t bytes) {
    sizes_[p] = bytes;
    live_ += bytes;
    peak_ = std::max(peak_, live_);
    return p;
  }
  void forget(const void* p) {
    const auto it = sizes_.find(p);
    if (it == sizes_.end()) return;
    live_ -= it->second;
    sizes_.erase(it);
  }
  CpuOps<T> inner_;
  std::map<const void*, int64_t> sizes_;
  int64_t live_ = 0, peak_ = 0;
};

}  // namespace reformer::test
