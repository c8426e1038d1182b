// Dense linear layer out = inp @ w + bias (CPU reference). Contracts as in
// framework/ops.h.
//
// All three products (forward, dinp, dw) go through one blocked kernel that
// owns disjoint tiles of its output: a tile is computed by one thread, and
// each of its elements is the sum over k in increasing order, started from
// zero, then added to the bias (forward) or to the existing gradient
// (backward). Results are therefore bitwise independent of the thread count,
// and calling a backward twice from zero gives exactly twice the gradient.
#include "kernels/cpu/matmul.h"

#include <algorithm>
#include <vector>

namespace reformer::cpu {

namespace {

constexpr int kMR = 4;     // rows per register tile
constexpr int kRB = 32;    // rows per task (a multiple of kMR)
constexpr int kNB = 256;   // columns per task
constexpr int kKB = 128;   // k per pass; the [kKB, kNB] panel of B stays in L2
constexpr int64_t kParallelMinFlops = 1 << 16;

// Columns per register tile: two 16-byte vectors per row, so that the
// kMR x NR sums fit in the 16 SSE registers.
template <class T>
constexpr int kNR = 32 / int(sizeof(T));

// acc[r, j] += sum_{k0 <= k < k1} A(r, k) * B[k, j] for r < MR, j < NR, adding
// the terms in increasing k. A(r, k) = A[r * a_rs + k * a_ks]; acc rows are
// kNB apart. The sums live in registers for the whole k range.
template <class T, int MR, int NR>
inline void register_tile(T* acc, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
                          int64_t ldb, int64_t k0, int64_t k1) {
  T c[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) c[r][j] = acc[r * kNB + j];
  for (int64_t k = k0; k < k1; ++k) {
    const T* b = B + k * ldb;
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * a_rs + k * a_ks];
#pragma omp simd
      for (int j = 0; j < NR; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r * kNB + j] = c[r][j];
}

// register_tile over MR rows and all nb columns of a task.
template <class T, int MR>
inline void row_tile(T* acc, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                     int64_t k0, int64_t k1, int nb) {
  constexpr int NR = kNR<T>;
  int j = 0;
  for (; j + NR <= nb; j += NR) register_tile<T, MR, NR>(acc + j, A, a_rs, a_ks, B + j, ldb, k0, k1);
  for (; j < nb; ++j) register_tile<T, MR, 1>(acc + j, A, a_rs, a_ks, B + j, ldb, k0, k1);
}

// out[i, j] = bias[j] + S(i, j)  (bias may be null: 0), or out[i, j] += S(i, j)
// when accumulate; S(i, j) = sum_{k < K} A(i, k) * B[k, j] summed in increasing k
// from zero. A(i, k) = A[i * a_rs + k * a_ks]; B is row-major with row stride ldb;
// out has row stride ldo. Shapes: out [M, Ncols], B [K, Ncols].
template <class T>
void gemm(T* out, int64_t ldo, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
          int64_t M, int64_t K, int64_t Ncols, const T* bias, bool accumulate) {
  if (M <= 0 || Ncols <= 0) return;
  const int64_t row_blocks = (M + kRB - 1) / kRB;
  const int64_t col_blocks = (Ncols + kNB - 1) / kNB;
  const int64_t tasks = row_blocks * col_blocks;
  const bool parallel = tasks > 1 && M * K * Ncols >= kParallelMinFlops;
#pragma omp parallel if (parallel)
  {
    std::vector<T> scratch(size_t(kRB) * kNB);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t i0 = (t / col_blocks) * kRB, j0 = (t % col_blocks) * kNB;
      const int64_t mb = std::min<int64_t>(kRB, M - i0);
      const int nb = int(std::min<int64_t>(kNB, Ncols - j0));
      T* acc = scratch.data();
      std::fill(scratch.begin(), scratch.end(), T(0));
      for (int64_t k0 = 0; k0 < K; k0 += kKB) {
        const int64_t k1 = std::min<int64_t>(K, k0 + kKB);
        int64_t r = 0;
        for (; r + kMR <= mb; r += kMR) {
          row_tile<T, kMR>(acc + r * kNB, A + (i0 + r) * a_rs, a_rs, a_ks, B + j0, ldb, k0, k1,
                           nb);
        }
        for (; r < mb; ++r) {
          row_tile<T, 1>(acc + r * kNB, A + (i0 + r) * a_rs, a_rs, a_ks, B + j0, ldb, k0, k1, nb);
        }
      }
      for (int64_t r = 0; r < mb; ++r) {
        T* o = out + (i0 + r) * ldo + j0;
        const T* s = acc + r * kNB;
        if (accumulate) {
          for (int j = 0; j < nb; ++j) o[j] += s[j];
        } else if (bias) {
          for (int j = 0; j < nb; ++j) o[j] = bias[j0 + j] + s[j];
        } else {
          for (int j = 0; j < nb; ++j) o[j] = s[j];
        }
      }
    }
  }
}

}  // namespace

template <class T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C, int OC) {
  gemm(out, OC, inp, C, 1, w, OC, N, C, OC, bias, /*accumulate=*/false);
}

template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N,
                     int C, int OC) {
  if (dinp) {
    // dinp[N, C] += dout[N, OC] @ w^T, with w^T materialised so that the
    // kernel's inner loop runs over contiguous rows.
    std::vector<T> wt(size_t(C) * size_t(OC));
#pragma omp parallel for if (int64_t(C) * OC >= (1 << 16))
    for (int64_t o = 0; o < OC; ++o) {
      for (int64_t c = 0; c < C; ++c) wt[size_t(o * C + c)] = w[c * OC + o];
    }
    gemm(dinp, C, dout, OC, 1, wt.data(), C, N, OC, C, static_cast<const T*>(nullptr), true);
  }
  if (dw) {
    // dw[C, OC] += inp^T @ dout: row c of dw reads column c of inp.
    gemm(dw, OC, inp, 1, C, dout, OC, C, N, OC, static_cast<const T*>(nullptr), true);
  }
  if (dbias) {
    const int64_t blocks = (OC + kNB - 1) / kNB;
#pragma omp parallel for if (blocks > 1 && N * OC >= kParallelMinFlops)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t j0 = b * kNB;
      const int nb = int(std::min<int64_t>(kNB, OC - j0));
      T s[kNB] = {};
      for (int64_t n = 0; n < N; ++n) {
        const T* g = dout + n * OC + j0;
#pragma omp simd
        for (int j = 0; j < nb; ++j) s[j] += g[j];
      }
      for (int j = 0; j < nb; ++j) dbias[j0 + j] += s[j];
    }
  }
}

#define REFORMER_INSTANTIATE(T)                                                                 \
  template void matmul_forward<T>(T*, const T*, const T*, const T*, int64_t, int, int);         \
  template void matmul_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int, int);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
