#include "kernels/profiling_ops.h"

#include <chrono>

#include "kernels/common/op_flops.h"

namespace reformer {

namespace {
// Ops timed between two flushes; a flush waits for the device, so it should
// be rare (a training step issues a few thousand ops).
constexpr size_t kMaxPending = size_t(1) << 16;
}  // namespace

int64_t WallClock::mark() noexcept {
  using namespace std::chrono;
  try {
    t_.push_back(duration<double, std::milli>(steady_clock::now().time_since_epoch()).count());
  } catch (...) {
    return -1;
  }
  return int64_t(t_.size()) - 1;
}

double WallClock::ms_between(int64_t a, int64_t b) { return t_[size_t(b)] - t_[size_t(a)]; }

ProfilingOps::ProfilingOps(Ops<float>& inner, std::unique_ptr<StreamClock> clock)
    : inner_(inner), clock_(std::move(clock)) {
  pending_.reserve(kMaxPending);
  reset();
}

void ProfilingOps::make_room() {
  if (pending_.size() >= kMaxPending) flush();
}

void ProfilingOps::record(OpId id, int64_t begin, int64_t end, double flops) noexcept {
  if (begin >= 0 && end >= 0 && pending_.size() < pending_.capacity())
    pending_.push_back(Pending{id, begin, end, flops});
}

void ProfilingOps::flush() {
  for (const Pending& p : pending_) {
    OpStats& s = totals_[size_t(p.op)];
    ++s.calls;
    s.ms += clock_->ms_between(p.begin, p.end);
    s.flops += p.flops;
  }
  pending_.clear();
  clock_->clear();
}

std::vector<OpStats> ProfilingOps::stats() {
  flush();
  return totals_;
}

void ProfilingOps::reset() {
  pending_.clear();
  clock_->clear();
  totals_.clear();
  for (int i = 0; i < kOpCount; ++i) totals_.push_back(OpStats{OpId(i), 0, 0.0});
}

namespace {
using T = float;

// FLOPs of one call, by op (0 unless specialised).
template <OpId>
struct Flops {
  template <class... A>
  static double of(const A&...) {
    return 0.0;
  }
};
template <>
struct Flops<OpId::matmul_forward> {
  static double of(T*, Operand<T>, const T*, const T*, int64_t N, int C, int OC) {
    return matmul_forward_flops(N, C, OC);
  }
};
template <>
struct Flops<OpId::matmul_accumulate> {
  static double of(T*, Operand<T>, const T*, const T*, int64_t N, int C, int OC, float,
                   const T*) {
    return matmul_forward_flops(N, C, OC);
  }
};
template <>
struct Flops<OpId::matmul_backward> {
  static double of(T* dinp, T* dw, T*, const T*, Operand<T>, const T*, int64_t N, int C, int OC,
                   bool) {
    return matmul_backward_flops(N, C, OC, dinp != nullptr, dw != nullptr);
  }
};
template <>
struct Flops<OpId::layernorm_project_forward> {
  static double of(T*, T*, T*, T*, T*, const T*, const T*, const T*, const T*, const T* w2,
                   int64_t N, int C, int OC, float, bool) {
    return (w2 ? 2.0 : 1.0) * matmul_forward_flops(N, C, OC);
  }
};
template <>
struct Flops<OpId::layernorm_project_backward> {
  static double of(T*, T*, T*, T* dw1, T* dw2, Operand<T>, Operand<T>, T*, T*, T*, T*, const T*,
                   const T*, const T*, const T*, const T* w2, int64_t N, int C, int OC, float) {
    return matmul_backward_flops(N, C, OC, true, dw1 != nullptr) +
           (w2 ? matmul_backward_flops(N, C, OC, true, dw2 != nullptr) : 0.0);
  }
};
template <>
struct Flops<OpId::ffn_forward> {
  static double of(T*, T*, T*, const T*, const T*, const T*, const T*, const T*, int64_t N, int C,
                   int F, Activation, float, bool, const T*) {
    return ffn_forward_flops(N, C, F);
  }
};
template <>
struct Flops<OpId::ffn_backward> {
  static double of(T* dinp, T* dw1, T*, T* dw2, T*, const T*, const T*, T*, T*, const T*,
                   const T*, int64_t N, int C, int F, Activation) {
    return ffn_backward_flops(N, C, F, dinp != nullptr, dw1 != nullptr, dw2 != nullptr);
  }
};
template <>
struct Flops<OpId::layernorm_ffn_forward> {
  static double of(T*, T*, T*, T*, T*, T*, const T*, const T*, const T*, const T*, const T*,
                   const T*, const T*, int64_t N, int C, int F, Activation, float, float, bool,
                   const T*) {
    return ffn_forward_flops(N, C, F);
  }
};
template <>
struct Flops<OpId::layernorm_ffn_backward> {
  static double of(T*, T*, T*, T* dw1, T*, T* dw2, T*, const T*, T*, T*, T*, T*, const T*,
                   const T*, const T*, const T*, const T*, const T*, int64_t N, int C, int F,
                   Activation) {
    return ffn_backward_flops(N, C, F, true, dw1 != nullptr, dw2 != nullptr);
  }
};
template <>
struct Flops<OpId::chunked_attention_forward> {
  static double of(T*, T*, T*, const T*, const T*, const int32_t*, const AttentionParams& p) {
    return attention_forward_flops(chunked_attention_pairs(p), p.dh);
  }
};
template <>
struct Flops<OpId::chunked_attention_backward> {
  static double of(T*, T*, const T*, const T*, const T*, const int32_t*, const T*, int64_t,
                   const T*, const AttentionParams& p) {
    return attention_backward_flops(chunked_attention_pairs(p), p.dh);
  }
};
template <>
struct Flops<OpId::full_attention_forward> {
  static double of(T*, T*, const T*, const T*, const AttentionParams& p) {
    return attention_forward_flops(full_attention_pairs(p), p.dh);
  }
};
template <>
struct Flops<OpId::full_attention_backward> {
  static double of(T*, T*, const T*, const T*, const T*, const T*, const T*,
                   const AttentionParams& p) {
    return attention_backward_flops(full_attention_pairs(p), p.dh);
  }
};
}  // namespace

// Trailing return types: ret is written with T, which names a type only in
// the class's scope.
#define REFORMER_PROFILE_FORWARD(ret, name, params, args)       \
  auto ProfilingOps::name params -> ret {                       \
    make_room();                                                \
    const Span span(*this, OpId::name, Flops<OpId::name>::of args); \
    return inner_.name args;                                    \
  }
REFORMER_OPS(REFORMER_PROFILE_FORWARD)
#undef REFORMER_PROFILE_FORWARD

}  // namespace reformer
