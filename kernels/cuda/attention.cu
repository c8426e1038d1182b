// Chunked attention over permuted positions (LSH, local) and exact full
// attention, shared-QK scoring (CUDA twin of kernels/cpu/attention.cpp; the
// exact semantics are described there and in README.md, "Model semantics").
//
// Scoring: s_ij = q_i . k_hat_j with k_hat_j = k_j / sqrt(|k_j|^2 + 1e-12);
// masked scores are SET to -1e9 (causal, key after query) or -1e5 (the
// query's own position). Chunked: a query in chunk c of round r sees the
// keys of chunks c - chunks_before .. c + chunks_after of that round
// (wrapped or clipped, each chunk once); out_r [n_rounds, L, dh] and
// lse [n_rounds, L] are saved by position and the rounds are combined with
// max-shifted weights exp(lse_r - max_r lse) / sum_r exp(lse_r - max_r lse).
//
// Kernels (one set serves chunked and full attention; FULL selects the
// geometry: queries and keys by position, one round):
//  - normalise_keys_kernel: k_hat [L, dh] and |k| [L], one warp per position.
//  - attn_forward_kernel: one block per (round, chunk, tile of 16 queries);
//    key tiles of 32 (k_hat and v gathered through perm into shared memory),
//    one lane per key for the scores, online max-shifted softmax, one lane
//    per head dimension for the weighted sum; writes out_r (or out) and lse.
//  - combine_rounds_kernel: out = weighted sum of out_r over rounds.
//  - row_stats_kernel: per position the round shift (max lse, 1 / z) and
//    D = dout . out.
//  - attn_dq_kernel: query side of the backward, recomputing probabilities
//    from lse: dq_r[r, i] = sum_j ds_rij k_hat_j.
//  - attn_dkv_kernel: key side, one block per (round, key chunk, tile of 16
//    keys) over the query chunks whose window holds it:
//    dkhat_r[r, j] = sum_i ds_rij q_i, dv_r[r, j] = sum_i P_rij dout_i.
//  - finish_backward_kernel: sums the rounds in order, projects dkhat through
//    the normalisation and ACCUMULATES into dqk and dv.
// Every output element is written by one thread in a fixed order: the
// forward and backward are bitwise reproducible (no atomics).
// Limits: dh <= 128, chunks_before + chunks_after + 1 <= 32.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "kernels/errors.h"
#include "kernels/common/attention_checks.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr float kNormEps = float(kKeyNormEps);
constexpr float kCausalMask = float(kCausalMaskValue);
constexpr float kSelfMask = float(kSelfMaskValue);
constexpr int kWarps = 4;                      // warps per block
constexpr int kRowsPerWarp = 4;                // queries (forward, dq) or keys (dk, dv) per warp
constexpr int kTile = kWarps * kRowsPerWarp;   // rows per block
constexpr int kCols = 32;                      // keys (forward, dq) or queries (dk, dv) per pass
constexpr int kMaxWindow = 32;                 // chunks in one window list
constexpr int kBlock = 32 * kWarps;
// The forward kernel has its own geometry: kFwdRowsPerWarp queries per warp
// and 4 or 8 warps per block (32 or 64 queries per block), so each gathered
// key tile serves more queries. The backward kernels use kTile / kBlock.
constexpr int kFwdRowsPerWarp = 8;

// Geometry of one attention call over one head.
struct AttnGeom {
  const int32_t* perm;  // [n_rounds, L] sorted positions (chunked); unused when full
  int64_t L;            // positions
  int64_t ld;           // row stride of qk, v, dout, out, dqk, dv
  int dh;               // head width, <= the kernel's DHM
  int chunk;            // sorted slots per chunk (chunked)
  int64_t n_chunks;     // L / chunk (chunked); 1 when full
  int before, after;    // window offsets (chunked)
  bool wrap;            // window wraps around the round (chunked)
  bool causal;          // mask keys after the query
  int64_t row_tiles;    // kTile-row tiles per chunk (chunked) or per sequence (full)
};

__device__ __forceinline__ int64_t wrap_chunk(int64_t kc, const AttnGeom& g, bool* ok) {
  if (g.wrap) {
    kc %= g.n_chunks;
    if (kc < 0) kc += g.n_chunks;
    *ok = true;
  } else {
    *ok = kc >= 0 && kc < g.n_chunks;
  }
  return kc;
}

// list = the chunks in the window of chunk c (sign +1), or the chunks whose
// window holds chunk c (sign -1), each once; returns the count.
__device__ int chunk_list(int* list, int64_t c, int sign, const AttnGeom& g) {
  int n = 0;
  for (int o = -g.before; o <= g.after; ++o) {
    bool ok;
    const int64_t kc = wrap_chunk(c + sign * o, g, &ok);
    if (!ok) continue;
    bool dup = false;
    for (int k = 0; k < n; ++k) dup |= list[k] == int(kc);
    if (!dup) list[n++] = int(kc);
  }
  return n;
}

__device__ __forceinline__ float masked_score(float s, int qpos, int kpos, bool causal,
                                              bool* masked) {
  if (causal && kpos > qpos) {
    *masked = true;
    return kCausalMask;
  }
  if (kpos == qpos) {
    *masked = true;
    return kSelfMask;
  }
  *masked = false;
  return s;
}

