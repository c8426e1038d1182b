// Attention backward on tensor cores (AttentionParams::precision == bf16):
// the query side and the key side of attention_backward.cu on mma.m16n8k16
// (bf16 operands, fp32 accumulators); row_stats_kernel before them and
// finish_backward_kernel after them (not with one round per call) are shared
// with the fp32 path.
//
// Both recompute the probabilities from the row statistics (m_i, 1 / z_i,
// D_i of row_stats_kernel), as the fp32 kernels (the exponential by the
// hardware ex2, fast_exp in attention_mma.cuh):
//   P_ij = exp(s_ij - m_i) / z_i,  dS_ij = P_ij (dout_i . v_j - D_i)
// (dS = 0 for masked pairs, whose scores are constants).
// The operands are staged once per call by mma_stage_kernel
// (attention_mma.cuh): q, k_hat, v and dout as bf16 [L, DH] by position
// (carve_scratch, 4 * 2 * L * DH bytes, read by every round), so every tile
// is rows gathered by position with cp.async, fragments come by ldmatrix
// (.trans for the operands used as B = [rows][d]: no transposed copies), and
// the outputs go by position in the epilogue.
//  - mma_dq_kernel: one block of 4 warps per (round, chunk, tile of 64
//    queries), as the forward; per pass of 64 window keys, dP = dO V^T and
//    S = Q K_hat^T on mma, dS in fp32 registers, dq += dS K_hat on mma (dS
//    rounded to bf16). V of pass i + 1 is in flight during S, dS and dq of
//    pass i, K_hat of pass i + 1 during dP of pass i + 1.
//  - mma_dkv_kernel: one block per (round, key chunk, tile of 64 keys); per
//    pass of 32 queries of the chunks whose window holds the keys,
//    S^T = K_hat Q^T and dP^T = V dO^T on mma, P^T and dS^T in fp32
//    registers, dv += P^T dO and dk_hat += dS^T Q on mma; q and dout of pass
//    i + 1 are copied (double buffer) during pass i.
// Each writes every element of its outputs once, in a fixed order: the
// backward is bitwise reproducible (no atomics). With one round per call
// (or full attention) both add into the op's dqk and dv directly instead
// (MmaBwdOut, attention_common.cuh): no per-round scratch, no finish pass.
//
// Work per call: 6 dh (query side: S, dP, dQ) + 8 dh (key side: S, dP, dV,
// dK) = 14 dh flops per (query, key) pair (pairs as in the forward,
// attention_mma_forward.cu: 60 GFLOP per head at L = 64K, R = 4, W = 128,
// dh = 128). Limits: S and dP are computed twice (once per side), and the
// key side holds two 16 x dh fp32 accumulators per warp (dh = 128: two
// blocks per SM).
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/attention_mma.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr int kDqKeys = 64;      // keys per pass of the query side
constexpr int kDkvQueries = 32;  // queries per pass of the key side

template <int DH>
constexpr size_t mma_dq_smem() {
  return sizeof(bf16) * size_t(2 * kMmaRows * mma_stride(DH) + 2 * kDqKeys * mma_stride(DH));
}

template <int DH>
constexpr size_t mma_dkv_smem() {
  return sizeof(bf16) * size_t(2 * kMmaRows * mma_stride(DH) +
                               4 * kDkvQueries * mma_stride(DH));
}

