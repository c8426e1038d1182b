// Chunked attention over permuted positions (LSH, local) and exact full
// attention, shared-QK scoring (CPU reference and test oracle).
//
// Scoring, for a query at position i and a key at position j:
//   s_ij = q_i . k_hat_j,  q_i = qk row i,  k_hat_j = k_j / sqrt(|k_j|^2 + kNormEps),
// then, set rather than added: kCausalMaskValue when causal and j > i,
// otherwise kSelfMaskValue when j == i. Masked scores are constants: they
// take part in the softmax but pass no gradient to qk.
//
// Chunked attention: round r's sorted order perm[r, :] is cut into L / chunk
// chunks; a query in chunk c attends to the keys of chunks
// c - chunks_before .. c + chunks_after of the same round (modulo the number
// of chunks when wrap, otherwise clipped), each chunk counted once. Saved for
// the backward, by position: out_r [n_rounds, L, dh] and
// lse [n_rounds, L] = log sum_j exp(s_ij). Rounds combine as
// out_i = sum_r exp(lse_r,i - logsumexp_r lse_r,i) out_r,i.
//
// Gradients ACCUMULATE into dqk and dv ([L, ld] head slices); a null pointer
// is skipped. Every output element is produced by one thread in a fixed
// order, so results do not depend on the number of threads.
#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels/errors.h"
#include "kernels/common/attention_checks.h"

