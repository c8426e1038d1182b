// Dense linear layer out = inp @ w + bias (CPU reference). Contracts as in
// kernels/ops.h.
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
constexpr int kNB = 256;   // columns per task (a multiple of kNR)
constexpr int kKB = 128;   // k per pass: packed A [kRB, kKB] and B [kKB, kNB] stay in cache
constexpr int64_t kParallelMinFlops = 1 << 16;

// Columns per register tile: two 16-byte vectors per row, so that the
// kMR x kNR sums fit in the 16 SSE registers.
template <class T>
constexpr int kNR = 32 / int(sizeof(T));

// acc[r, j] += sum_{k < kb} a[k, r] * b[k, j] for r < kMR, j < kNR, adding the
// terms in increasing k. a is packed [kb, kMR], b packed [kb, kNR]; acc rows
// are kNB apart. The sums stay in registers for the whole k range.
template <class T>
inline void register_tile(T* acc, const T* a, const T* b, int64_t kb) {
  constexpr int NR = kNR<T>;
  T c[kMR][NR];
  for (int r = 0; r < kMR; ++r)
    for (int j = 0; j < NR; ++j) c[r][j] = acc[r * kNB + j];
  for (int64_t k = 0; k < kb; ++k) {
    for (int r = 0; r < kMR; ++r) {
      const T ar = a[k * kMR + r];
#pragma omp simd
      for (int j = 0; j < NR; ++j) c[r][j] += ar * b[k * NR + j];
    }
  }
  for (int r = 0; r < kMR; ++r)
    for (int j = 0; j < NR; ++j) acc[r * kNB + j] = c[r][j];
}

// out[i, j] = bias[j] + S(i, j)  (bias may be null: 0), or out[i, j] += S(i, j)
// when accumulate; S(i, j) = sum_{k < K} A(i, k) * B(k, j) summed in increasing k
// from zero, with A(i, k) = A[i * a_rs + k * a_ks], B(k, j) = B[k * b_ks + j * b_js].
// out [M, Ncols] has row stride ldo.
//
// A task owns a [kRB, kNB] tile of out. For each k-block it packs its rows of
// A into register-tile order ([tile][k][kMR]) and its panel of B into strips
// ([strip][k][kNR]), zero-padding partial tiles and strips; the padded sums
// land in unused scratch and are never written out.
template <class T>
void gemm(T* out, int64_t ldo, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t b_ks,
          int64_t b_js, int64_t M, int64_t K, int64_t Ncols, const T* bias, bool accumulate) {
  if (M <= 0 || Ncols <= 0) return;
  constexpr int NR = kNR<T>;
  const int64_t row_blocks = (M + kRB - 1) / kRB;
  const int64_t col_blocks = (Ncols + kNB - 1) / kNB;
  const int64_t tasks = row_blocks * col_blocks;
  const bool parallel = tasks > 1 && M * K * Ncols >= kParallelMinFlops;
#pragma omp parallel if (parallel)
  {
    std::vector<T> acc(size_t(kRB) * kNB), pa(size_t(kRB) * kKB), pb(size_t(kKB) * kNB);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t i0 = (t / col_blocks) * kRB, j0 = (t % col_blocks) * kNB;
      const int mb = int(std::min<int64_t>(kRB, M - i0));
      const int nb = int(std::min<int64_t>(kNB, Ncols - j0));
      const int row_tiles = (mb + kMR - 1) / kMR, strips = (nb + NR - 1) / NR;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t k0 = 0; k0 < K; k0 += kKB) {
        const int64_t kb = std::min<int64_t>(kKB, K - k0);
        for (int rt = 0; rt < row_tiles; ++rt) {
          for (int64_t k = 0; k < kb; ++k) {
            for (int r = 0; r < kMR; ++r) {
              const int row = rt * kMR + r;
              pa[size_t((rt * kb + k) * kMR + r)] =
                  row < mb ? A[(i0 + row) * a_rs + (k0 + k) * a_ks] : T(0);
            }
          }
        }
        for (int s = 0; s < strips; ++s) {
          for (int64_t k = 0; k < kb; ++k) {
            T* dst = pb.data() + (s * kb + k) * NR;
            for (int j = 0; j < NR; ++j) {
              const int col = s * NR + j;
              dst[j] = col < nb ? B[(k0 + k) * b_ks + (j0 + col) * b_js] : T(0);
            }
          }
        }
        for (int s = 0; s < strips; ++s) {
          for (int rt = 0; rt < row_tiles; ++rt) {
            register_tile(acc.data() + rt * kMR * kNB + s * NR, pa.data() + rt * kb * kMR,
                          pb.data() + s * kb * NR, kb);
          }
        }
      }
      for (int r = 0; r < mb; ++r) {
        T* o = out + (i0 + r) * ldo + j0;
        const T* sum = acc.data() + r * kNB;
        if (accumulate) {
          for (int j = 0; j < nb; ++j) o[j] += sum[j];
        } else if (bias) {
          for (int j = 0; j < nb; ++j) o[j] = bias[j0 + j] + sum[j];
        } else {
          for (int j = 0; j < nb; ++j) o[j] = sum[j];
        }
      }
    }
  }
}

}  // namespace

