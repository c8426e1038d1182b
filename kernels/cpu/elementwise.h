// Elementwise and copy ops (CPU reference). Contracts as in kernels/ops.h.
#pragma once

#include <cstdint>

namespace reformer::cpu {

template <class T> void fill(T* x, T value, int64_t n);
template <class T> void copy(T* dst, const T* src, int64_t n);
template <class T> void add(T* out, const T* a, const T* b, int64_t n);
template <class T> void sub(T* out, const T* a, const T* b, int64_t n);
template <class T> void axpy(T* y, T a, const T* x, int64_t n);
template <class T> void scale(T* x, T s, int64_t n);
template <class T> double sum_squares(const T* x, int64_t n);
// The CPU stashes exactly: both are copies (stash_elems(n) = n).
template <class T> void stash(T* dst, const T* src, int64_t n);
template <class T> void unstash(T* dst, const T* src, int64_t n);
template <class T>
void stash_2d(T* dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols);
template <class T>
void unstash_2d(T* dst, int64_t ld_dst, const T* src, int64_t rows, int64_t cols);
template <class T>
void copy_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols);
template <class T>
void gather_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, const int32_t* idx,
                 int64_t rows, int64_t cols, bool accumulate);
template <class T>
void add_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols);
template <class T>
void dropout(T* out, const T* x, int64_t n, float p, uint64_t seed, uint64_t step, int layer,
             int site, int64_t offset, float alpha, bool accumulate, const T* res = nullptr);

}  // namespace reformer::cpu
