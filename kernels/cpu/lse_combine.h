// Combining a head's parts by their log-sum-exps (CPU reference). Contract
// as in kernels/ops.h (lse_combine_*) and kernels/common/params.h
// (LseCombineParams).
#pragma once

#include "kernels/common/params.h"

namespace reformer::cpu {

template <class T>
void lse_combine_forward(T* out, T* w, const T* parts, const T* lse, const LseCombineParams& p);
template <class T>
void lse_combine_backward(T* dparts, const T* dout, const T* w, const LseCombineParams& p);

}  // namespace reformer::cpu