// Decodes a flat block index into (round, chunk, tile).
__device__ __forceinline__ void decode_block(const AttnGeom& g, int64_t* r, int64_t* c,
                                             int64_t* t) {
  const int64_t b = blockIdx.x;
  *t = b % g.row_tiles;
  const int64_t rest = b / g.row_tiles;
  *c = rest % g.n_chunks;
  *r = rest / g.n_chunks;
}

// Position of row `row` of this block's tile (-1 when past the chunk / sequence).
template <bool FULL, int TILE = kTile>
__device__ __forceinline__ int tile_position(const AttnGeom& g, const int32_t* pr, int64_t c,
                                             int64_t t, int row) {
  const int64_t slot = t * TILE + row;
  if (FULL) return slot < g.L ? int(slot) : -1;
  return slot < g.chunk ? pr[c * g.chunk + slot] : -1;
}

// Position of element k of a window of n elements: for full attention the
// positions first, first + 1, ...; otherwise slot k of the window's chunks
// (chunk ids in `chunks`, in order) under the round's permutation pr.
// -1 past the window's end.
template <bool FULL>
__device__ __forceinline__ int window_position(const AttnGeom& g, const int32_t* pr,
                                               const int* chunks, int64_t first, int64_t k,
                                               int64_t n) {
  if (k >= n) return -1;
  if (FULL) return int(first + k);
  const int64_t kc = chunks[k / g.chunk];
  return pr[kc * g.chunk + k % g.chunk];
}

// Loads kCols rows, a[pos] (row stride lda) into sa and b[pos] (row stride
// ldb) into sb, for the positions in spos; rows with pos < 0 and columns
// past dh are zero. sa / sb rows are sa_stride / sb_stride floats apart.
template <int DHM, int BLOCK = kBlock>
__device__ __forceinline__ void load_rows(float* sa, int sa_stride, float* sb, int sb_stride,
                                          const int* spos, const float* a, int64_t lda,
                                          const float* b, int64_t ldb, int dh, int tid) {
  for (int e = tid; e < kCols * DHM; e += BLOCK) {
    const int row = e / DHM, d = e % DHM;
    const int pos = spos[row];
    const bool ok = pos >= 0 && d < dh;
    sa[row * sa_stride + d] = ok ? a[int64_t(pos) * lda + d] : 0.0f;
    sb[row * sb_stride + d] = ok ? b[int64_t(pos) * ldb + d] : 0.0f;
  }
}

// ---------------------------------------------------------------- small kernels

__global__ void normalise_keys_kernel(float* khat, float* norm, const float* qk, int64_t L,
                                      int64_t ld, int dh) {
  const int64_t j = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (j >= L) return;
  const float* k = qk + j * ld;
  float s = 0.0f;
  for (int d = lane; d < dh; d += 32) s += k[d] * k[d];
  const float n = sqrtf(warp_sum(s) + kNormEps);
  for (int d = lane; d < dh; d += 32) khat[j * dh + d] = k[d] / n;
  if (lane == 0) norm[j] = n;
}

// out[i, d] = sum_r w_r,i out_r[r, i, d]; one thread per (i, d).
__global__ void combine_rounds_kernel(float* out, int64_t ld, const float* out_r, const float* lse,
                                      int64_t L, int dh, int R) {
  const int64_t n = L * dh;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / dh;
    const int d = int(e % dh);
    float m = lse[i];
    for (int r = 1; r < R; ++r) m = fmaxf(m, lse[int64_t(r) * L + i]);
    float z = 0.0f;
    for (int r = 0; r < R; ++r) z += expf(lse[int64_t(r) * L + i] - m);
    const float inv_z = 1.0f / z;
    float o = 0.0f;
    for (int r = 0; r < R; ++r)
      o += expf(lse[int64_t(r) * L + i] - m) * inv_z * out_r[(int64_t(r) * L + i) * dh + d];
    out[i * ld + d] = o;
  }
}

// Per position i: m_i, 1 / z_i (chunked: over rounds; full: lse_i and 1) and
// D_i = dout_i . out_i (chunked: out_i recombined from out_r).
__global__ void row_stats_kernel(float* rm, float* riz, float* rD, const float* dout,
                                 const float* out, const float* out_r, const float* lse,
                                 int64_t L, int64_t ld, int dh, int R, bool full) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= L) return;
  const float* g = dout + i * ld;
  float dsum = 0.0f;
  float m, inv_z;
  if (full) {
    m = lse[i];
    inv_z = 1.0f;
    for (int d = lane; d < dh; d += 32) dsum += g[d] * out[i * ld + d];
  } else {
    m = lse[i];
    for (int r = 1; r < R; ++r) m = fmaxf(m, lse[int64_t(r) * L + i]);
    float z = 0.0f;
    for (int r = 0; r < R; ++r) z += expf(lse[int64_t(r) * L + i] - m);
    inv_z = 1.0f / z;
    for (int d = lane; d < dh; d += 32) {
      float o = 0.0f;
      for (int r = 0; r < R; ++r)
        o += expf(lse[int64_t(r) * L + i] - m) * inv_z * out_r[(int64_t(r) * L + i) * dh + d];
      dsum += g[d] * o;
    }
  }
  dsum = warp_sum(dsum);
  if (lane == 0) {
    rm[i] = m;
    riz[i] = inv_z;
    rD[i] = dsum;
  }
}

