// The sequence-parallel exchange's bf16 wire (framework/sequence_parallel.h,
// Wire): bf16 rounding on the host, and a check of the head exchange that
// runs alike on host buffers (CPU suites) and device buffers (GPU suites).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "distributed/communicator.h"
#include "framework/sequence_parallel.h"
#include "kernels/ops.h"

namespace reformer::test {

// x rounded to the nearest bf16 value (ties to even; finite x), its 16 bits.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// x rounded to the nearest bf16 value, as a float.
inline float bf16_round(float x) { return bf16_float(bf16_bits(x)); }

// A head exchange over `comm` of Ll positions and `cols` columns a rank,
// allowed to narrow its operands, on buffers of `ops`: the values its
// Wire::operand calls deliver that differ from its exact calls' (rounded to
// bf16 where it narrows, `narrows` says whether it should), both ways;
// plus those of the same calls in place (local and heads in one buffer)
// through an exchange that holds no staging and is given some.
// Returns -1 when ex.narrow() differs from `narrows`.
inline int64_t operand_wire_wrong(Ops<float>& ops, Communicator& comm, int64_t Ll, int cols,
                                  bool narrows) {
  HeadExchange<float> ex(ops, comm, Ll, cols, 0, true);
  HeadExchange<float> lean(ops, comm, Ll, cols, 0, true, /*own_staging*/ false);
  if (ex.narrow() != narrows || lean.narrow() != narrows) return -1;
  const int64_t n = Ll * comm.size() * cols;  // both sides hold n values
  std::vector<float> host(static_cast<size_t>(n)), exact(host.size()), got(host.size());
  for (int64_t i = 0; i < n; ++i)
    host[size_t(i)] = std::sin(0.37f * float(i + 1000 * comm.rank())) * 3.0f + 1e-3f;
  reformer::Buffer<float> src(ops, n), e(ops, n), g(ops, n), in_place(ops, n), stage(ops, n);
  ops.from_host(src.data(), host.data(), n);
  int64_t wrong = 0;
  for (int dir = 0; dir < 2; ++dir) {
    ops.copy(in_place.data(), src.data(), n);
    if (dir == 0) {
      ex.to_heads(src.data(), e.data(), Wire::exact);
      ex.to_heads(src.data(), g.data(), Wire::operand);
      lean.to_heads(in_place.data(), in_place.data(), Wire::operand, stage.data());
    } else {
      ex.to_sequence(src.data(), e.data(), Wire::exact);
      ex.to_sequence(src.data(), g.data(), Wire::operand);
      lean.to_sequence(in_place.data(), in_place.data(), Wire::operand, stage.data());
    }
    ops.to_host(exact.data(), e.data(), n);
    for (const float* out : {g.data(), in_place.data()}) {
      ops.to_host(got.data(), out, n);
      for (size_t i = 0; i < got.size(); ++i)
        wrong += got[i] != (narrows ? bf16_round(exact[i]) : exact[i]);
    }
  }
  return wrong;
}

}  // namespace reformer::test
