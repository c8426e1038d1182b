#include "kernels/cpu/cpu_ops.h"

#include <cstring>

#include "kernels/cpu/activation.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/decode_attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/ffn.h"
#include "kernels/cpu/layernorm.h"
#include "kernels/cpu/layernorm_project.h"
#include "kernels/cpu/lse_combine.h"
#include "kernels/cpu/lsh.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/optimizer.h"
#include "kernels/cpu/routing.h"

namespace reformer {

template <class T> T* CpuOps<T>::alloc(int64_t n) { return new T[size_t(n)]; }
template <class T> void CpuOps<T>::release(T* p) { delete[] p; }
template <class T> int32_t* CpuOps<T>::alloc_i32(int64_t n) { return new int32_t[size_t(n)]; }
template <class T> void CpuOps<T>::release_i32(int32_t* p) { delete[] p; }
template <class T> void CpuOps<T>::to_host(T* host, const T* src, int64_t n) {
  if (n > 0) std::memcpy(host, src, sizeof(T) * size_t(n));
}
template <class T> void CpuOps<T>::from_host(T* dst, const T* host, int64_t n) {
  if (n > 0) std::memcpy(dst, host, sizeof(T) * size_t(n));
}
template <class T> void CpuOps<T>::to_host_i32(int32_t* host, const int32_t* src, int64_t n) {
  if (n > 0) std::memcpy(host, src, sizeof(int32_t) * size_t(n));
}
template <class T> void CpuOps<T>::from_host_i32(int32_t* dst, const int32_t* host, int64_t n) {
  if (n > 0) std::memcpy(dst, host, sizeof(int32_t) * size_t(n));
}

template <class T> void CpuOps<T>::synchronize() {}

#define REFORMER_CPU_FORWARD(ret, name, params, args) \
  template <class T> ret CpuOps<T>::name params { return cpu::name args; }
REFORMER_COMPUTE_OPS(REFORMER_CPU_FORWARD)
#undef REFORMER_CPU_FORWARD

template class CpuOps<float>;
template class CpuOps<double>;

}  // namespace reformer
