// Argument checks shared by the CPU and CUDA attention ops.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/errors.h"
#include "kernels/common/params.h"

namespace reformer {

// Throws ShapeError unless L >= 0, dh > 0 and ld >= dh.
inline void check_attention_shape(const AttentionParams& p, const char* op) {
  if (p.L < 0 || p.dh <= 0 || p.ld < p.dh)
    throw ShapeError(std::string(op) + ": need L >= 0, dh > 0, ld >= dh (L=" +
                     std::to_string(p.L) + ", dh=" + std::to_string(p.dh) +
                     ", ld=" + std::to_string(p.ld) + ")");
}

// The above, and a chunk geometry that divides the sequence.
inline void check_chunked_attention_shape(const AttentionParams& p, const char* op) {
  check_attention_shape(p, op);
  if (p.n_rounds < 1 || p.chunk <= 0 || p.L % p.chunk != 0 || p.chunks_before < 0 ||
      p.chunks_after < 0)
    throw ShapeError(std::string(op) + ": need n_rounds >= 1, chunk > 0, L % chunk == 0, "
                     "chunks_before >= 0, chunks_after >= 0 (L=" + std::to_string(p.L) +
                     ", chunk=" + std::to_string(p.chunk) +
                     ", n_rounds=" + std::to_string(p.n_rounds) + ")");
}

// chunked_attention_forward's outputs: throws ShapeError unless it has one
// to write (out or out_r, where L > 0), out with p.fold_rounds.
inline void check_chunked_outputs(const void* out, const void* out_r, const AttentionParams& p) {
  if (p.fold_rounds && !out)
    throw ShapeError("chunked_attention_forward: fold_rounds needs out");
  if (p.L > 0 && !out && !out_r)
    throw ShapeError("chunked_attention_forward: needs out or out_r (or both)");
}

// combine_rounds: throws ShapeError unless n_rounds >= 1, dh >= 1, ld >= dh, L >= 0.
inline void check_combine_rounds(int n_rounds, int64_t L, int dh, int64_t ld) {
  if (n_rounds < 1 || dh < 1 || ld < dh || L < 0)
    throw ShapeError("combine_rounds: need n_rounds >= 1, dh >= 1, ld >= dh and L >= 0 (n_rounds=" +
                     std::to_string(n_rounds) + ", L=" + std::to_string(L) +
                     ", dh=" + std::to_string(dh) + ", ld=" + std::to_string(ld) + ")");
}

// fold_round: throws ShapeError unless r >= 0, dh >= 1, ld >= dh, L >= 0.
inline void check_fold_round(int r, int64_t L, int dh, int64_t ld) {
  if (r < 0 || dh < 1 || ld < dh || L < 0)
    throw ShapeError("fold_round: need r >= 0, dh >= 1, ld >= dh and L >= 0 (r=" +
                     std::to_string(r) + ", L=" + std::to_string(L) +
                     ", dh=" + std::to_string(dh) + ", ld=" + std::to_string(ld) + ")");
}

}  // namespace reformer