// dv[j] += sum_r dv_r[r, j]; dqk[j] += P_j(sum_r dkhat_r[r, j]) / |k_j| + sum_r dq_r[r, j]
// with P_j = I - k_hat_j k_hat_j^T. One warp per position; dh <= 128.
__global__ void finish_backward_kernel(float* dqk, float* dv, const float* dq_r,
                                       const float* dkh_r, const float* dv_r, const float* khat,
                                       const float* norm, int64_t L, int64_t ld, int dh, int R) {
  const int64_t j = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (j >= L) return;
  if (dv) {
    for (int d = lane; d < dh; d += 32) {
      float acc = 0.0f;
      for (int r = 0; r < R; ++r) acc += dv_r[(int64_t(r) * L + j) * dh + d];
      dv[j * ld + d] += acc;
    }
  }
  if (dqk) {
    float acc[4];
    float proj = 0.0f;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int d = lane + 32 * t;
      acc[t] = 0.0f;
      if (d < dh) {
        for (int r = 0; r < R; ++r) acc[t] += dkh_r[(int64_t(r) * L + j) * dh + d];
        proj += khat[j * dh + d] * acc[t];
      }
    }
    proj = warp_sum(proj);
    const float inv_norm = 1.0f / norm[j];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int d = lane + 32 * t;
      if (d < dh) {
        float g = (acc[t] - khat[j * dh + d] * proj) * inv_norm;
        for (int r = 0; r < R; ++r) g += dq_r[(int64_t(r) * L + j) * dh + d];
        dqk[j * ld + d] += g;
      }
    }
  }
}

// ---------------------------------------------------------------- forward

// Chunked: out = out_r [R, L, dh], lse [R, L]. Full: out [L, ld], lse [L].
// WARPS warps of kFwdRowsPerWarp queries each; g.row_tiles counts tiles of
// fwd_tile(WARPS) queries (see launch_forward).
template <int WARPS>
constexpr int fwd_tile() {
  return WARPS * kFwdRowsPerWarp;
}

// 16 resident warps per SM (16 / WARPS blocks) caps registers at 128.
template <int DHM, bool FULL, int WARPS>
__global__ void __launch_bounds__(32 * WARPS, 16 / WARPS)
    attn_forward_kernel(AttnGeom g, const float* qk, const float* khat, const float* v,
                        float* out, float* lse) {
  constexpr int NT = DHM / 32;
  constexpr int RW = kFwdRowsPerWarp;
  constexpr int TILE = fwd_tile<WARPS>();
  constexpr int BLOCK = 32 * WARPS;
  extern __shared__ float4 fwd_smem4[];
  float* smem = reinterpret_cast<float*>(fwd_smem4);
  float* sq = smem;                        // [TILE][DHM]
  float* sp = sq + TILE * DHM;             // [WARPS][RW][kCols] probabilities
  float* sk = sp + TILE * kCols;           // [kCols][DHM + 1]
  float* sv = sk + kCols * (DHM + 1);      // [kCols][DHM]
  __shared__ int skpos[kCols];
  __shared__ int sqpos[TILE];
  __shared__ int swin[kMaxWindow];
  __shared__ int s_nwin;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t r = 0, c = 0, t = 0;
  if (FULL)
    t = blockIdx.x;
  else
    decode_block(g, &r, &c, &t);
  const int32_t* pr = FULL ? nullptr : g.perm + r * g.L;
  if (tid < TILE) sqpos[tid] = tile_position<FULL, TILE>(g, pr, c, t, tid);
  if (!FULL && tid == 0) s_nwin = chunk_list(swin, c, +1, g);
  __syncthreads();
  for (int e = tid; e < TILE * DHM; e += BLOCK) {
    const int row = e / DHM, d = e % DHM;
    const int pos = sqpos[row];
    sq[e] = pos >= 0 && d < g.dh ? qk[int64_t(pos) * g.ld + d] : 0.0f;
  }
  const int64_t n_keys = FULL ? (g.causal ? min(g.L, (t + 1) * TILE) : g.L)
                              : int64_t(s_nwin) * g.chunk;
  // sq and sk are zero past dh, so the score loop may run to dh rounded up to 4.
  const int dh4 = (g.dh + 3) & ~3;

  // Query positions are read from sqpos when needed (fewer live registers).
  const int* qp = sqpos + warp * RW;
  float m[RW], l[RW], o[RW][NT];
#pragma unroll
  for (int u = 0; u < RW; ++u) {
    m[u] = -INFINITY;
    l[u] = 0.0f;
#pragma unroll
    for (int q = 0; q < NT; ++q) o[u][q] = 0.0f;
  }
  const float* qrow = sq + warp * RW * DHM;
  float* pw = sp + warp * RW * kCols;

  for (int64_t k0 = 0; k0 < n_keys; k0 += kCols) {
    __syncthreads();  // the previous tile is consumed (and sq is written)
    if (tid < kCols) skpos[tid] = window_position<FULL>(g, pr, swin, 0, k0 + tid, n_keys);
    __syncthreads();
    load_rows<DHM, BLOCK>(sk, DHM + 1, sv, DHM, skpos, khat, g.dh, v, g.ld, g.dh, tid);
    __syncthreads();

    const int kp = skpos[lane];
    float s[RW];
#pragma unroll
    for (int u = 0; u < RW; ++u) s[u] = 0.0f;
    const float* krow = sk + lane * (DHM + 1);
#pragma unroll 1
    for (int d = 0; d < dh4; d += 4) {
      const float k0v = krow[d], k1v = krow[d + 1], k2v = krow[d + 2], k3v = krow[d + 3];
#pragma unroll
      for (int u = 0; u < RW; ++u) {
        const float4 q4 = *reinterpret_cast<const float4*>(qrow + u * DHM + d);
        s[u] += q4.x * k0v;
        s[u] += q4.y * k1v;
        s[u] += q4.z * k2v;
        s[u] += q4.w * k3v;
      }
    }
#pragma unroll
    for (int u = 0; u < RW; ++u) {
      bool masked;
      const float sc = kp < 0 ? -INFINITY : masked_score(s[u], qp[u], kp, g.causal, &masked);
      const float mn = fmaxf(m[u], warp_max(sc));
      const float p = kp < 0 ? 0.0f : expf(sc - mn);
      const float corr = expf(m[u] - mn);
      l[u] = l[u] * corr + warp_sum(p);
#pragma unroll
      for (int q = 0; q < NT; ++q) o[u][q] *= corr;
      m[u] = mn;
      pw[u * kCols + lane] = p;
    }
    __syncwarp();
#pragma unroll 1
    for (int kk = 0; kk < kCols; kk += 4) {
      float vv[4][NT];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int q = 0; q < NT; ++q) vv[j][q] = sv[(kk + j) * DHM + lane + 32 * q];
#pragma unroll
      for (int u = 0; u < RW; ++u) {
        const float4 p4 = *reinterpret_cast<const float4*>(pw + u * kCols + kk);
#pragma unroll
        for (int q = 0; q < NT; ++q) {
          o[u][q] += p4.x * vv[0][q];
          o[u][q] += p4.y * vv[1][q];
          o[u][q] += p4.z * vv[2][q];
          o[u][q] += p4.w * vv[3][q];
        }
      }
    }
  }

