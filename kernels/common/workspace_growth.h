// How much the CUDA op workspace allocates for a request (kernels/cuda/
// workspace.h), shared with the memory plan (framework/memory_plan.cpp) so
// the plan's estimate and the allocation agree.
#pragma once

#include <algorithm>
#include <cstdint>

namespace reformer {

// A quarter more than asked, at most 256 MiB more: room for slightly larger
// later requests without reallocating, without a quarter of a 40 GiB
// attention scratch going unused at millions of tokens.
inline int64_t workspace_capacity(int64_t bytes) {
  return bytes + std::min<int64_t>(bytes / 4, int64_t(256) << 20);
}

}  // namespace reformer
