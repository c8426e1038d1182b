// AdamW and Adafactor parameter updates (CPU reference). Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

#include "kernels/common/params.h"

namespace reformer::cpu {

template <class T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWParams& p);
template <class T>
void adafactor_update(T* param, const T* grad, T* m, T* vr, T* vc, int64_t rows, int64_t cols,
                      const AdafactorParams& p);

}  // namespace reformer::cpu