#pragma unroll
  for (int u = 0; u < RW; ++u) {
    if (qp[u] < 0) continue;
    const float inv = 1.0f / l[u];
    float* dst = FULL ? out + int64_t(qp[u]) * g.ld : out + (r * g.L + qp[u]) * g.dh;
#pragma unroll
    for (int q = 0; q < NT; ++q) {
      const int d = lane + 32 * q;
      if (d < g.dh) dst[d] = o[u][q] * inv;
    }
    if (lane == 0) lse[(FULL ? 0 : r * g.L) + qp[u]] = m[u] + logf(l[u]);
  }
}

// ---------------------------------------------------------------- backward

// Query side: dq_r[r, i, :] = sum_j ds_rij k_hat_j (overwritten), with
// P = exp(s - m_i) / z_i and ds = P (dout_i . v_j - D_i), 0 for masked pairs.
template <int DHM, bool FULL>
__global__ void __launch_bounds__(kBlock) attn_dq_kernel(AttnGeom g, const float* qk,
                                                         const float* khat, const float* v,
                                                         const float* dout, const float* rm,
                                                         const float* riz, const float* rD,
                                                         float* dq_r) {
  constexpr int NT = DHM / 32;
  extern __shared__ float smem[];
  float* sq = smem;                    // [kTile][DHM]
  float* sg = sq + kTile * DHM;        // [kTile][DHM]  dout rows
  float* sk = sg + kTile * DHM;        // [kCols][DHM + 1]
  float* sv = sk + kCols * (DHM + 1);  // [kCols][DHM + 1]
  __shared__ int skpos[kCols];
  __shared__ int sqpos[kTile];
  __shared__ int swin[kMaxWindow];
  __shared__ int s_nwin;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t r = 0, c = 0, t = 0;
  if (FULL)
    t = blockIdx.x;
  else
    decode_block(g, &r, &c, &t);
  const int32_t* pr = FULL ? nullptr : g.perm + r * g.L;
  if (tid < kTile) sqpos[tid] = tile_position<FULL>(g, pr, c, t, tid);
  if (!FULL && tid == 0) s_nwin = chunk_list(swin, c, +1, g);
  __syncthreads();
  for (int e = tid; e < kTile * DHM; e += kBlock) {
    const int row = e / DHM, d = e % DHM;
    const int pos = sqpos[row];
    const bool ok = pos >= 0 && d < g.dh;
    sq[e] = ok ? qk[int64_t(pos) * g.ld + d] : 0.0f;
    sg[e] = ok ? dout[int64_t(pos) * g.ld + d] : 0.0f;
  }
  const int64_t n_keys = FULL ? (g.causal ? min(g.L, (t + 1) * kTile) : g.L)
                              : int64_t(s_nwin) * g.chunk;

  int qp[kRowsPerWarp];
  float qm[kRowsPerWarp], qiz[kRowsPerWarp], qD[kRowsPerWarp], dq[kRowsPerWarp][NT];
#pragma unroll
  for (int u = 0; u < kRowsPerWarp; ++u) {
    qp[u] = sqpos[warp * kRowsPerWarp + u];
    qm[u] = qp[u] >= 0 ? rm[qp[u]] : 0.0f;
    qiz[u] = qp[u] >= 0 ? riz[qp[u]] : 0.0f;
    qD[u] = qp[u] >= 0 ? rD[qp[u]] : 0.0f;
#pragma unroll
    for (int q = 0; q < NT; ++q) dq[u][q] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < n_keys; k0 += kCols) {
    __syncthreads();
    if (tid < kCols) skpos[tid] = window_position<FULL>(g, pr, swin, 0, k0 + tid, n_keys);
    __syncthreads();
    load_rows<DHM>(sk, DHM + 1, sv, DHM + 1, skpos, khat, g.dh, v, g.ld, g.dh, tid);
    __syncthreads();

    const int kp = skpos[lane];
    float s[kRowsPerWarp], gv[kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) s[u] = gv[u] = 0.0f;
    const float* krow = sk + lane * (DHM + 1);
    const float* vrow = sv + lane * (DHM + 1);
    const float* qrow = sq + warp * kRowsPerWarp * DHM;
    const float* grow = sg + warp * kRowsPerWarp * DHM;
    for (int d = 0; d < g.dh; ++d) {
      const float kd = krow[d], vd = vrow[d];
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        s[u] += qrow[u * DHM + d] * kd;
        gv[u] += grow[u * DHM + d] * vd;
      }
    }
    float ds[kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) {
      bool masked = true;
      if (kp >= 0 && qp[u] >= 0) masked_score(s[u], qp[u], kp, g.causal, &masked);
      ds[u] = masked ? 0.0f : expf(s[u] - qm[u]) * qiz[u] * (gv[u] - qD[u]);
    }
    for (int kk = 0; kk < kCols; ++kk) {
      float kv[NT];
#pragma unroll
      for (int q = 0; q < NT; ++q) kv[q] = sk[kk * (DHM + 1) + lane + 32 * q];
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        const float dk = __shfl_sync(0xffffffffu, ds[u], kk);
#pragma unroll
        for (int q = 0; q < NT; ++q) dq[u][q] += dk * kv[q];
      }
    }
  }

