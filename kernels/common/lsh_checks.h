// Argument checks and constants shared by the CPU and CUDA LSH ops.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/errors.h"

namespace reformer {

// Throws ShapeError unless n_buckets is even and >= 2.
inline void check_lsh_buckets(int n_buckets) {
  if (n_buckets < 2 || n_buckets % 2 != 0)
    throw ShapeError("lsh: n_buckets must be even and >= 2, got " + std::to_string(n_buckets));
}

// Throws ShapeError unless factor0 == 0, or factor0 is an even factor >= 2 of
// n_buckets whose cofactor n_buckets / factor0 is even too.
inline void check_lsh_factor(int n_buckets, int factor0) {
  check_lsh_buckets(n_buckets);
  if (factor0 == 0) return;
  if (factor0 < 2 || factor0 % 2 != 0 || n_buckets % factor0 != 0 ||
      (n_buckets / factor0) % 2 != 0)
    throw ShapeError("lsh: factor0 = " + std::to_string(factor0) +
                     " must be 0 or an even factor of n_buckets = " + std::to_string(n_buckets) +
                     " with an even cofactor");
}

}  // namespace reformer
