// Token embedding plus axial position embedding (CPU reference).
// Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

namespace reformer::cpu {

template <class T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* pos1, const T* pos2,
                       int64_t L, int D, int d1, int a2, int64_t pos_offset);
template <class T>
void embedding_backward(T* dwte, T* dpos1, T* dpos2, const T* dout, const int32_t* tokens,
                        int64_t L, int D, int d1, int a2, int64_t pos_offset);

}  // namespace reformer::cpu