#pragma unroll
  for (int u = 0; u < kRowsPerWarp; ++u) {
    if (qp[u] < 0) continue;
    float* dst = dq_r + (r * g.L + qp[u]) * g.dh;
#pragma unroll
    for (int q = 0; q < NT; ++q) {
      const int d = lane + 32 * q;
      if (d < g.dh) dst[d] = dq[u][q];
    }
  }
}

// Key side: for the keys of this block's tile, dkh_r[r, j] = sum_i ds_rij q_i
// and dv_r[r, j] = sum_i P_rij dout_i (overwritten; either may be null).
template <int DHM, bool FULL>
__global__ void __launch_bounds__(kBlock) attn_dkv_kernel(AttnGeom g, const float* qk,
                                                          const float* khat, const float* v,
                                                          const float* dout, const float* rm,
                                                          const float* riz, const float* rD,
                                                          float* dkh_r, float* dv_r) {
  constexpr int NT = DHM / 32;
  extern __shared__ float smem[];
  float* sk = smem;                    // [kTile][DHM]  k_hat of this block's keys
  float* sv = sk + kTile * DHM;        // [kTile][DHM]  v of this block's keys
  float* sq = sv + kTile * DHM;        // [kCols][DHM + 1] queries
  float* sg = sq + kCols * (DHM + 1);  // [kCols][DHM + 1] dout of the queries
  __shared__ int skpos[kTile];
  __shared__ int sqpos[kCols];
  __shared__ float sm_m[kCols], sm_iz[kCols], sm_D[kCols];
  __shared__ int sinv[kMaxWindow];
  __shared__ int s_ninv;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t r = 0, c = 0, t = 0;
  if (FULL)
    t = blockIdx.x;
  else
    decode_block(g, &r, &c, &t);
  const int32_t* pr = FULL ? nullptr : g.perm + r * g.L;
  if (tid < kTile) skpos[tid] = tile_position<FULL>(g, pr, c, t, tid);
  if (!FULL && tid == 0) s_ninv = chunk_list(sinv, c, -1, g);
  __syncthreads();
  for (int e = tid; e < kTile * DHM; e += kBlock) {
    const int row = e / DHM, d = e % DHM;
    const int pos = skpos[row];
    const bool ok = pos >= 0 && d < g.dh;
    sk[e] = ok ? khat[int64_t(pos) * g.dh + d] : 0.0f;
    sv[e] = ok ? v[int64_t(pos) * g.ld + d] : 0.0f;
  }
  const int64_t q_lo = FULL && g.causal ? t * kTile : 0;
  const int64_t n_q = FULL ? g.L - q_lo : int64_t(s_ninv) * g.chunk;

  int kp[kRowsPerWarp];
  float dkh[kRowsPerWarp][NT], dvv[kRowsPerWarp][NT];
#pragma unroll
  for (int u = 0; u < kRowsPerWarp; ++u) {
    kp[u] = skpos[warp * kRowsPerWarp + u];
#pragma unroll
    for (int q = 0; q < NT; ++q) dkh[u][q] = dvv[u][q] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < n_q; k0 += kCols) {
    __syncthreads();
    if (tid < kCols) {
      const int pos = window_position<FULL>(g, pr, sinv, q_lo, k0 + tid, n_q);
      sqpos[tid] = pos;
      sm_m[tid] = pos >= 0 ? rm[pos] : 0.0f;
      sm_iz[tid] = pos >= 0 ? riz[pos] : 0.0f;
      sm_D[tid] = pos >= 0 ? rD[pos] : 0.0f;
    }
    __syncthreads();
    load_rows<DHM>(sq, DHM + 1, sg, DHM + 1, sqpos, qk, g.ld, dout, g.ld, g.dh, tid);
    __syncthreads();

    const int qp = sqpos[lane];
    float s[kRowsPerWarp], gv[kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) s[u] = gv[u] = 0.0f;
    const float* qrow = sq + lane * (DHM + 1);
    const float* grow = sg + lane * (DHM + 1);
    const float* krow = sk + warp * kRowsPerWarp * DHM;
    const float* vrow = sv + warp * kRowsPerWarp * DHM;
    for (int d = 0; d < g.dh; ++d) {
      const float qd = qrow[d], gd = grow[d];
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        s[u] += krow[u * DHM + d] * qd;
        gv[u] += vrow[u * DHM + d] * gd;
      }
    }
    const float qm = sm_m[lane], qiz = sm_iz[lane], qD = sm_D[lane];
    float P[kRowsPerWarp], ds[kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) {
      if (qp < 0 || kp[u] < 0) {
        P[u] = ds[u] = 0.0f;
        continue;
      }
      bool masked;
      const float sc = masked_score(s[u], qp, kp[u], g.causal, &masked);
      P[u] = expf(sc - qm) * qiz;
      ds[u] = masked ? 0.0f : P[u] * (gv[u] - qD);
    }
    for (int ll = 0; ll < kCols; ++ll) {
      float qv[NT], gq[NT];
#pragma unroll
      for (int q = 0; q < NT; ++q) {
        qv[q] = sq[ll * (DHM + 1) + lane + 32 * q];
        gq[q] = sg[ll * (DHM + 1) + lane + 32 * q];
      }
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        const float pl = __shfl_sync(0xffffffffu, P[u], ll);
        const float dl = __shfl_sync(0xffffffffu, ds[u], ll);
#pragma unroll
        for (int q = 0; q < NT; ++q) {
          dvv[u][q] += pl * gq[q];
          dkh[u][q] += dl * qv[q];
        }
      }
    }
  }

