// Chunked attention over permuted positions (LSH and local attention) and
// exact full attention, with shared-QK scoring (CPU reference).
// Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

#include "kernels/common/params.h"

namespace reformer::cpu {

template <class T>
void chunked_attention_forward(T* out, T* out_r, T* lse, const T* qk, const T* v,
                               const int32_t* perm, const AttentionParams& p);
template <class T>
void chunked_attention_backward(T* dqk, T* dv, const T* dout, const T* qk, const T* v,
                                const int32_t* perm, const T* out, int64_t ld_out, const T* lse,
                                const AttentionParams& p);
template <class T>
void combine_rounds(T* out, T* w, const T* out_r, const T* lse, int n_rounds, int64_t L,
                    int dh, int64_t ld);
template <class T>
void fold_round(T* out, const T* out_r, const T* lse, int r, int64_t L, int dh, int64_t ld);
template <class T>
void full_attention_forward(T* out, T* lse, const T* qk, const T* v, const AttentionParams& p);
template <class T>
void full_attention_backward(T* dqk, T* dv, const T* dout, const T* out, const T* qk, const T* v,
                             const T* lse, const AttentionParams& p);

}  // namespace reformer::cpu