namespace reformer::cpu {

namespace {

// Below this many multiply-adds a call runs on one thread: thread start-up
// would cost more than it saves. Results do not depend on it.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

void check_common(const AttentionParams& p, const char* op) {
  check_attention_shape(p, op);
  if (p.out_bf16)  // Ops::attention_output_bf16 is false here
    throw ShapeError(std::string(op) + ": out_bf16 needs a backend that keeps bf16 outputs");
  if (p.grad_bf16)
    throw ShapeError(std::string(op) + ": grad_bf16 needs a backend that keeps bf16 gradients");
  if (p.in_bf16)
    throw ShapeError(std::string(op) + ": in_bf16 needs a backend that keeps bf16 operands");
}

void check_chunked(const AttentionParams& p, const char* op) {
  check_common(p, op);
  check_chunked_attention_shape(p, op);
}

template <class T>
T dot(const T* a, const T* b, int n) {
  T s = T(0);
  for (int d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Unit-norm keys khat [L, dh] (dense) and the norms they were divided by.
template <class T>
void normalise_keys(std::vector<T>& khat, std::vector<T>& norm, const T* qk,
                    const AttentionParams& p, bool par) {
  const int dh = p.dh;
  khat.assign(size_t(p.L) * size_t(dh), T(0));
  norm.assign(size_t(p.L), T(0));
#pragma omp parallel for schedule(static) if (par)
  for (int64_t j = 0; j < p.L; ++j) {
    const T* k = qk + j * p.ld;
    const T n = std::sqrt(dot(k, k, dh) + T(kKeyNormEps));
    norm[size_t(j)] = n;
    T* kh = khat.data() + j * dh;
    for (int d = 0; d < dh; ++d) kh[d] = k[d] / n;
  }
}

// Whether the score of query position i against key position j is a mask constant.
inline bool is_masked(int64_t i, int64_t j, bool causal) { return j == i || (causal && j > i); }

// Replaces score by its mask constant where (i, j) is masked; returns whether it was.
template <class T>
bool apply_mask(T& score, int64_t i, int64_t j, bool causal) {
  if (causal && j > i) {
    score = T(kCausalMaskValue);
    return true;
  }
  if (j == i) {
    score = T(kSelfMaskValue);
    return true;
  }
  return false;
}

// pos[0..n) = the positions at the slots of `chunks` (in list order) of one
// round's order pr; returns n.
inline int64_t window_positions(int64_t* pos, const int32_t* pr,
                                const std::vector<int64_t>& chunks, int64_t chunk) {
  int64_t n = 0;
  for (int64_t c : chunks)
    for (int64_t t = c * chunk; t < (c + 1) * chunk; ++t) pos[n++] = pr[t];
  return n;
}

// dst [dh, n] = rows pos[0..n) of src (row stride ld), transposed.
template <class T>
void gather_transposed(T* dst, const T* src, int64_t ld, const int64_t* pos, int64_t n, int dh) {
  for (int64_t k = 0; k < n; ++k) {
    const T* row = src + pos[k] * ld;
    for (int d = 0; d < dh; ++d) dst[d * n + k] = row[d];
  }
}

// y[k] = x . column k of xt [dh, n], summed over d in increasing order (the
// same order as dot(), so every pass computes a score to the same bits).
template <class T>
void row_times(T* y, const T* x, const T* xt, int64_t n, int dh) {
  for (int64_t k = 0; k < n; ++k) y[k] = T(0);
  for (int d = 0; d < dh; ++d) {
    const T xd = x[d];
    const T* col = xt + d * n;
    for (int64_t k = 0; k < n; ++k) y[k] += xd * col[k];
  }
}

// win[c]: the chunks that chunk c attends to, in offset order
// (-chunks_before .. chunks_after); inv[kc]: the chunks whose window holds
// kc, increasing. A chunk appears at most once in any list.
struct ChunkWindows {
  int64_t n_chunks = 0;
  int64_t max_window = 0;   // longest win list
  int64_t max_inverse = 0;  // longest inv list
  std::vector<std::vector<int64_t>> win;
  std::vector<std::vector<int64_t>> inv;
};

ChunkWindows make_windows(const AttentionParams& p) {
  ChunkWindows w;
  w.n_chunks = p.L / p.chunk;
  w.win.resize(size_t(w.n_chunks));
  w.inv.resize(size_t(w.n_chunks));
  for (int64_t c = 0; c < w.n_chunks; ++c) {
    auto& list = w.win[size_t(c)];
    for (int64_t o = -int64_t(p.chunks_before); o <= int64_t(p.chunks_after); ++o) {
      int64_t kc = c + o;
      if (p.wrap) {
        kc %= w.n_chunks;
        if (kc < 0) kc += w.n_chunks;
      } else if (kc < 0 || kc >= w.n_chunks) {
        continue;
      }
      if (std::find(list.begin(), list.end(), kc) == list.end()) list.push_back(kc);
    }
    w.max_window = std::max(w.max_window, int64_t(list.size()));
  }
  for (int64_t c = 0; c < w.n_chunks; ++c)
    for (int64_t kc : w.win[size_t(c)]) w.inv[size_t(kc)].push_back(c);
  for (const auto& list : w.inv) w.max_inverse = std::max(w.max_inverse, int64_t(list.size()));
  return w;
}

// Combination of the rounds at one position: with m = max_r lse_r and
// z = sum_r exp(lse_r - m), round r has weight exp(lse_r - m) / z, and a
// (round, key) pair of that position has weight exp(s - m) / z. Shifting by m
// rather than by logsumexp keeps these exact when lse is large (a query that
// sees only itself has lse = kSelfMaskValue in every round).
template <class T>
struct RoundShift {
  T m;      // max_r lse[r, i]
  T inv_z;  // 1 / sum_r exp(lse[r, i] - m)
};

template <class T>
RoundShift<T> round_shift(const T* lse, int64_t i, int64_t L, int n_rounds) {
  T m = lse[i];
  for (int r = 1; r < n_rounds; ++r) m = std::max(m, lse[int64_t(r) * L + i]);
  T z = T(0);
  for (int r = 0; r < n_rounds; ++r) z += std::exp(lse[int64_t(r) * L + i] - m);
  return {m, T(1) / z};
}

// o[0..dh) = combined output of position i from out_r [n_rounds, L, dh].
template <class T>
void combine_position(T* o, const T* out_r, const T* lse, int64_t i, const AttentionParams& p) {
  const int dh = p.dh;
  const RoundShift<T> sh = round_shift(lse, i, p.L, p.n_rounds);
  for (int d = 0; d < dh; ++d) o[d] = T(0);
  for (int r = 0; r < p.n_rounds; ++r) {
    const T w = std::exp(lse[int64_t(r) * p.L + i] - sh.m) * sh.inv_z;
    const T* src = out_r + (int64_t(r) * p.L + i) * dh;
    for (int d = 0; d < dh; ++d) o[d] += w * src[d];
  }
}

}  // namespace

// ---------------------------------------------------------------- chunked

template <class T>
void chunked_attention_forward(T* out, T* out_r, T* lse, const T* qk, const T* v,
                               const int32_t* perm, const AttentionParams& p) {
  check_chunked(p, "chunked_attention_forward");
  const int64_t L = p.L, ld = p.ld, chunk = p.chunk;
  const int dh = p.dh;
  check_chunked_outputs(out, out_r, p);
  if (L == 0) return;
  if (p.fold_rounds) {  // one round at a time into out_r (or a slot of its own), folded into out
    AttentionParams one = p;
    one.n_rounds = 1;
    one.fold_rounds = false;
    std::vector<T> slot(out_r ? 0 : size_t(L) * size_t(dh));
    T* round = out_r ? out_r : slot.data();
    for (int r = 0; r < p.n_rounds; ++r) {
      chunked_attention_forward<T>(nullptr, round, lse + r * L, qk, v, perm + r * L, one);
      fold_round(out, round, lse, r, L, dh, ld);
    }
    return;
  }
  const ChunkWindows cw = make_windows(p);
  const bool par = p.n_rounds * L * cw.max_window * chunk * dh >= kMinParallelWork;
  std::vector<T> khat, norm;
  normalise_keys(khat, norm, qk, p, par);
  std::unique_ptr<T[]> own_r;  // the rounds' outputs when the caller keeps none (every
                               // element written below before it is read)
  if (!out_r) {
    own_r.reset(new T[size_t(p.n_rounds) * size_t(L) * size_t(dh)]);
    out_r = own_r.get();
  }

  const int64_t n_units = int64_t(p.n_rounds) * cw.n_chunks;
  const size_t W = size_t(cw.max_window * chunk);
#pragma omp parallel if (par)
  {
    std::vector<int64_t> keys(W);
    std::vector<T> kt(W * size_t(dh)), e(W);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < n_units; ++u) {
      const int64_t r = u / cw.n_chunks, c = u % cw.n_chunks;
      const int32_t* pr = perm + r * L;
      const int64_t n = window_positions(keys.data(), pr, cw.win[size_t(c)], chunk);
      gather_transposed(kt.data(), khat.data(), dh, keys.data(), n, dh);
      for (int64_t s = c * chunk; s < (c + 1) * chunk; ++s) {
        const int64_t i = pr[s];
        // Masked scores over the window, then a max-shifted softmax.
        row_times(e.data(), qk + i * ld, kt.data(), n, dh);
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t k = 0; k < n; ++k) {
          apply_mask(e[size_t(k)], i, keys[size_t(k)], p.causal);
          m = std::max(m, e[size_t(k)]);
        }
        T sum = T(0);
        for (int64_t k = 0; k < n; ++k) {
          e[size_t(k)] = std::exp(e[size_t(k)] - m);
          sum += e[size_t(k)];
        }
        const T inv_sum = T(1) / sum;
        T* o = out_r + (r * L + i) * dh;
        for (int d = 0; d < dh; ++d) o[d] = T(0);
        for (int64_t k = 0; k < n; ++k) {
          const T pij = e[size_t(k)] * inv_sum;
          const T* vj = v + keys[size_t(k)] * ld;
          for (int d = 0; d < dh; ++d) o[d] += pij * vj[d];
        }
        lse[r * L + i] = m + std::log(sum);
      }
    }
  }