#pragma unroll
  for (int u = 0; u < kRowsPerWarp; ++u) {
    if (kp[u] < 0) continue;
    const int64_t base = (r * g.L + kp[u]) * g.dh;
#pragma unroll
    for (int q = 0; q < NT; ++q) {
      const int d = lane + 32 * q;
      if (d < g.dh) {
        if (dkh_r) dkh_r[base + d] = dkh[u][q];
        if (dv_r) dv_r[base + d] = dvv[u][q];
      }
    }
  }
}

// ---------------------------------------------------------------- launchers

size_t fwd_smem(int dhm, int tile) {
  return sizeof(float) * size_t(tile * dhm + tile * kCols + kCols * (dhm + 1) + kCols * dhm);
}
size_t bwd_smem(int dhm) { return sizeof(float) * size_t(2 * kTile * dhm + 2 * kCols * (dhm + 1)); }

int kernel_dhm(int dh) {
  if (dh <= 32) return 32;
  if (dh <= 64) return 64;
  return 128;
}

template <class Kernel>
void set_smem(Kernel k, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

unsigned attn_blocks(const AttnGeom& g, int rounds) {
  return unsigned(int64_t(rounds) * g.n_chunks * g.row_tiles);
}

// The forward's row tiles are fwd_tile<WARPS>() queries: g.row_tiles is
// recomputed for them, so decode_block and attn_blocks agree.
template <int DHM, bool FULL, int WARPS>
void launch_forward_tiles(AttnGeom g, int rounds, const float* qk, const float* khat,
                          const float* v, float* out, float* lse, cudaStream_t s) {
  constexpr int TILE = fwd_tile<WARPS>();
  g.row_tiles = ((FULL ? g.L : int64_t(g.chunk)) + TILE - 1) / TILE;
  const size_t smem = fwd_smem(DHM, TILE);
  set_smem(attn_forward_kernel<DHM, FULL, WARPS>, smem);
  attn_forward_kernel<DHM, FULL, WARPS><<<attn_blocks(g, rounds), 32 * WARPS, smem, s>>>(
      g, qk, khat, v, out, lse);
  CUDA_CHECK_LAUNCH("attn_forward_kernel");
}

// 64 queries per block; chunked attention with chunks of at most 32 slots
// uses 32.
template <int DHM, bool FULL>
void launch_forward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                    const float* v, float* out, float* lse, cudaStream_t s) {
  if constexpr (!FULL) {
    if (g.chunk <= fwd_tile<4>()) {
      launch_forward_tiles<DHM, FULL, 4>(g, rounds, qk, khat, v, out, lse, s);
      return;
    }
  }
  launch_forward_tiles<DHM, FULL, 8>(g, rounds, qk, khat, v, out, lse, s);
}