// Query side: dq_r[r, i, :] = sum_j dS_ij k_hat_j (overwritten), or, direct,
// dqk[i, :] += the same (MmaBwdOut, attention_common.cuh).
// st.dst: staged q, k_hat, v, dout.
template <int DH, bool FULL>
__global__ void __launch_bounds__(kMmaBlock, DH == 128 ? 3 : 4)
    mma_dq_kernel(AttnGeom g, MmaStage st, const float* rm, const float* riz, const float* rD,
                  MmaBwdOut o) {
  constexpr int S = mma_stride(DH);  // row stride of sQ, sG, sK, sV
  constexpr int NT = kDqKeys / 8;
  constexpr int OT = DH / 8;
  extern __shared__ float4 mma_dq_smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(mma_dq_smem4);  // [kMmaRows][S] queries
  bf16* sG = sQ + kMmaRows * S;                       // [kMmaRows][S] their dout
  bf16* sK = sG + kMmaRows * S;                       // [kDqKeys][S] k_hat
  bf16* sV = sK + kDqKeys * S;                        // [kDqKeys][S] v
  __shared__ int sqpos[kMmaRows];
  __shared__ __align__(8) int skpos[2][kDqKeys];  // positions of the keys of pass i (i % 2)
  __shared__ int swin[kMaxWindow];
  __shared__ int s_nwin;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  int64_t r, c, t;
  const int32_t* pr = mma_block_start<FULL>(g, +1, sqpos, swin, &s_nwin, &r, &c, &t);
  const int64_t n_keys = FULL ? (g.causal ? min(g.L, (t + 1) * kMmaRows) : g.L)
                              : int64_t(s_nwin) * g.chunk;
  // Staged rows are positions: the tile's (sqpos), the first key pass's
  // (from the permutation), then those of pass i + 1 (skpos[buf ^ 1],
  // written before the barrier that precedes its copies).
  auto q_row = [&](int i) -> int { return sqpos[i]; };
  auto first_key_row = [&](int i) -> int {
    return window_position<FULL>(g, pr, swin, 0, i, n_keys);
  };
  // cp.async groups in commit order: {Q, dO, V_0}, {K_0}, then {V_i+1},
  // {K_i+1} per pass i (empty past the last), so wait<1> before dP of pass
  // i leaves only K_i in flight and wait<1> before S only V_i+1.
  copy_rows<kMmaRows, DH>(sQ, S, st.dst[0], q_row, tid);
  copy_rows<kMmaRows, DH>(sG, S, st.dst[3], q_row, tid);
  copy_rows<kDqKeys, DH>(sV, S, st.dst[2], first_key_row, tid);
  cp_async_commit();
  copy_rows<kDqKeys, DH>(sK, S, st.dst[1], first_key_row, tid);
  cp_async_commit();
  if (tid < kDqKeys) skpos[0][tid] = window_position<FULL>(g, pr, swin, 0, tid, n_keys);
  const int qpos[2] = {sqpos[row0], sqpos[row0 + 8]};
  float qm[2], qiz[2], qD[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    qm[h] = qpos[h] >= 0 ? rm[qpos[h]] : 0.0f;
    qiz[h] = qpos[h] >= 0 ? riz[qpos[h]] : 0.0f;
    qD[h] = qpos[h] >= 0 ? rD[qpos[h]] : 0.0f;
  }
  float dq[OT][4];
#pragma unroll
  for (int ot = 0; ot < OT; ++ot) dq[ot][0] = dq[ot][1] = dq[ot][2] = dq[ot][3] = 0.0f;

  int buf = 0;
  for (int64_t k0 = 0; k0 < n_keys; k0 += kDqKeys, buf ^= 1) {
    const int64_t k1 = k0 + kDqKeys;
    cp_async_wait<1>();
    __syncthreads();  // Q, dO and V_i landed for every thread (skpos[buf] written)
    // Positions of pass i + 1, loaded during the mma, stored before the
    // barrier (skpos[buf ^ 1] was last read by the masks of pass i - 1).
    const int next_kpos =
        tid < kDqKeys ? window_position<FULL>(g, pr, swin, 0, k1 + tid, n_keys) : -1;
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
    ldsm_strip_nt<DH, NT>(dp, sG, S, 16 * warp, sV, S, lane);
    if (tid < kDqKeys) skpos[buf ^ 1][tid] = next_kpos;
    __syncthreads();  // sV consumed, positions of pass i + 1 written: fetch V_i+1
    const int* next_pos = skpos[buf ^ 1];
    auto next_row = [&](int i) -> int { return next_pos[i]; };
    if (k1 < n_keys) copy_rows<kDqKeys, DH>(sV, S, st.dst[2], next_row, tid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // K_i landed for every thread
    ldsm_strip_nt<DH, NT>(s, sQ, S, 16 * warp, sK, S, lane);
    // s becomes dS (0 for masked pairs and padding).
    const int* kpos = skpos[buf];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int2 kp2 = *reinterpret_cast<const int2*>(kpos + nt * 8 + 2 * t4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kp = e & 1 ? kp2.y : kp2.x, h = e >> 1;
        bool masked = true;
        if (kp >= 0 && qpos[h] >= 0) masked_score(s[nt][e], qpos[h], kp, g.causal, &masked);
        s[nt][e] = masked ? 0.0f : fast_exp(s[nt][e] - qm[h]) * qiz[h] * (dp[nt][e] - qD[h]);
      }
    }
    ldsm_strip_pv<DH, kDqKeys / 16>(dq, s, sK, S, lane);
    __syncthreads();  // sK consumed: fetch K_i+1
    if (k1 < n_keys) copy_rows<kDqKeys, DH>(sK, S, st.dst[1], next_row, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (qpos[h] < 0) continue;
    float* dst = o.direct ? o.dq + int64_t(qpos[h]) * g.ld : o.dq + (r * g.L + qpos[h]) * g.dh;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      const int d = ot * 8 + 2 * t4;
      if (o.direct)
        store_pair<true>(dst, d, g.dh, g.pairs, dq[ot][2 * h], dq[ot][2 * h + 1]);
      else
        store_pair(dst, d, g.dh, g.pairs, dq[ot][2 * h], dq[ot][2 * h + 1]);
    }
  }
}

