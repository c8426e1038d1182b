// Attention of one decoding step against a key/value cache (CPU reference).
// Contract as in kernels/ops.h (decode_attention) and
// kernels/common/params.h (DecodeAttentionParams).
#pragma once

#include <cstdint>

#include "kernels/common/params.h"

namespace reformer::cpu {

template <class T>
void decode_attention(T* out, const T* q, const T* k, const T* v, const int32_t* sets,
                      const int32_t* keys, const DecodeAttentionParams& p);

}  // namespace reformer::cpu