template <int DHM, bool FULL>
void launch_backward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                     const float* v, const float* dout, const float* rm, const float* riz,
                     const float* rD, float* dq_r, float* dkh_r, float* dv_r, cudaStream_t s) {
  const size_t smem = bwd_smem(DHM);
  if (dq_r) {
    set_smem(attn_dq_kernel<DHM, FULL>, smem);
    attn_dq_kernel<DHM, FULL><<<attn_blocks(g, rounds), kBlock, smem, s>>>(g, qk, khat, v, dout,
                                                                          rm, riz, rD, dq_r);
    CUDA_CHECK_LAUNCH("attn_dq_kernel");
  }
  set_smem(attn_dkv_kernel<DHM, FULL>, smem);
  attn_dkv_kernel<DHM, FULL><<<attn_blocks(g, rounds), kBlock, smem, s>>>(
      g, qk, khat, v, dout, rm, riz, rD, dkh_r, dv_r);
  CUDA_CHECK_LAUNCH("attn_dkv_kernel");
}

template <bool FULL>
void dispatch_forward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                      const float* v, float* out, float* lse, cudaStream_t s) {
  switch (kernel_dhm(g.dh)) {
    case 32: launch_forward<32, FULL>(g, rounds, qk, khat, v, out, lse, s); break;
    case 64: launch_forward<64, FULL>(g, rounds, qk, khat, v, out, lse, s); break;
    default: launch_forward<128, FULL>(g, rounds, qk, khat, v, out, lse, s); break;
  }
}

template <bool FULL>
void dispatch_backward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                       const float* v, const float* dout, const float* rm, const float* riz,
                       const float* rD, float* dq_r, float* dkh_r, float* dv_r, cudaStream_t s) {
  switch (kernel_dhm(g.dh)) {
    case 32:
      launch_backward<32, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r, dv_r, s);
      break;
    case 64:
      launch_backward<64, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r, dv_r, s);
      break;
    default:
      launch_backward<128, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r, dv_r, s);
      break;
  }
}

void check_common(const AttentionParams& p, const char* op) {
  check_attention_shape(p, op);
  if (p.dh > 128)
    throw ShapeError(std::string(op) + ": the CUDA kernels support dh <= 128, got " +
                     std::to_string(p.dh));
  if (p.L > int64_t(0x7fffffff))
    throw ShapeError(std::string(op) + ": L must fit in int32");
}

void check_chunked(const AttentionParams& p, const char* op) {
  check_common(p, op);
  check_chunked_attention_shape(p, op);
  if (p.chunks_before + p.chunks_after + 1 > kMaxWindow)
    throw ShapeError(std::string(op) + ": chunks_before + chunks_after + 1 must be <= " +
                     std::to_string(kMaxWindow));
}

AttnGeom make_geom(const AttentionParams& p, const int32_t* perm, bool full) {
  AttnGeom g;
  g.perm = perm;
  g.L = p.L;
  g.ld = p.ld;
  g.dh = p.dh;
  g.causal = p.causal;
  if (full) {
    g.chunk = 0;
    g.n_chunks = 1;
    g.before = g.after = 0;
    g.wrap = false;
    g.row_tiles = (p.L + kTile - 1) / kTile;
  } else {
    g.chunk = p.chunk;
    g.n_chunks = p.L / p.chunk;
    g.before = p.chunks_before;
    g.after = p.chunks_after;
    g.wrap = p.wrap;
    g.row_tiles = (p.chunk + kTile - 1) / kTile;
  }
  return g;
}

unsigned warp_rows_blocks(int64_t L) { return unsigned((L + kWarps - 1) / kWarps); }

// Scratch of one call: k_hat, norms, row statistics and the per-round gradients.
struct AttnScratch {
  float *khat, *norm, *rm, *riz, *rD, *dq_r, *dkh_r, *dv_r;
};

AttnScratch carve_scratch(Workspace& ws, int64_t L, int dh, int R, bool backward) {
  Carve carve;
  const size_t f = sizeof(float);
  const size_t per_round = f * size_t(R) * size_t(L) * size_t(dh);
  const size_t o_khat = carve.reserve(f * size_t(L) * size_t(dh));
  const size_t o_norm = carve.reserve(f * size_t(L));
  const size_t o_rm = carve.reserve(backward ? f * size_t(L) : 0);
  const size_t o_riz = carve.reserve(backward ? f * size_t(L) : 0);
  const size_t o_rD = carve.reserve(backward ? f * size_t(L) : 0);
  const size_t o_dq = carve.reserve(backward ? per_round : 0);
  const size_t o_dkh = carve.reserve(backward ? per_round : 0);
  const size_t o_dv = carve.reserve(backward ? per_round : 0);
  void* base = ws.get(carve.total());
  return AttnScratch{Carve::at<float>(base, o_khat), Carve::at<float>(base, o_norm),
                     Carve::at<float>(base, o_rm),   Carve::at<float>(base, o_riz),
                     Carve::at<float>(base, o_rD),   Carve::at<float>(base, o_dq),
                     Carve::at<float>(base, o_dkh),  Carve::at<float>(base, o_dv)};
}