// Key side: for the keys of this block's tile, dkh_r[r, j] = sum_i dS_ij q_i
// and dv_r[r, j] = sum_i P_ij dout_i (overwritten; either may be null), or,
// direct, dqk[j] += (dk_hat_j - k_hat_j (k_hat_j . dk_hat_j)) / |k_j| and
// dv[j] += dv_j (MmaBwdOut, attention_common.cuh). st.dst: staged q, k_hat,
// v, dout.
template <int DH, bool FULL>
__global__ void __launch_bounds__(kMmaBlock, DH == 128 ? 2 : DH == 64 ? 3 : 4)
    mma_dkv_kernel(AttnGeom g, MmaStage st, const float* rm, const float* riz, const float* rD,
                   MmaBwdOut o) {
  constexpr int S = mma_stride(DH);  // row stride of every tile
  constexpr int NT = kDkvQueries / 8;
  constexpr int OT = DH / 8;
  constexpr int QT = kDkvQueries * S;  // one query tile
  extern __shared__ float4 mma_dkv_smem4[];
  bf16* sK = reinterpret_cast<bf16*>(mma_dkv_smem4);  // [kMmaRows][S] this tile's k_hat
  bf16* sV = sK + kMmaRows * S;                        // [kMmaRows][S] this tile's v
  bf16* sQ = sV + kMmaRows * S;                        // [2][kDkvQueries][S] queries
  bf16* sG = sQ + 2 * QT;                              // [2][kDkvQueries][S] their dout
  __shared__ int skpos[kMmaRows];
  __shared__ __align__(8) int sqpos[2][kDkvQueries];  // pass i in [i % 2], as the stats
  __shared__ __align__(8) float sm_m[2][kDkvQueries], sm_iz[2][kDkvQueries],
      sm_D[2][kDkvQueries];
  __shared__ int sinv[kMaxWindow];
  __shared__ int s_ninv;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  int64_t r, c, t;
  const int32_t* pr = mma_block_start<FULL>(g, -1, skpos, sinv, &s_ninv, &r, &c, &t);
  const int64_t q_lo = FULL && g.causal ? t * kMmaRows : 0;
  const int64_t n_q = FULL ? g.L - q_lo : int64_t(s_ninv) * g.chunk;
  // Staged rows are positions: the tile's keys (skpos), the queries of each
  // pass from the permutation.
  auto k_row = [&](int i) -> int { return skpos[i]; };
  // Position and row statistics of query q (window element).
  struct QStats {
    int pos;
    float m, iz, D;
  };
  auto load_stats = [&](int64_t q) {
    const int pos = window_position<FULL>(g, pr, sinv, q_lo, q, n_q);
    return pos >= 0 ? QStats{pos, rm[pos], riz[pos], rD[pos]} : QStats{-1, 0.0f, 0.0f, 0.0f};
  };
  // Into buffer b, by thread q - q0 < 32.
  auto store_stats = [&](int b, const QStats& x) {
    sqpos[b][tid] = x.pos;
    sm_m[b][tid] = x.m;
    sm_iz[b][tid] = x.iz;
    sm_D[b][tid] = x.D;
  };
  // cp.async groups in commit order: {K, V, Q_0, dO_0}, then {Q_i+1, dO_i+1}
  // at the start of pass i (empty past the last): wait<1> leaves only pass
  // i + 1 in flight.
  copy_rows<kMmaRows, DH>(sK, S, st.dst[1], k_row, tid);
  copy_rows<kMmaRows, DH>(sV, S, st.dst[2], k_row, tid);
  auto q_rows = [&](int b, int64_t q0) {
    auto row = [&](int i) -> int {
      return window_position<FULL>(g, pr, sinv, q_lo, q0 + i, n_q);
    };
    copy_rows<kDkvQueries, DH>(sQ + b * QT, S, st.dst[0], row, tid);
    copy_rows<kDkvQueries, DH>(sG + b * QT, S, st.dst[3], row, tid);
  };
  q_rows(0, 0);
  cp_async_commit();
  if (tid < kDkvQueries) store_stats(0, load_stats(tid));
  const int kpos[2] = {skpos[row0], skpos[row0 + 8]};
  float dk[OT][4], dvv[OT][4];
#pragma unroll
  for (int ot = 0; ot < OT; ++ot)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[ot][e] = dvv[ot][e] = 0.0f;

  int buf = 0;
  for (int64_t q0 = 0; q0 < n_q; q0 += kDkvQueries, buf ^= 1) {
    // Buffer buf ^ 1 was consumed by pass i - 1 (the barrier ending it).
    const int64_t q1 = q0 + kDkvQueries;
    if (q1 < n_q) q_rows(buf ^ 1, q1);
    cp_async_commit();
    // Statistics of pass i + 1, loaded during the mma, stored at its end.
    const QStats next = tid < kDkvQueries ? load_stats(q1 + tid) : QStats{-1, 0.0f, 0.0f, 0.0f};
    cp_async_wait<1>();
    __syncthreads();  // pass i landed for every thread (stats of pass i written)
    const bf16* q_tile = sQ + buf * QT;
    const bf16* g_tile = sG + buf * QT;

    float stt[NT][4], dpt[NT][4];  // S^T and dP^T: rows = keys, columns = queries
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) stt[nt][e] = dpt[nt][e] = 0.0f;
    ldsm_strip_nt<DH, NT>(stt, sK, S, 16 * warp, q_tile, S, lane);
    ldsm_strip_nt<DH, NT>(dpt, sV, S, 16 * warp, g_tile, S, lane);
    // stt becomes P^T, dpt becomes dS^T (both 0 for padding; dS^T 0 when masked).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      // Columns nt * 8 + 2 t4 and + 1: positions and statistics in pairs.
      const int col = nt * 8 + 2 * t4;
      const int2 qp2 = *reinterpret_cast<const int2*>(&sqpos[buf][col]);
      const float2 m2 = *reinterpret_cast<const float2*>(&sm_m[buf][col]);
      const float2 iz2 = *reinterpret_cast<const float2*>(&sm_iz[buf][col]);
      const float2 D2 = *reinterpret_cast<const float2*>(&sm_D[buf][col]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool hi = e & 1;
        const int qp = hi ? qp2.y : qp2.x, kp = kpos[e >> 1];
        bool masked;
        const float sc = masked_score(stt[nt][e], qp, kp, g.causal, &masked);
        const float p = fast_exp(sc - (hi ? m2.y : m2.x)) * (hi ? iz2.y : iz2.x);
        const bool valid = qp >= 0 && kp >= 0;
        stt[nt][e] = valid ? p : 0.0f;
        dpt[nt][e] = valid && !masked ? p * (dpt[nt][e] - (hi ? D2.y : D2.x)) : 0.0f;
      }
    }
    ldsm_strip_pv<DH, kDkvQueries / 16>(dvv, stt, g_tile, S, lane);
    ldsm_strip_pv<DH, kDkvQueries / 16>(dk, dpt, q_tile, S, lane);
    if (q1 < n_q && tid < kDkvQueries) store_stats(buf ^ 1, next);
    __syncthreads();  // buffer buf consumed
  }
  cp_async_wait<0>();

  if (o.direct) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // k_hat . dk_hat over the row: this lane's columns, then the 4 lanes
      // (t4) that share the row. Every lane shuffles; padding rows add 0.
      // k_hat_j = qk_j / |k_j| as the staging computed it.
      const int pos = kpos[h];
      const float* q = st.src[0] + int64_t(pos < 0 ? 0 : pos) * st.lds[0];
      const float n = o.dkh && pos >= 0 ? o.norm[pos] : 1.0f;
      float proj = 0.0f;
      if (o.dkh && pos >= 0) {
#pragma unroll
        for (int ot = 0; ot < OT; ++ot)
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int d = ot * 8 + 2 * t4 + u;
            if (d < g.dh) proj += (q[d] / n) * dk[ot][2 * h + u];
          }
      }
      proj += __shfl_xor_sync(0xffffffffu, proj, 1);
      proj += __shfl_xor_sync(0xffffffffu, proj, 2);
      if (pos < 0) continue;
      const float inv_norm = 1.0f / n;
      float* dqk = o.dkh ? o.dkh + int64_t(pos) * g.ld : nullptr;
      float* dv = o.dv ? o.dv + int64_t(pos) * g.ld : nullptr;
