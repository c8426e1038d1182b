// Elementwise and copy ops (CPU reference). Contracts as in kernels/ops.h.
//
// Every result element depends only on its own inputs, so splitting the work
// over OpenMP threads never changes a bit; sum_squares reduces fixed-size
// blocks and adds the block sums in order for the same reason.
#include "kernels/cpu/elementwise.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/common/philox.h"

namespace reformer::cpu {

namespace {
// Below this many elements a loop runs on the calling thread only.
constexpr int64_t kParallelMin = 1 << 15;
// Elements per partial sum in sum_squares; fixes the summation order.
constexpr int64_t kSumBlock = 1 << 14;
}  // namespace

template <class T>
void fill(T* x, T value, int64_t n) {
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

template <class T>
void copy(T* dst, const T* src, int64_t n) {
  if (n <= 0 || dst == src) return;
  std::memmove(dst, src, sizeof(T) * size_t(n));
}

template <class T>
void stash(T* dst, const T* src, int64_t n) {
  copy(dst, src, n);
}

template <class T>
void unstash(T* dst, const T* src, int64_t n) {
  copy(dst, src, n);
}

template <class T>
void add(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template <class T>
void sub(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] - b[i];
}

template <class T>
void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <class T>
void scale(T* x, T s, int64_t n) {
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

template <class T>
double sum_squares(const T* x, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(size_t(blocks), 0.0);
#pragma omp parallel for if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(n, (b + 1) * kSumBlock);
    double s = 0.0;
    for (int64_t i = b * kSumBlock; i < end; ++i) s += double(x[i]) * double(x[i]);
    partial[size_t(b)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

template <class T>
void copy_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols) {
#pragma omp parallel for if (rows * cols >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld_src;
    T* d = dst + r * ld_dst;
    for (int64_t c = 0; c < cols; ++c) d[c] = s[c];
  }
}

template <class T>
void stash_2d(T* dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols) {
  copy_2d(dst, cols, src, ld_src, rows, cols);
}

template <class T>
void unstash_2d(T* dst, int64_t ld_dst, const T* src, int64_t rows, int64_t cols) {
  copy_2d(dst, ld_dst, src, cols, rows, cols);
}

template <class T>
void add_2d(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols) {
#pragma omp parallel for if (rows * cols >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld_src;
    T* d = dst + r * ld_dst;
    for (int64_t c = 0; c < cols; ++c) d[c] += s[c];
  }
}

template <class T>
void gather_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, const int32_t* idx,
                 int64_t rows, int64_t cols, bool accumulate) {
#pragma omp parallel for if (rows * cols >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * ld_dst;
    if (idx[r] < 0) {
      if (!accumulate)
        for (int64_t c = 0; c < cols; ++c) d[c] = T(0);
      continue;
    }
    const T* s = src + int64_t(idx[r]) * ld_src;
    for (int64_t c = 0; c < cols; ++c) d[c] = accumulate ? d[c] + s[c] : s[c];
  }
}

// Element i is kept iff dropout_uniform(key, offset + i) >= p, so the mask of
// an element depends only on the key and its global index: the recompute and
// the backward (same key, same offset) reproduce it exactly. The loop runs
// over the stream's Philox blocks, four global elements each.
template <class T>
void dropout(T* out, const T* x, int64_t n, float p, uint64_t seed, uint64_t step, int layer,
             int site, int64_t offset, float alpha, bool accumulate, const T* res) {
  if (n <= 0) return;
  const RngKey key = make_key(seed, RngPurpose::dropout, step, uint64_t(layer), uint64_t(site));
  const T keep = T(1) - T(p), a = T(alpha);
  const T* base = res ? res : out;  // what the branch is added to
  const int64_t b0 = offset >> 2, b1 = (offset + n + 3) >> 2;  // blocks covering the elements
#pragma omp parallel for if (n >= kParallelMin / 8)
  for (int64_t b = b0; b < b1; ++b) {
    const Philox4 r = rng_block(key, uint64_t(b));  // p <= 0 keeps every element
    for (int w = 0; w < 4; ++w) {
      const int64_t i = 4 * b + w - offset;
      if (i < 0 || i >= n) continue;
      const T v = u32_to_unit(r.v[w]) >= p ? a * (x[i] / keep) : T(0);
      out[i] = accumulate ? base[i] + v : v;
    }
  }
}

#define REFORMER_INSTANTIATE(T)                                                              \
  template void fill<T>(T*, T, int64_t);                                                     \
  template void copy<T>(T*, const T*, int64_t);                                              \
  template void stash<T>(T*, const T*, int64_t);                                             \
  template void unstash<T>(T*, const T*, int64_t);                                           \
  template void add<T>(T*, const T*, const T*, int64_t);                                     \
  template void sub<T>(T*, const T*, const T*, int64_t);                                     \
  template void axpy<T>(T*, T, const T*, int64_t);                                           \
  template void scale<T>(T*, T, int64_t);                                                    \
  template double sum_squares<T>(const T*, int64_t);                                         \
  template void copy_2d<T>(T*, int64_t, const T*, int64_t, int64_t, int64_t);                \
  template void stash_2d<T>(T*, const T*, int64_t, int64_t, int64_t);                        \
  template void unstash_2d<T>(T*, int64_t, const T*, int64_t, int64_t);                      \
  template void add_2d<T>(T*, int64_t, const T*, int64_t, int64_t, int64_t);                 \
  template void gather_rows<T>(T*, int64_t, const T*, int64_t, const int32_t*, int64_t,      \
                               int64_t, bool);                                               \
  template void dropout<T>(T*, const T*, int64_t, float, uint64_t, uint64_t, int, int, int64_t,  \
                           float, bool, const T*);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