void launch_normalise(const AttnScratch& sc, const float* qk, const AttentionParams& p,
                      cudaStream_t s) {
  normalise_keys_kernel<<<warp_rows_blocks(p.L), kBlock, 0, s>>>(sc.khat, sc.norm, qk, p.L, p.ld,
                                                                 p.dh);
  CUDA_CHECK_LAUNCH("normalise_keys_kernel");
}

// The shared backward: row statistics, query side, key side, finish.
template <bool FULL>
void run_backward(const AttnScratch& sc, const AttnGeom& g, int R, float* dqk, float* dv,
                  const float* dout, const float* out, const float* qk, const float* v,
                  const float* out_r, const float* lse, cudaStream_t s) {
  row_stats_kernel<<<warp_rows_blocks(g.L), kBlock, 0, s>>>(sc.rm, sc.riz, sc.rD, dout, out,
                                                            out_r, lse, g.L, g.ld, g.dh, R, FULL);
  CUDA_CHECK_LAUNCH("row_stats_kernel");
  dispatch_backward<FULL>(g, R, qk, sc.khat, v, dout, sc.rm, sc.riz, sc.rD,
                          dqk ? sc.dq_r : nullptr, dqk ? sc.dkh_r : nullptr,
                          dv ? sc.dv_r : nullptr, s);
  finish_backward_kernel<<<warp_rows_blocks(g.L), kBlock, 0, s>>>(
      dqk, dv, sc.dq_r, sc.dkh_r, sc.dv_r, sc.khat, sc.norm, g.L, g.ld, g.dh, R);
  CUDA_CHECK_LAUNCH("finish_backward_kernel");
}

}  // namespace
}  // namespace cuda

// ---------------------------------------------------------------- op entries

void CudaOps::chunked_attention_forward(float* out, float* out_r, float* lse, const float* qk,
                                        const float* v, const int32_t* perm,
                                        const AttentionParams& p) {
  cuda::check_chunked(p, "chunked_attention_forward");
  if (p.L == 0) return;
  const cuda::AttnScratch sc = cuda::carve_scratch(ws_, p.L, p.dh, p.n_rounds, false);
  cuda::launch_normalise(sc, qk, p, stream_);
  const cuda::AttnGeom g = cuda::make_geom(p, perm, false);
  cuda::dispatch_forward<false>(g, p.n_rounds, qk, sc.khat, v, out_r, lse, stream_);
  cuda::combine_rounds_kernel<<<cuda::grid_for(p.L * p.dh), cuda::kThreads, 0, stream_>>>(
      out, p.ld, out_r, lse, p.L, p.dh, p.n_rounds);
  CUDA_CHECK_LAUNCH("combine_rounds_kernel");
}

void CudaOps::chunked_attention_backward(float* dqk, float* dv, const float* dout,
                                         const float* qk, const float* v, const int32_t* perm,
                                         const float* out_r, const float* lse,
                                         const AttentionParams& p) {
  cuda::check_chunked(p, "chunked_attention_backward");
  if (p.L == 0 || (!dqk && !dv)) return;
  const cuda::AttnScratch sc = cuda::carve_scratch(ws_, p.L, p.dh, p.n_rounds, true);
  cuda::launch_normalise(sc, qk, p, stream_);
  const cuda::AttnGeom g = cuda::make_geom(p, perm, false);
  cuda::run_backward<false>(sc, g, p.n_rounds, dqk, dv, dout, nullptr, qk, v, out_r, lse,
                            stream_);
}

void CudaOps::full_attention_forward(float* out, float* lse, const float* qk, const float* v,
                                     const AttentionParams& p) {
  cuda::check_common(p, "full_attention_forward");
  if (p.L == 0) return;
  const cuda::AttnScratch sc = cuda::carve_scratch(ws_, p.L, p.dh, 1, false);
  cuda::launch_normalise(sc, qk, p, stream_);
  const cuda::AttnGeom g = cuda::make_geom(p, nullptr, true);
  cuda::dispatch_forward<true>(g, 1, qk, sc.khat, v, out, lse, stream_);
}

void CudaOps::full_attention_backward(float* dqk, float* dv, const float* dout, const float* out,
                                      const float* qk, const float* v, const float* lse,
                                      const AttentionParams& p) {
  cuda::check_common(p, "full_attention_backward");
  if (p.L == 0 || (!dqk && !dv)) return;
  const cuda::AttnScratch sc = cuda::carve_scratch(ws_, p.L, p.dh, 1, true);
  cuda::launch_normalise(sc, qk, p, stream_);
  const cuda::AttnGeom g = cuda::make_geom(p, nullptr, true);
  cuda::run_backward<true>(sc, g, 1, dqk, dv, dout, out, qk, v, nullptr, lse, stream_);
}

}  // namespace reformer