#pragma unroll
      for (int ot = 0; ot < OT; ++ot) {
        const int d = ot * 8 + 2 * t4;
        // q[d + 1] only where it exists (odd dh: the pair's second column is past it).
        const float q0 = d < g.dh ? q[d] : 0.0f, q1 = d + 1 < g.dh ? q[d + 1] : 0.0f;
        if (dqk)
          store_pair<true>(dqk, d, g.dh, g.pairs, (dk[ot][2 * h] - (q0 / n) * proj) * inv_norm,
                           (dk[ot][2 * h + 1] - (q1 / n) * proj) * inv_norm);
        if (dv) store_pair<true>(dv, d, g.dh, g.pairs, dvv[ot][2 * h], dvv[ot][2 * h + 1]);
      }
    }
    return;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (kpos[h] < 0) continue;
    const int64_t base = (r * g.L + kpos[h]) * g.dh;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      const int d = ot * 8 + 2 * t4;
      if (o.dkh) store_pair(o.dkh + base, d, g.dh, g.pairs, dk[ot][2 * h], dk[ot][2 * h + 1]);
      if (o.dv) store_pair(o.dv + base, d, g.dh, g.pairs, dvv[ot][2 * h], dvv[ot][2 * h + 1]);
    }
  }
}

template <int DH, bool FULL>
void launch_mma_backward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                         const float* v, const float* dout, const float* rm, const float* riz,
                         const float* rD, const MmaBwdOut& o, void* stage, cudaStream_t s) {
  // Direct: k_hat staged from qk, |k| into o.norm; otherwise from khat.
  MmaStage st{{qk, khat, v, dout}, {g.ld, g.dh, g.ld, g.ld}, {}, kMmaBwdStaged, o.direct,
              o.direct ? o.norm : nullptr};
  launch_mma_stage<DH>(g, stage, &st, s);
  const unsigned blocks = attn_blocks(g, rounds);
  if (o.dq) {
    constexpr size_t smem = mma_dq_smem<DH>();
    set_mma_smem(mma_dq_kernel<DH, FULL>, smem);
    mma_dq_kernel<DH, FULL><<<blocks, kMmaBlock, smem, s>>>(g, st, rm, riz, rD, o);
    CUDA_CHECK_LAUNCH("mma_dq_kernel");
  }
  if (o.dkh || o.dv) {
    constexpr size_t smem = mma_dkv_smem<DH>();
    set_mma_smem(mma_dkv_kernel<DH, FULL>, smem);
    mma_dkv_kernel<DH, FULL><<<blocks, kMmaBlock, smem, s>>>(g, st, rm, riz, rD, o);
    CUDA_CHECK_LAUNCH("mma_dkv_kernel");
  }
}