namespace {

// One row (a decoding step): out = bias + inp @ w without packing, streaming w
// row by row. Each element is the same sum as gemm's (increasing k from zero,
// then the bias), so the result is bitwise that of the blocked kernel.
template <class T>
void row_times_matrix(T* out, const T* inp, const T* w, const T* bias, int C, int OC) {
  const int64_t blocks = (OC + kNB - 1) / kNB;
#pragma omp parallel for if (blocks > 1 && int64_t(C) * OC >= 16 * kParallelMinFlops)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kNB;
    const int nb = int(std::min<int64_t>(kNB, OC - j0));
    T s[kNB] = {};
    for (int k = 0; k < C; ++k) {
      const T a = inp[k];
      const T* row = w + int64_t(k) * OC + j0;
#pragma omp simd
      for (int j = 0; j < nb; ++j) s[j] += a * row[j];
    }
    for (int j = 0; j < nb; ++j) out[j0 + j] = bias ? bias[j0 + j] + s[j] : s[j];
  }
}

}  // namespace

template <class T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C, int OC) {
  if (N == 1) return row_times_matrix(out, inp, w, bias, C, OC);
  gemm(out, OC, inp, C, 1, w, OC, 1, N, C, OC, bias, /*accumulate=*/false);
}

template <class T>
void matmul_accumulate(T* out, const T* inp, const T* w, const T* bias, int64_t N, int C, int OC,
                       float alpha, const T* res) {
  std::vector<T> branch(static_cast<size_t>(N * OC));
  matmul_forward(branch.data(), inp, w, bias, N, C, OC);
  const T a = T(alpha);
  const T* r = res ? res : out;
  for (int64_t i = 0; i < N * OC; ++i) out[i] = r[i] + a * branch[size_t(i)];
}

template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N,
                     int C, int OC, bool add_dinp) {
  const T* no_bias = nullptr;
  if (dinp) {
    // dinp[N, C] (+)= dout[N, OC] @ w^T: B(k = o, j = c) = w[c, o].
    gemm(dinp, C, dout, OC, 1, w, 1, OC, N, OC, C, no_bias, /*accumulate=*/add_dinp);
  }
  if (dw) {
    // dw[C, OC] += inp^T @ dout: A(i = c, k = n) = inp[n, c].
    gemm(dw, OC, inp, 1, C, dout, OC, 1, C, N, OC, no_bias, /*accumulate=*/true);
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
  template void matmul_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int, int, \
                                   bool);                                                     \
  template void matmul_accumulate<T>(T*, const T*, const T*, const T*, int64_t, int, int, float, \
                                     const T*);
REFORMER_INSTANTIATE(float)
REFORMER_INSTANTIATE(double)
#undef REFORMER_INSTANTIATE

}  // namespace reformer::cpu