  if (!out) return;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t i = 0; i < L; ++i) combine_position(out + i * ld, out_r, lse, i, p);
}

template <class T>
void combine_rounds(T* out, T* w, const T* out_r, const T* lse, int n_rounds, int64_t L,
                    int dh, int64_t ld) {
  check_combine_rounds(n_rounds, L, dh, ld);
  AttentionParams p;
  p.L = L;
  p.dh = dh;
  p.n_rounds = n_rounds;
  const bool par = int64_t(n_rounds) * L * dh >= kMinParallelWork;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t i = 0; i < L; ++i) {
    if (out) combine_position(out + i * ld, out_r, lse, i, p);
    if (w) {
      const RoundShift<T> sh = round_shift(lse, i, L, n_rounds);
      for (int r = 0; r < n_rounds; ++r)
        w[int64_t(r) * L + i] = std::exp(lse[int64_t(r) * L + i] - sh.m) * sh.inv_z;
    }
  }
}

template <class T>
void fold_round(T* out, const T* out_r, const T* lse, int r, int64_t L, int dh, int64_t ld) {
  check_fold_round(r, L, dh, ld);
  const bool par = L * dh >= kMinParallelWork;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t i = 0; i < L; ++i) {
    T* o = out + i * ld;
    const T* src = out_r + i * dh;
    if (r == 0) {
      for (int d = 0; d < dh; ++d) o[d] = src[d];
      continue;
    }
    T m = lse[i];
    for (int k = 1; k <= r; ++k) m = std::max(m, lse[int64_t(k) * L + i]);
    T a = T(0);
    for (int k = 0; k < r; ++k) a += std::exp(lse[int64_t(k) * L + i] - m);
    const T b = std::exp(lse[int64_t(r) * L + i] - m);
    const T inv = T(1) / (a + b);
    for (int d = 0; d < dh; ++d) o[d] = (a * o[d] + b * src[d]) * inv;
  }
}

