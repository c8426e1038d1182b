// Softmax cross-entropy over rows of logits, and row argmax (CPU reference).
// Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

namespace reformer::cpu {

template <class T>
void softmax_cross_entropy(T* loss, T* dlogits, const T* logits, const int32_t* targets, int64_t N,
                           int V, T grad_scale);
template <class T>
void argmax_rows(int32_t* out, const T* logits, int64_t N, int V);

}  // namespace reformer::cpu
