// Dense linear layer out = inp @ w + bias (CPU reference: cache-blocked,
// multi-threaded with OpenMP; each output element is reduced by one thread in
// a fixed order, so results do not depend on the thread count).
// Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/common/params.h"
#include "kernels/errors.h"

namespace reformer::cpu {

template <class T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C, int OC);
// out += alpha * (inp @ w + bias): matmul_forward into a buffer, then each
// element out + alpha * buffer (add / sub bits for alpha = +-1).
template <class T>
void matmul_accumulate(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C, int OC,
                       float alpha, const T* res = nullptr);
template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N,
                     int C, int OC, bool add_dinp = true);

// The op interface's forms (kernels/ops.h): an Operand input in T; the CPU
// keeps no bf16 operands (Ops::attention_output_bf16 is false here).
template <class T>
const T* plain_operand(Operand<T> inp, int64_t C, const char* op) {
  if (inp.bf16) throw ShapeError(std::string(op) + ": bf16 inputs need a backend that keeps them");
  if (!inp.dense(C))
    throw ShapeError(std::string(op) + ": input rows of stride " + std::to_string(inp.ld) +
                     " are not " + std::to_string(C) + " wide");
  return inp.p;
}
template <class T>
void matmul_forward(T* out, Operand<T> inp, const T* w, const T* bias, int64_t N, int C, int OC) {
  matmul_forward(out, plain_operand(inp, C, "matmul_forward"), w, bias, N, C, OC);
}
template <class T>
void matmul_accumulate(T* out, Operand<T> inp, const T* w, const T* bias, int64_t N, int C, int OC,
                       float alpha, const T* res) {
  matmul_accumulate(out, plain_operand(inp, C, "matmul_accumulate"), w, bias, N, C, OC, alpha, res);
}
template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, Operand<T> inp, const T* w,
                     int64_t N, int C, int OC, bool add_dinp) {
  matmul_backward(dinp, dw, dbias, dout, plain_operand(inp, C, "matmul_backward"), w, N, C, OC,
                  add_dinp);
}

}  // namespace reformer::cpu
