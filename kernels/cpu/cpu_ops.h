// Ops<T> on the host: every op of kernels/op_list.h's compute list forwards
// to the plain C++ reference op of the same name in kernels/cpu/, and every
// op has completed when it returns (stream() is nullptr). Instantiated for
// float (training on CPU) and double (finite-difference checks).
#pragma once

#include "kernels/ops.h"

namespace reformer {

template <class T>
class CpuOps final : public Ops<T> {
 public:
  const char* name() const override { return "cpu"; }
  REFORMER_OPS(REFORMER_DECLARE_OP_OVERRIDE)
};

extern template class CpuOps<float>;
extern template class CpuOps<double>;

}  // namespace reformer