template <bool FULL>
void dispatch_mma_backward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                           const float* v, const float* dout, const float* rm, const float* riz,
                           const float* rD, const MmaBwdOut& o, void* stage, cudaStream_t s) {
  switch (kernel_dhm(g.dh)) {
    case 32:
      launch_mma_backward<32, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, o, stage, s);
      break;
    case 64:
      launch_mma_backward<64, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, o, stage, s);
      break;
    default:
      launch_mma_backward<128, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, o, stage, s);
      break;
  }
}

}  // namespace

void mma_attention_backward(const AttentionParams& p, const int32_t* perm, bool full,
                            const float* qk, const float* khat, const float* v, const float* dout,
                            const float* rm, const float* riz, const float* rD,
                            const MmaBwdOut& o, void* stage, cudaStream_t s) {
  AttnGeom g = mma_geom(p, perm, full);
  g.pairs = mma_pairs(g.dh, o.direct ? g.ld : g.dh, {o.dq, o.dkh, o.dv});
  if (full)
    dispatch_mma_backward<true>(g, 1, qk, khat, v, dout, rm, riz, rD, o, stage, s);
  else
    dispatch_mma_backward<false>(g, p.n_rounds, qk, khat, v, dout, rm, riz, rD, o, stage, s);
}

}  // namespace cuda
}  // namespace reformer
