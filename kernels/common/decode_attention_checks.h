// Argument checks shared by the CPU and CUDA decode_attention ops.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/errors.h"
#include "kernels/common/params.h"

namespace reformer {

// Throws ShapeError unless heads >= 0, rounds >= 1, dh > 0, ld >= heads * dh
// and q_pos >= 0.
inline void check_decode_attention(const DecodeAttentionParams& p) {
  if (p.heads < 0 || p.rounds < 1 || p.dh <= 0 || p.ld < int64_t(p.heads) * p.dh || p.q_pos < 0)
    throw ShapeError("decode_attention: need heads >= 0, rounds >= 1, dh > 0, ld >= heads * dh, "
                     "q_pos >= 0 (heads=" + std::to_string(p.heads) + ", rounds=" +
                     std::to_string(p.rounds) + ", dh=" + std::to_string(p.dh) +
                     ", ld=" + std::to_string(p.ld) + ", q_pos=" + std::to_string(p.q_pos) + ")");
}

}  // namespace reformer
