// Argument checks shared by the CPU and CUDA lse_combine ops.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/errors.h"
#include "kernels/common/params.h"

namespace reformer {

// Throws ShapeError unless N >= 0, parts >= 1, rounds >= 1, dh > 0,
// ld_parts >= parts * dh, ld_lse >= parts * rounds and ld_out >= dh.
inline void check_lse_combine(const LseCombineParams& p, const char* op) {
  if (p.N < 0 || p.parts < 1 || p.rounds < 1 || p.dh <= 0 ||
      p.ld_parts < int64_t(p.parts) * p.dh || p.ld_lse < int64_t(p.parts) * p.rounds ||
      p.ld_out < p.dh)
    throw ShapeError(std::string(op) + ": need N >= 0, parts >= 1, rounds >= 1, dh > 0, "
                     "ld_parts >= parts * dh, ld_lse >= parts * rounds, ld_out >= dh (N=" +
                     std::to_string(p.N) + ", parts=" + std::to_string(p.parts) + ", rounds=" +
                     std::to_string(p.rounds) + ", dh=" + std::to_string(p.dh) + ", ld_parts=" +
                     std::to_string(p.ld_parts) + ", ld_lse=" + std::to_string(p.ld_lse) +
                     ", ld_out=" + std::to_string(p.ld_out) + ")");
}

}  // namespace reformer