// The [L, dh] slices (row stride ld) of dqk and dv that are non-null set to
// 0: a backward with AttentionParams::accumulate false then adds into them.
namespace {
template <class T>
void zero_slices(T* dqk, T* dv, int64_t L, int64_t ld, int dh) {
  for (T* x : {dqk, dv})
    if (x)
      for (int64_t i = 0; i < L; ++i) std::fill(x + i * ld, x + i * ld + dh, T(0));
}
}  // namespace

// The combined output is one softmax over all (round, key) pairs of query i,
// with weights P_rij = w_r,i p_r,ij = exp(s_ij - logsumexp_r lse_r,i). Hence,
// with D_i = dout_i . out_i:
//   dv_j   += sum_{r,i} P_rij dout_i
//   ds_rij  = P_rij (dout_i . v_j - D_i)   (0 for masked scores)
//   dq_i   += sum_{r,j} ds_rij k_hat_j
//   dkhat_j = sum_{r,i} ds_rij q_i,  dk_j = (dkhat_j - k_hat_j (k_hat_j . dkhat_j)) / |k_j|
// which equals the round-by-round derivation (d out_r = w_r dout,
// d lse_r = w_r (dout . out_r - dout . out)). Query-side terms are computed by
// query chunk, key-side terms by key chunk (recomputing the scores), each into
// per-round buffers that are summed in round order. With p.fold_rounds the
// rounds go one at a time (per-round buffers of one round), each round's
// share added into dqk and dv before the next.
template <class T>
void chunked_attention_backward(T* dqk, T* dv, const T* dout, const T* qk, const T* v,
                                const int32_t* perm, const T* out, int64_t ld_out, const T* lse,
                                const AttentionParams& p) {
  check_chunked(p, "chunked_attention_backward");
  const int64_t L = p.L, ld = p.ld, chunk = p.chunk;
  const int dh = p.dh;
  const int R = p.n_rounds;
  if (L == 0 || (!dqk && !dv)) return;
  if (!p.accumulate) zero_slices(dqk, dv, L, ld, dh);
  const ChunkWindows cw = make_windows(p);
  const bool par = p.n_rounds * L * cw.max_window * chunk * dh >= kMinParallelWork;
  std::vector<T> khat, norm;
  normalise_keys(khat, norm, qk, p, par);

  // Per position: the round shift (over all R rounds) and D_i = dout_i . out_i.
  std::vector<RoundShift<T>> shift(static_cast<size_t>(L));
  std::vector<T> D(static_cast<size_t>(L));
#pragma omp parallel for schedule(static) if (par)
  for (int64_t i = 0; i < L; ++i) {
    shift[size_t(i)] = round_shift(lse, i, L, R);
    D[size_t(i)] = dot(dout + i * ld, out + i * ld_out, dh);
  }
  auto pair_weight = [&](T score, int64_t i) {
    return std::exp(score - shift[size_t(i)].m) * shift[size_t(i)].inv_z;
  };

  // Rounds r0 .. r0 + NR - 1 at a time: all of them, or one (fold_rounds).
  const int NR = p.fold_rounds ? 1 : R;
  const size_t per_round = size_t(NR) * size_t(L) * size_t(dh);
  std::vector<T> dq_r(dqk ? per_round : 0), dkhat_r(dqk ? per_round : 0),
      dv_r(dv ? per_round : 0);
  const int64_t n_units = int64_t(NR) * cw.n_chunks;
  for (int r0 = 0; r0 < R; r0 += NR) {
    // Query side: dq_r[r, i] for the queries of chunk c.
    if (dqk) {
      const size_t W = size_t(cw.max_window * chunk);
#pragma omp parallel if (par)
      {
        std::vector<int64_t> keys(W);
        std::vector<T> kt(W * size_t(dh)), vt(W * size_t(dh)), sc(W), gv(W);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < n_units; ++u) {
          const int64_t r = u / cw.n_chunks, c = u % cw.n_chunks;
          const int32_t* pr = perm + (r0 + r) * L;
          const int64_t n = window_positions(keys.data(), pr, cw.win[size_t(c)], chunk);
          gather_transposed(kt.data(), khat.data(), dh, keys.data(), n, dh);
          gather_transposed(vt.data(), v, ld, keys.data(), n, dh);
          for (int64_t s = c * chunk; s < (c + 1) * chunk; ++s) {
            const int64_t i = pr[s];
            row_times(sc.data(), qk + i * ld, kt.data(), n, dh);
            row_times(gv.data(), dout + i * ld, vt.data(), n, dh);
            T* dq = dq_r.data() + (r * L + i) * dh;
            for (int d = 0; d < dh; ++d) dq[d] = T(0);
            for (int64_t k = 0; k < n; ++k) {
              const int64_t j = keys[size_t(k)];
              if (is_masked(i, j, p.causal)) continue;
              const T ds = pair_weight(sc[size_t(k)], i) * (gv[size_t(k)] - D[size_t(i)]);
              const T* kh = khat.data() + j * dh;
              for (int d = 0; d < dh; ++d) dq[d] += ds * kh[d];
            }
          }
        }
      }
    }

    // Key side: dkhat_r[r, j] and dv_r[r, j] for the keys of chunk kc, from
    // every query chunk whose window holds kc.
    {
      const size_t Q = size_t(cw.max_inverse * chunk);
#pragma omp parallel if (par)
      {
        std::vector<int64_t> queries(Q);
        std::vector<T> qt(Q * size_t(dh)), gt(dqk ? Q * size_t(dh) : 0), sc(Q), gv(Q);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < n_units; ++u) {
          const int64_t r = u / cw.n_chunks, kc = u % cw.n_chunks;
          const int32_t* pr = perm + (r0 + r) * L;
          const int64_t n = window_positions(queries.data(), pr, cw.inv[size_t(kc)], chunk);
          gather_transposed(qt.data(), qk, ld, queries.data(), n, dh);
          if (dqk) gather_transposed(gt.data(), dout, ld, queries.data(), n, dh);
          for (int64_t t = kc * chunk; t < (kc + 1) * chunk; ++t) {
            const int64_t j = pr[t];
            row_times(sc.data(), khat.data() + j * dh, qt.data(), n, dh);
            if (dqk) row_times(gv.data(), v + j * ld, gt.data(), n, dh);
            T* dk = dqk ? dkhat_r.data() + (r * L + j) * dh : nullptr;
            T* dvj = dv ? dv_r.data() + (r * L + j) * dh : nullptr;
            for (int d = 0; d < dh; ++d) {
              if (dk) dk[d] = T(0);
              if (dvj) dvj[d] = T(0);
            }
            for (int64_t k = 0; k < n; ++k) {
              const int64_t i = queries[size_t(k)];
              T score = sc[size_t(k)];
              const bool masked = apply_mask(score, i, j, p.causal);
              const T P = pair_weight(score, i);
              const T* g = dout + i * ld;
              if (dvj)
                for (int d = 0; d < dh; ++d) dvj[d] += P * g[d];
              if (dk && !masked) {
                const T ds = P * (gv[size_t(k)] - D[size_t(i)]);
                const T* q = qk + i * ld;
                for (int d = 0; d < dh; ++d) dk[d] += ds * q[d];
              }
            }
          }
        }
      }
    }

    // Sum the rounds in order; project dkhat through the normalisation.
#pragma omp parallel if (par)
    {
      std::vector<T> acc(static_cast<size_t>(dh));
#pragma omp for schedule(static)
      for (int64_t j = 0; j < L; ++j) {
        if (dv) {
          for (int d = 0; d < dh; ++d) acc[size_t(d)] = T(0);
          for (int r = 0; r < NR; ++r) {
            const T* src = dv_r.data() + (int64_t(r) * L + j) * dh;
            for (int d = 0; d < dh; ++d) acc[size_t(d)] += src[d];
          }
          for (int d = 0; d < dh; ++d) dv[j * ld + d] += acc[size_t(d)];
        }
        if (dqk) {
          for (int d = 0; d < dh; ++d) acc[size_t(d)] = T(0);
          for (int r = 0; r < NR; ++r) {
            const T* src = dkhat_r.data() + (int64_t(r) * L + j) * dh;
            for (int d = 0; d < dh; ++d) acc[size_t(d)] += src[d];
          }
          const T* kh = khat.data() + j * dh;
          const T proj = dot(kh, acc.data(), dh);
          const T inv_norm = T(1) / norm[size_t(j)];
          for (int d = 0; d < dh; ++d) {
            T g = (acc[size_t(d)] - kh[d] * proj) * inv_norm;
            for (int r = 0; r < NR; ++r) g += dq_r[size_t((int64_t(r) * L + j) * dh + d)];
            dqk[j * ld + d] += g;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- full
// Written without the chunked helpers above so that it is an independent
// oracle: plain loops over all keys j (j <= i when causal).

template <class T>
void full_attention_forward(T* out, T* lse, const T* qk, const T* v, const AttentionParams& p) {
  check_common(p, "full_attention_forward");
  const int64_t L = p.L, ld = p.ld;
  const int dh = p.dh;
  const bool par = L * L * dh >= kMinParallelWork;
  std::vector<T> kn(static_cast<size_t>(L));  // key norms
  for (int64_t j = 0; j < L; ++j) {
    T s = T(0);
    for (int d = 0; d < dh; ++d) s += qk[j * ld + d] * qk[j * ld + d];
    kn[size_t(j)] = std::sqrt(s + T(kKeyNormEps));
  }
#pragma omp parallel if (par)
  {
    std::vector<T> e(static_cast<size_t>(L));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < L; ++i) {
      const int64_t nk = p.causal ? i + 1 : L;
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < nk; ++j) {
        T sc;
        if (j == i) {
          sc = T(kSelfMaskValue);
        } else {
          sc = T(0);
          for (int d = 0; d < dh; ++d) sc += qk[i * ld + d] * (qk[j * ld + d] / kn[size_t(j)]);
        }
        e[size_t(j)] = sc;
        m = std::max(m, sc);
      }
      T sum = T(0);
      for (int64_t j = 0; j < nk; ++j) {
        e[size_t(j)] = std::exp(e[size_t(j)] - m);
        sum += e[size_t(j)];
      }
      for (int d = 0; d < dh; ++d) out[i * ld + d] = T(0);
      for (int64_t j = 0; j < nk; ++j) {
        const T pij = e[size_t(j)] / sum;
        for (int d = 0; d < dh; ++d) out[i * ld + d] += pij * v[j * ld + d];
      }
      lse[i] = m + std::log(sum);
    }
  }
}

template <class T>
void full_attention_backward(T* dqk, T* dv, const T* dout, const T* out, const T* qk, const T* v,
                             const T* lse, const AttentionParams& p) {
  check_common(p, "full_attention_backward");
  const int64_t L = p.L, ld = p.ld;
  const int dh = p.dh;
  if (!dqk && !dv) return;
  if (!p.accumulate) zero_slices(dqk, dv, L, ld, dh);
  const bool par = L * L * dh >= kMinParallelWork;
  std::vector<T> kn(static_cast<size_t>(L)), kh(size_t(L) * size_t(dh)), D(static_cast<size_t>(L));
  for (int64_t j = 0; j < L; ++j) {
    T s = T(0);
    for (int d = 0; d < dh; ++d) s += qk[j * ld + d] * qk[j * ld + d];
    kn[size_t(j)] = std::sqrt(s + T(kKeyNormEps));
    for (int d = 0; d < dh; ++d) kh[size_t(j * dh + d)] = qk[j * ld + d] / kn[size_t(j)];
    T g = T(0);
    for (int d = 0; d < dh; ++d) g += dout[j * ld + d] * out[j * ld + d];
    D[size_t(j)] = g;
  }
  // P_ij = exp(s_ij - lse_i); ds_ij = P_ij (dout_i . v_j - D_i) for unmasked pairs.
  auto prob_and_ds = [&](int64_t i, int64_t j, T& P, T& ds) {
    T sc = T(0), gv = T(0);
    for (int d = 0; d < dh; ++d) {
      sc += qk[i * ld + d] * kh[size_t(j * dh + d)];
      gv += dout[i * ld + d] * v[j * ld + d];
    }
    if (j == i) sc = T(kSelfMaskValue);
    P = std::exp(sc - lse[i]);
    ds = j == i ? T(0) : P * (gv - D[size_t(i)]);
  };

  // Query side: dqk_i += sum_j ds_ij khat_j.
  if (dqk) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < L; ++i) {
      const int64_t nk = p.causal ? i + 1 : L;
      for (int64_t j = 0; j < nk; ++j) {
        T P, ds;
        prob_and_ds(i, j, P, ds);
        for (int d = 0; d < dh; ++d) dqk[i * ld + d] += ds * kh[size_t(j * dh + d)];
      }
    }
  }
  // Key side: dv_j += sum_i P_ij dout_i; dqk_j += d khat_j / d k_j applied to sum_i ds_ij q_i.
#pragma omp parallel if (par)
  {
    std::vector<T> dk(static_cast<size_t>(dh));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < L; ++j) {
      for (int d = 0; d < dh; ++d) dk[size_t(d)] = T(0);
      for (int64_t i = p.causal ? j : 0; i < L; ++i) {
        T P, ds;
        prob_and_ds(i, j, P, ds);
        if (dv)
          for (int d = 0; d < dh; ++d) dv[j * ld + d] += P * dout[i * ld + d];
        if (dqk)
          for (int d = 0; d < dh; ++d) dk[size_t(d)] += ds * qk[i * ld + d];
      }
      if (dqk) {
        T proj = T(0);
        for (int d = 0; d < dh; ++d) proj += kh[size_t(j * dh + d)] * dk[size_t(d)];
        for (int d = 0; d < dh; ++d)
          dqk[j * ld + d] += (dk[size_t(d)] - kh[size_t(j * dh + d)] * proj) / kn[size_t(j)];
      }
    }
  }
}

template void chunked_attention_forward<float>(float*, float*, float*, const float*, const float*,
                                               const int32_t*, const AttentionParams&);
template void chunked_attention_forward<double>(double*, double*, double*, const double*,
                                                const double*, const int32_t*,
                                                const AttentionParams&);
template void chunked_attention_backward<float>(float*, float*, const float*, const float*,
                                                const float*, const int32_t*, const float*,
                                                int64_t, const float*, const AttentionParams&);
template void chunked_attention_backward<double>(double*, double*, const double*, const double*,
                                                 const double*, const int32_t*, const double*,
                                                 int64_t, const double*, const AttentionParams&);
template void fold_round<float>(float*, const float*, const float*, int, int64_t, int,
                                int64_t);
template void fold_round<double>(double*, const double*, const double*, int, int64_t, int,
                                 int64_t);
template void combine_rounds<float>(float*, float*, const float*, const float*, int, int64_t, int,
                                   int64_t);
template void combine_rounds<double>(double*, double*, const double*, const double*, int, int64_t,
                                    int, int64_t);
template void full_attention_forward<float>(float*, float*, const float*, const float*,
                                            const AttentionParams&);
template void full_attention_forward<double>(double*, double*, const double*, const double*,
                                             const AttentionParams&);
template void full_attention_backward<float>(float*, float*, const float*, const float*,
                                             const float*, const float*, const float*,
                                             const AttentionParams&);
template void full_attention_backward<double>(double*, double*, const double*, const double*,
                                              const double*, const double*, const double*,
                                              const AttentionParams&);

}  // namespace reformer::cpu
