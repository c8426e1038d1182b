// Attention backward on tensor cores (AttentionParams::precision == bf16):
// the query side and the key side of attention_backward.cu on mma.m16n8k16
// (bf16 operands, fp32 accumulators); the staging before them also writes
// row_stats_kernel's statistics (mma_stage_kernel), and finish_rounds_kernel
// after them (not with one round per call) sums their bf16 per-round rows.
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
//  - mma_dq_walk_kernel, mma_dkv_walk_kernel: the same two sides for the
//    Reformer's look-one-back window (chunks of 64, mma_walks), one block per
//    run of g.walk consecutive chunks that keeps the tiles two neighbouring
//    chunks share in shared memory: each chunk's rows are gathered once per
//    run instead of twice. A direct backward's walk (below).
//  - mma_bwd_walk_kernel: both sides in one pass for the look-one-back
//    window of several rounds (per-round bf16 outputs), one block of 8 warps
//    per run of g.walk consecutive chunks (mma_bwd_walk): S and dP once per
//    window, dS and P through shared memory, dq of each chunk and dk, dv of
//    the chunk before completed in the same block (below).
// Each writes every element of its outputs once, in a fixed order: the
// backward is bitwise reproducible (no atomics). The per-round outputs are
// bf16 rows, a quad's four lanes filling one 32-byte sector per store
// (store_rows_bf16). With one round per call (or full attention) the
// kernels write or add into the op's dqk and dv directly instead
// (MmaBwdOut::add; fp32, two
// columns per 8-byte access: store_row; MmaBwdOut, attention_common.cuh): no
// per-round scratch, no finish pass.
//
// Work per call: the two-sided kernels 6 dh (query side: S, dP, dQ) + 8 dh
// (key side: S, dP, dV, dK) = 14 dh flops per (query, key) pair, the
// one-pass walk 10 dh (S, dP, dQ, dV, dK: the model's count, op_flops.h;
// 43 GFLOP per head at L = 64K, R = 4, W = 128, dh = 128). Limits of the
// walk at 64K (Nsight Compute; bench/RESULTS.md, 2026-12-02 (sixteenth)):
// 240 us a head-call, one block of 8 warps per SM at 255 registers (the dk
// and dv accumulators of two chunks take 128 a thread at dh = 128); its
// warps wait mostly on fixed-latency dependencies and ldmatrix results,
// then at the step's first barrier (stall samples). Its masks and
// copies stay masked_score's and copy_rows': the walk_score masks, row
// copies computed once and the accumulators zeroed when written cut its
// instructions by 4 to 11% and made it 1 to 3% slower (2026-12-02
// (fifteenth)); dv rows out through shared memory, copied by the group
// that writes nothing that step, left its time unchanged (sixteenth).
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

// Query side, one pass: s (S of this thread's two rows against 8 NT keys,
// positions kpos; -1 = none) becomes dS from dp (dP) and the rows' statistics
// (0 for masked pairs and padding).
// kWalk: the walks' masks (walk_score; a padded row's q, dout and
// statistics are 0, so its dS is 0 unmasked too).
template <int NT, bool kWalk = false>
__device__ __forceinline__ void dq_scores(float (*s)[4], float (*dp)[4], const int* kpos,
                                          const int* qpos, const float* qm, const float* qiz,
                                          const float* qD, bool causal, int t4) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int2 kp2 = *reinterpret_cast<const int2*>(kpos + nt * 8 + 2 * t4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kp = e & 1 ? kp2.y : kp2.x, h = e >> 1;
      bool masked = true;
      if (kWalk)
        walk_score<true>(s[nt][e], qpos[h], kp, causal, &masked);
      else if (kp >= 0 && qpos[h] >= 0)
        masked_score(s[nt][e], qpos[h], kp, causal, &masked);
      s[nt][e] = masked ? 0.0f : fast_exp(s[nt][e] - qm[h]) * qiz[h] * (dp[nt][e] - qD[h]);
    }
  }
}

// Rows pos[0], pos[1] (this thread's two rows of a 16-row strip; -1: none)
// of round r's bf16 rows out_r [R, L, DH], columns d0 .. d0 + 8 OT - 1, from
// the strip's accumulators (store_rows_bf16; every lane of the warp calls
// it).
template <int DH, int OT>
__device__ __forceinline__ void write_round_rows(bf16* out_r, const AttnGeom& g, int64_t r,
                                                 const int* pos, float (*acc)[4], int lane,
                                                 int d0) {
  bf16* rows[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    rows[h] = pos[h] < 0 ? nullptr : out_r + (r * g.L + pos[h]) * DH + d0;
  store_rows_bf16<OT>(rows, acc, lane);
}

// dq of this thread's two rows, columns d0 .. d0 + 8 OT - 1, to the op's
// output: dq_r [R, L, DH] row r * L + qpos in bf16 (overwritten) or, direct,
// dqk [L, ld] row qpos (added; written without o.add). kDirect false: a
// kernel that never writes directly (no registers spent on that path).
template <int DH, int OT, bool kDirect = true>
__device__ __forceinline__ void dq_write(const AttnGeom& g, const MmaBwdOut& o, int64_t r,
                                         const int* qpos, float (*dq)[4], int lane, int d0) {
  if (!kDirect || !o.direct) {
    write_round_rows<DH, OT>(o.dq_r, g, r, qpos, dq, lane, d0);
    return;
  }
  const int t4 = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (qpos[h] < 0) continue;
    float v[OT][2];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      v[ot][0] = dq[ot][2 * h];
      v[ot][1] = dq[ot][2 * h + 1];
    }
    store_row<OT>(o.dq + int64_t(qpos[h]) * g.ld + d0, 2 * t4, g.dh - d0, g.pairs, v, o.add);
  }
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
    dq_scores<NT>(s, dp, skpos[buf], qpos, qm, qiz, qD, g.causal, t4);
    ldsm_strip_pv<DH, kDqKeys / 16>(dq, s, sK, S, lane);
    __syncthreads();  // sK consumed: fetch K_i+1
    if (k1 < n_keys) copy_rows<kDqKeys, DH>(sK, S, st.dst[1], next_row, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();
  dq_write<DH, OT>(g, o, r, qpos, dq, lane, 0);
}

// Key side, one pass of kDkvQueries queries (q_tile / g_tile: their staged q
// and dout rows; positions and statistics qp, qm, qiz, qD by column): S^T
// and dP^T of this warp's 16 keys (positions kpos of its two rows), P^T and
// dS^T in fp32 registers (both 0 for padding; dS^T 0 when masked), then
// dv += P^T dO and dk_hat += dS^T Q. kWalk: the walks' masks (walk_score;
// a padded query's q, dout and statistics are 0, so its P and dS are 0).
template <int DH, bool kWalk = false>
__device__ __forceinline__ void dkv_pass(float (*dk)[4], float (*dvv)[4], const bf16* sK,
                                         const bf16* sV, const bf16* q_tile, const bf16* g_tile,
                                         const int* qp_, const float* qm_, const float* qiz_,
                                         const float* qD_, const int* kpos, bool causal,
                                         int warp, int lane) {
  constexpr int S = mma_stride(DH);
  constexpr int NT = kDkvQueries / 8;
  const int t4 = lane & 3;
  float stt[NT][4], dpt[NT][4];  // S^T and dP^T: rows = keys, columns = queries
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) stt[nt][e] = dpt[nt][e] = 0.0f;
  ldsm_strip_nt<DH, NT>(stt, sK, S, 16 * warp, q_tile, S, lane);
  ldsm_strip_nt<DH, NT>(dpt, sV, S, 16 * warp, g_tile, S, lane);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    // Columns nt * 8 + 2 t4 and + 1: positions and statistics in pairs.
    const int col = nt * 8 + 2 * t4;
    const int2 qp2 = *reinterpret_cast<const int2*>(&qp_[col]);
    const float2 m2 = *reinterpret_cast<const float2*>(&qm_[col]);
    const float2 iz2 = *reinterpret_cast<const float2*>(&qiz_[col]);
    const float2 D2 = *reinterpret_cast<const float2*>(&qD_[col]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool hi = e & 1;
      const int qp = hi ? qp2.y : qp2.x, kp = kpos[e >> 1];
      bool masked;
      const float sc = kWalk ? walk_score<true>(stt[nt][e], qp, kp, causal, &masked)
                             : masked_score(stt[nt][e], qp, kp, causal, &masked);
      const float p = fast_exp(sc - (hi ? m2.y : m2.x)) * (hi ? iz2.y : iz2.x);
      const bool valid = kWalk || (qp >= 0 && kp >= 0);
      stt[nt][e] = valid ? p : 0.0f;
      dpt[nt][e] = valid && !masked ? p * (dpt[nt][e] - (hi ? D2.y : D2.x)) : 0.0f;
    }
  }
  ldsm_strip_pv<DH, kDkvQueries / 16>(dvv, stt, g_tile, S, lane);
  ldsm_strip_pv<DH, kDkvQueries / 16>(dk, dpt, q_tile, S, lane);
}

// dk_hat and dv of this thread's two key rows (positions kpos) to the op's
// outputs: dkh_r, dv_r [R, L, DH] row r * L + kpos in bf16 (overwritten), or, direct,
// dqk [L, ld] += (dk_hat - k_hat (k_hat . dk_hat)) / |k| and dv += dv
// (without o.add: dv written, and dqk written unless the query side wrote
// its rows first). kDirect as dq_write's.
template <int DH, bool kDirect = true>
__device__ __forceinline__ void dkv_write(const AttnGeom& g, const MmaStage& st,
                                          const MmaBwdOut& o, int64_t r, const int* kpos,
                                          float (*dk)[4], float (*dvv)[4], int t4) {
  constexpr int OT = DH / 8;
  if (kDirect && o.direct) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // k_hat . dk_hat over the row: this lane's columns, then the 4 lanes
      // (t4) that share the row. Every lane shuffles; padding rows add 0.
      // k_hat_j = qk_j / |k_j| as the staging computed it: from the staged
      // query row, qk_j rounded to bf16 (no fp32 qk read, none kept).
      const int pos = kpos[h];
      const float n = o.dkh && pos >= 0 ? o.norm[pos] : 1.0f;
      float kh[OT][2] = {};
      float proj = 0.0f;
      if (o.dkh && pos >= 0) {
        load_row<OT>(kh, st.dst[0] + int64_t(pos) * DH, 2 * t4);
#pragma unroll
        for (int ot = 0; ot < OT; ++ot)
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            kh[ot][u] /= n;
            proj += kh[ot][u] * dk[ot][2 * h + u];
          }
      }
      proj += __shfl_xor_sync(0xffffffffu, proj, 1);
      proj += __shfl_xor_sync(0xffffffffu, proj, 2);
      if (pos < 0) continue;
      float v[OT][2];
      if (o.dkh) {
        const float inv_norm = 1.0f / n;
#pragma unroll
        for (int ot = 0; ot < OT; ++ot)
#pragma unroll
          for (int u = 0; u < 2; ++u) v[ot][u] = (dk[ot][2 * h + u] - kh[ot][u] * proj) * inv_norm;
        // Onto the query side's rows where it wrote them first.
        store_row<OT>(o.dkh + int64_t(pos) * g.ld, 2 * t4, g.dh, g.pairs, v, o.add || o.dq);
      }
      if (o.dv) {
#pragma unroll
        for (int ot = 0; ot < OT; ++ot)
#pragma unroll
          for (int u = 0; u < 2; ++u) v[ot][u] = dvv[ot][2 * h + u];
        store_row<OT>(o.dv + int64_t(pos) * g.ld, 2 * t4, g.dh, g.pairs, v, o.add);
      }
    }
    return;
  }
  const int lane = threadIdx.x & 31;
  bf16* krows[2];
  bf16* vrows[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t base = (r * g.L + kpos[h]) * DH;
    krows[h] = kpos[h] >= 0 && o.dkh_r ? o.dkh_r + base : nullptr;
    vrows[h] = kpos[h] >= 0 && o.dv_r ? o.dv_r + base : nullptr;
  }
  if (o.dkh_r) store_rows_bf16<OT>(krows, dk, lane);
  if (o.dv_r) store_rows_bf16<OT>(vrows, dvv, lane);
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
    dkv_pass<DH>(dk, dvv, sK, sV, sQ + buf * QT, sG + buf * QT, sqpos[buf], sm_m[buf],
                 sm_iz[buf], sm_D[buf], kpos, g.causal, warp, lane);
    if (q1 < n_q && tid < kDkvQueries) store_stats(buf ^ 1, next);
    __syncthreads();  // buffer buf consumed
  }
  cp_async_wait<0>();
  dkv_write<DH>(g, st, o, r, kpos, dk, dvv, t4);
}

// ---- two-sided walking kernels: chunks of kMmaRows slots under the
// look-one-back window (chunks_before 1, chunks_after 0, at least two
// chunks; mma_walks in attention_mma.cuh), one block per (round, run of
// g.walk consecutive chunks), as the walking forward
// (attention_mma_forward.cu). Each chunk's staged rows are gathered once per
// run instead of twice; the tiles and sums are the general kernels' in the
// same order, and so are the results (the masks by walk_score, the same
// weights). A direct backward (one round: fp32 adds into dqk and
// dv) runs these rather than the one-pass walk below: their two 4-warp
// blocks per SM hide the adds' read-modify-write latency, which stalls the
// one-pass walk's single block (the leanest 1M layout trained at 160.0K
// tokens/s with it against 171.9K with these, bench/RESULTS.md).

template <int DH>
constexpr size_t mma_walk_bwd_smem() {
  return sizeof(bf16) * size_t(6 * kMmaRows * mma_stride(DH));
}

// Query side, walking up the run: for chunk c the key tiles of c - 1 (slot
// P, kept from the previous chunk) and c (slot N). K and V of c + 1 go into
// slot P once c's first tile has used it; Q and dout of c + 1 into their one
// buffer once c's second tile has computed S and dP from them.
template <int DH>
__global__ void __launch_bounds__(kMmaBlock, 2)
    mma_dq_walk_kernel(AttnGeom g, MmaStage st, const float* rm, const float* riz,
                       const float* rD, MmaBwdOut o) {
  constexpr int S = mma_stride(DH);
  constexpr int NT = kMmaRows / 8;
  constexpr int OT = DH / 8;
  constexpr int T = kMmaRows * S;  // one tile
  extern __shared__ float4 mma_dq_walk_smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(mma_dq_walk_smem4);  // [kMmaRows][S] queries of c
  bf16* sG = sQ + T;                                       // [kMmaRows][S] their dout
  bf16* sK = sG + T;                                       // [2][kMmaRows][S] slots
  bf16* sV = sK + 2 * T;                                   // [2][kMmaRows][S] slots
  // Positions of the walk's chunks: chunk index i (-1: the one before the
  // run's first) in spos[(i + 1) % 3].
  __shared__ __align__(8) int spos[3][kMmaRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  const int64_t runs = (g.n_chunks + g.walk - 1) / g.walk;
  const int64_t r = blockIdx.x / runs, c0 = (blockIdx.x % runs) * g.walk;
  const int n = int(min(int64_t(g.walk), g.n_chunks - c0));
  const int32_t* pr = g.perm + r * g.L;
  const int64_t first_prev = c0 > 0 ? c0 - 1 : g.wrap ? g.n_chunks - 1 : -1;
  if (tid < kMmaRows) {
    spos[0][tid] = first_prev < 0 ? -1 : pr[first_prev * kMmaRows + tid];
    spos[1][tid] = pr[c0 * kMmaRows + tid];
  }
  __syncthreads();
  auto rows_of = [](const int* pos) { return [pos](int i) -> int { return pos[i]; }; };
  using Rows = RowCopies<kMmaRows, DH>;
  {
    const Rows before(rows_of(spos[0]), tid), first(rows_of(spos[1]), tid);
    before.copy(sK, S, st.dst[1]);
    before.copy(sV, S, st.dst[2]);
    first.copy(sQ, S, st.dst[0]);
    first.copy(sG, S, st.dst[3]);
    first.copy(sK + T, S, st.dst[1]);
    first.copy(sV + T, S, st.dst[2]);
  }
  cp_async_commit();

  for (int i = 0; i < n; ++i) {
    const int P = i & 1, N = P ^ 1;  // slots of chunks c - 1 (and c + 1), c
    const bool more = i + 1 < n;
    const int* prev_pos = spos[i % 3];
    const int* cur_pos = spos[(i + 1) % 3];
    int* next_pos = spos[(i + 2) % 3];  // last read as chunk c - 2's keys
    if (tid < kMmaRows) next_pos[tid] = more ? pr[(c0 + i + 1) * kMmaRows + tid] : -1;
    // This thread's rows and their statistics, loaded while the copies land.
    const int qpos[2] = {cur_pos[row0], cur_pos[row0 + 8]};
    float qm[2], qiz[2], qD[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      qm[h] = qpos[h] >= 0 ? rm[qpos[h]] : 0.0f;
      qiz[h] = qpos[h] >= 0 ? riz[qpos[h]] : 0.0f;
      qD[h] = qpos[h] >= 0 ? rD[qpos[h]] : 0.0f;
    }
    cp_async_wait<0>();
    __syncthreads();  // Q, dout of c, both slots and the positions of c + 1 in place
    const Rows next(rows_of(next_pos), tid);  // chunk c + 1's rows, for K, V, Q and dout
    float dq[OT][4];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) dq[ot][0] = dq[ot][1] = dq[ot][2] = dq[ot][3] = 0.0f;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const int slot = tile == 0 ? P : N;
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
      ldsm_strip_nt<DH, NT>(dp, sG, S, 16 * warp, sV + slot * T, S, lane);
      ldsm_strip_nt<DH, NT>(s, sQ, S, 16 * warp, sK + slot * T, S, lane);
      if (tile == 1) {
        __syncthreads();  // Q and dout of c consumed: fetch those of c + 1
        if (more) {
          next.copy(sQ, S, st.dst[0]);
          next.copy(sG, S, st.dst[3]);
        }
        cp_async_commit();
      }
      dq_scores<NT, true>(s, dp, tile == 0 ? prev_pos : cur_pos, qpos, qm, qiz, qD, g.causal,
                          t4);
      ldsm_strip_pv<DH, kMmaRows / 16>(dq, s, sK + slot * T, S, lane);
      if (tile == 0) {
        __syncthreads();  // K and V of c - 1 consumed: fetch those of c + 1
        if (more) {
          next.copy(sK + P * T, S, st.dst[1]);
          next.copy(sV + P * T, S, st.dst[2]);
        }
        cp_async_commit();
      }
    }
    dq_write<DH, OT>(g, o, r, qpos, dq, lane, 0);
  }
  cp_async_wait<0>();
}

// Key side, walking down the run: for key chunk c the queries of c + 1 (the
// chunk whose window also holds c; none at the last chunk without wrap),
// then those of c, as chunk_list (sign -1) orders them. Q and dout of c + 1
// are kept from the step before (they were that step's own chunk), those of
// c - 1 go into the freed query slot once c + 1's passes are done; K and V
// of c - 1 once c's dk and dv are written. Statistics by query slot.
template <int DH>
__global__ void __launch_bounds__(kMmaBlock, 2)
    mma_dkv_walk_kernel(AttnGeom g, MmaStage st, const float* rm, const float* riz,
                        const float* rD, MmaBwdOut o) {
  constexpr int S = mma_stride(DH);
  constexpr int OT = DH / 8;
  constexpr int T = kMmaRows * S;  // one tile
  extern __shared__ float4 mma_dkv_walk_smem4[];
  bf16* sK = reinterpret_cast<bf16*>(mma_dkv_walk_smem4);  // [kMmaRows][S] keys of c
  bf16* sV = sK + T;                                        // [kMmaRows][S] their v
  bf16* sQ = sV + T;                                        // [2][kMmaRows][S] query slots
  bf16* sG = sQ + 2 * T;                                    // [2][kMmaRows][S] their dout
  __shared__ __align__(8) int sqpos[2][kMmaRows];  // by query slot
  __shared__ __align__(8) float sm_m[2][kMmaRows], sm_iz[2][kMmaRows], sm_D[2][kMmaRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  const int64_t runs = (g.n_chunks + g.walk - 1) / g.walk;
  const int64_t r = blockIdx.x / runs, c_lo = (blockIdx.x % runs) * g.walk;
  const int n = int(min(int64_t(g.walk), g.n_chunks - c_lo));
  const int64_t c_hi = c_lo + n - 1;
  const int32_t* pr = g.perm + r * g.L;
  // Chunk x's queries: slot (c_hi + 1 - x) & 1 (c_hi + 1: the chunk after
  // the run, wrapped or none).
  const int64_t after_hi = c_hi + 1 < g.n_chunks ? c_hi + 1 : g.wrap ? 0 : -1;
  // Position and statistics of slot x of chunk kc (-1: none), into query slot b.
  auto load_query = [&](int b, int64_t kc) {
    const int pos = kc < 0 ? -1 : pr[kc * kMmaRows + tid];
    sqpos[b][tid] = pos;
    sm_m[b][tid] = pos >= 0 ? rm[pos] : 0.0f;
    sm_iz[b][tid] = pos >= 0 ? riz[pos] : 0.0f;
    sm_D[b][tid] = pos >= 0 ? rD[pos] : 0.0f;
  };
  if (tid < kMmaRows) {
    load_query(0, after_hi);
    load_query(1, c_hi);
  }
  __syncthreads();
  auto rows_of = [](const int* pos) { return [pos](int i) -> int { return pos[i]; }; };
  using Rows = RowCopies<kMmaRows, DH>;
  {
    const Rows after(rows_of(sqpos[0]), tid), last(rows_of(sqpos[1]), tid);
    last.copy(sK, S, st.dst[1]);
    last.copy(sV, S, st.dst[2]);
    after.copy(sQ, S, st.dst[0]);
    after.copy(sG, S, st.dst[3]);
    last.copy(sQ + T, S, st.dst[0]);
    last.copy(sG + T, S, st.dst[3]);
  }
  cp_async_commit();

  for (int j = 0; j < n; ++j) {
    const int64_t c = c_hi - j;
    const int A = j & 1, B = A ^ 1;  // query slots of chunks c + 1 (then c - 1), c
    const bool more = j + 1 < n;
    const bool has_after = j > 0 || after_hi >= 0;
    cp_async_wait<0>();
    __syncthreads();  // K, V of c, both query slots and their statistics in place
    const int kpos[2] = {sqpos[B][row0], sqpos[B][row0 + 8]};
    float dk[OT][4], dvv[OT][4];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[ot][e] = dvv[ot][e] = 0.0f;
    if (has_after) {
      for (int q0 = 0; q0 < kMmaRows; q0 += kDkvQueries)
        dkv_pass<DH, true>(dk, dvv, sK, sV, sQ + A * T + q0 * S, sG + A * T + q0 * S,
                           sqpos[A] + q0, sm_m[A] + q0, sm_iz[A] + q0, sm_D[A] + q0, kpos,
                           g.causal, warp, lane);
    }
    __syncthreads();  // slot A consumed: chunk c - 1's queries go there
    if (more && tid < kMmaRows) load_query(A, c - 1);
    __syncthreads();  // its positions written
    if (more) {  // chunk c - 1's q and dout
      const Rows before(rows_of(sqpos[A]), tid);
      before.copy(sQ + A * T, S, st.dst[0]);
      before.copy(sG + A * T, S, st.dst[3]);
    }
    cp_async_commit();
    for (int q0 = 0; q0 < kMmaRows; q0 += kDkvQueries)
      dkv_pass<DH, true>(dk, dvv, sK, sV, sQ + B * T + q0 * S, sG + B * T + q0 * S,
                         sqpos[B] + q0, sm_m[B] + q0, sm_iz[B] + q0, sm_D[B] + q0, kpos,
                         g.causal, warp, lane);
    dkv_write<DH>(g, st, o, r, kpos, dk, dvv, t4);
    __syncthreads();  // K and V of c consumed: fetch those of c - 1
    if (more) {  // its k_hat and v (the rows looked up again: fewer registers held)
      const Rows before(rows_of(sqpos[A]), tid);
      before.copy(sK, S, st.dst[1]);
      before.copy(sV, S, st.dst[2]);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
}

// ---- the walking backward: chunks of kMmaRows slots under the look-one-back
// window (chunks_before 1, chunks_after 0, at least two chunks; mma_walks in
// attention_mma.cuh), dq, dk_hat and dv in one pass per window. One block of
// kBwdWarps warps per (round, run of g.walk consecutive chunks) walks its
// chunks up; at query chunk c (window: the keys of c - 1, then of c):
//  1. S and dP of the window (64 queries x 128 keys): warp w takes the 32
//     queries of half w % 2 and the 32 keys of quarter w / 2 (quarters 0, 1:
//     chunk c - 1; 2, 3: chunk c), computes P and dS in fp32 registers and
//     leaves them in shared memory as bf16 (sP, sdS: [query][key], the keys
//     of c - 1 in columns 0-63, those of c in 64-127);
//  2. dq of c = dS K over the 128 keys (warp w: the 16 m queries of group
//     w % (4 / m) and the columns of group w / (4 / m), m = kBwdDqStrips),
//     written; dk_hat += dS^T Q and dv += P^T dO for the keys of the warp's
//     group w / 4 (warp w: the 32 keys of half w % 2 of the group's chunk,
//     the columns of half (w / 2) % 2): one group holds chunk c - 1's (their
//     second and last contribution: written now), the other starts chunk
//     c's (its own queries). The groups trade roles at every chunk.
// Warp tiles of two 16-row strips load each B fragment once for both
// (ldsm_tile_*): 144 ldmatrix for 320 mma a warp and step at dh = 128,
// against 192 with the tiles of one strip.
// Each key chunk x is thus summed as the queries of x, then of x + 1. The
// last chunk of a run takes its second contribution from the next run's
// first queries in one more, half step (the post step: S, dP and dk, dv of
// the keys of c only), and a run's first step leaves the keys of c0 - 1 to
// the run before: every row's dq and dk, dv come from one block, each sum
// in the same order whatever g.walk is. Against the two-sided kernels above
// this computes S and dP once instead of twice (10 dh instead of 14 dh flops
// per pair) and gathers each chunk's q, dout, k_hat and v once per run.
// Shared memory per block: q and dout of two chunks (this one's, the next's),
// k_hat and v of three (c - 1, c, c + 1), sP and sdS: 208 KB at dh = 128,
// one block of 8 warps per SM (its dk and dv accumulators: 128 registers a
// thread).

constexpr int kBwdWarps = 8;
constexpr int kBwdBlock = 32 * kBwdWarps;
constexpr int kWindowKeys = 2 * kMmaRows;          // keys of a look-one-back window
constexpr int kPStride = mma_stride(kWindowKeys);  // row stride of sP and sdS
// dq's warp tiles: strips per warp, 2 where the columns per warp
// (DH / (kBwdWarps / (4 / strips))) still make whole ldmatrix pairs (16).
template <int DH>
constexpr int kBwdDqStrips = DH >= 64 ? 2 : 1;

template <int DH>
constexpr size_t mma_bwd_walk_smem() {
  return sizeof(bf16) *
         size_t(10 * kMmaRows * mma_stride(DH) + 2 * kMmaRows * kPStride);
}

// kQ: dq wanted (o.dq_r non-null; a template argument, not a flag held in a
// register through the walk).
template <int DH, bool kQ>
__global__ void __launch_bounds__(kBwdBlock, 1)
    mma_bwd_walk_kernel(AttnGeom g, MmaStage st, const float* rm, const float* riz,
                        const float* rD, MmaBwdOut o) {
  constexpr int S = mma_stride(DH);
  constexpr int T = kMmaRows * S;          // one tile
  constexpr int MT = 2;                    // strips of a warp tile (phase 1, dk and dv)
  constexpr int KT = kWindowKeys / 4 / 8;  // phase 1: n tiles of a warp's 32 keys
  constexpr int MQ = kBwdDqStrips<DH>;     // dq: strips of a warp tile
  constexpr int QG = 4 / MQ;               // dq: query groups
  constexpr int OQ = DH / (kBwdWarps / QG) / 8;  // dq: n tiles of a warp's columns
  constexpr int OKV = DH / 2 / 8;          // dk, dv: n tiles of a warp's DH / 2 columns
  extern __shared__ float4 mma_bwd_walk_smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(mma_bwd_walk_smem4);  // [2][kMmaRows][S] by chunk parity
  bf16* sG = sQ + 2 * T;                                    // [2][kMmaRows][S] their dout
  bf16* sK = sG + 2 * T;                                    // [3][kMmaRows][S] slots
  bf16* sV = sK + 3 * T;                                    // [3][kMmaRows][S] slots
  bf16* sP = sV + 3 * T;                                    // [kMmaRows][kPStride]
  bf16* sdS = sP + kMmaRows * kPStride;                     // [kMmaRows][kPStride]
  // Positions of chunk c0 - 1 + j (step j's keys before its queries) in
  // spos[j % 4]: step j reads slots j, j + 1 and j + 2 (its keys, its
  // queries, the next chunk's copies) and fills slot j + 3 at its end.
  __shared__ __align__(8) int spos[4][kMmaRows];
  // Statistics m, 1 / z, D of step j's query rows in sstat[j % 2], loaded a
  // step ahead as the positions are (none held in registers through a step).
  __shared__ float sstat[2][3][kMmaRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, gr = lane >> 2;
  const int half = warp & 1, quarter = warp >> 1, group = warp >> 2;
  const int row0 = 32 * half + gr;  // phase 1: this thread's rows row0 + 8 i, i < 4
  const int64_t runs = (g.n_chunks + g.walk - 1) / g.walk;
  const int64_t r = blockIdx.x / runs, c0 = (blockIdx.x % runs) * g.walk;
  const int n = int(min(int64_t(g.walk), g.n_chunks - c0));  // chunks of this run
  const int32_t* pr = g.perm + r * g.L;
  // Chunk c0 - 1 + j by step index (-1: none), the post step's chunk wrapped.
  auto chunk_at = [&](int j) -> int64_t {
    const int64_t c = c0 - 1 + j;
    if (c < 0) return g.wrap ? g.n_chunks - 1 : -1;
    if (c >= g.n_chunks) return g.wrap ? c - g.n_chunks : -1;
    return c;
  };
  const bool post_step = chunk_at(n + 1) >= 0;  // the queries after the run exist
  auto pos_at = [&](int j) -> int {  // position tid of step j's chunk (-1: none)
    const int64_t c = chunk_at(j);
    return c < 0 ? -1 : pr[c * kMmaRows + tid];
  };
  // Row statistics of position p (0 where none).
  auto stats_of = [&](int p, float* x) {
    x[0] = p >= 0 ? rm[p] : 0.0f;
    x[1] = p >= 0 ? riz[p] : 0.0f;
    x[2] = p >= 0 ? rD[p] : 0.0f;
  };
  if (tid < kMmaRows) {
    for (int j = 0; j < 3; ++j) spos[j][tid] = pos_at(j);
    float x[3];
    stats_of(spos[1][tid], x);  // step 0's queries (this thread wrote the position)
    for (int u = 0; u < 3; ++u) sstat[0][u][tid] = x[u];
  }
  __syncthreads();
  auto rows_of = [](const int* pos) { return [pos](int i) -> int { return pos[i]; }; };
  copy_rows<kMmaRows, DH, kBwdBlock>(sK, S, st.dst[1], rows_of(spos[0]), tid);
  copy_rows<kMmaRows, DH, kBwdBlock>(sV, S, st.dst[2], rows_of(spos[0]), tid);
  auto fetch_chunk = [&](int j, bool keys) {  // step j's queries (and keys) into their buffers
    const auto row = rows_of(spos[(j + 1) % 4]);
    copy_rows<kMmaRows, DH, kBwdBlock>(sQ + (j & 1) * T, S, st.dst[0], row, tid);
    copy_rows<kMmaRows, DH, kBwdBlock>(sG + (j & 1) * T, S, st.dst[3], row, tid);
    if (!keys) return;
    copy_rows<kMmaRows, DH, kBwdBlock>(sK + ((j + 1) % 3) * T, S, st.dst[1], row, tid);
    copy_rows<kMmaRows, DH, kBwdBlock>(sV + ((j + 1) % 3) * T, S, st.dst[2], row, tid);
  };
  fetch_chunk(0, true);
  cp_async_commit();

  // This warp's 32 keys of its group's chunk, columns (DH / 2) ((warp / 2) % 2) ..
  float dk[MT][OKV][4], dvv[MT][OKV][4];
  zero_tiles(dk);
  zero_tiles(dvv);

  for (int j = 0; j <= n; ++j) {
    const bool post = j == n;  // queries of the next run's first chunk, keys of c only
    if (post && !post_step) break;
    const int prev_slot = j % 3, own_slot = (j + 1) % 3, qb = j & 1;  // K, V buffers
    const int* prev_pos = spos[j % 4];
    const int* own_pos = spos[(j + 1) % 4];
    const bool prev_half = group == (j & 1);  // this warp's dk, dv keys: chunk c - 1 (else c)
    // Positions three steps on, stored at the end of this step: the load's
    // latency passes with the step.
    const bool more_pos = tid < kMmaRows && j + 3 <= n + 1;
    const int pos_next = more_pos ? pos_at(j + 3) : -1;
    cp_async_wait<0>();
    __syncthreads();  // step j's rows landed, chunk c + 1's positions written
    // The statistics of step j + 1's queries (slot j + 2, written by step
    // j - 1), stored at the end of this step.
    const bool more_stats = tid < kMmaRows && j + 1 <= n;
    float stats_next[3];
    if (more_stats) stats_of(spos[(j + 2) % 4][tid], stats_next);
    // The buffers of chunk c + 1 were last read by step j - 1's second phase.
    if (j + 1 < n)
      fetch_chunk(j + 1, true);
    else if (j + 1 == n && post_step)
      fetch_chunk(j + 1, false);
    cp_async_commit();

    // Phase 1: S and dP of this warp's 32 queries x 32 keys, then P and dS
    // into sP, sdS (0 for padding; dS 0 where masked).
    if (!post || quarter < 2) {
      const int kslot = quarter < 2 ? prev_slot : own_slot;
      const int k0 = 32 * (quarter & 1);  // the warp's keys within their chunk
      float s[MT][KT][4], dp[MT][KT][4];
      zero_tiles(s);
      zero_tiles(dp);
      ldsm_tile_nt<DH, MT, KT>(s, sQ + qb * T, S, 32 * half, sK + kslot * T + k0 * S, S, lane);
      ldsm_tile_nt<DH, MT, KT>(dp, sG + qb * T, S, 32 * half, sV + kslot * T + k0 * S, S,
                               lane);
      const int* kpos = (quarter < 2 ? prev_pos : own_pos) + k0;
      const float* qstat = sstat[j & 1][0];
      int qpos[2 * MT];
      float qm[2 * MT], qiz[2 * MT], qD[2 * MT];
#pragma unroll
      for (int i = 0; i < 2 * MT; ++i) {
        qpos[i] = own_pos[row0 + 8 * i];
        qm[i] = qstat[row0 + 8 * i];
        qiz[i] = qstat[kMmaRows + row0 + 8 * i];
        qD[i] = qstat[2 * kMmaRows + row0 + 8 * i];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < KT; ++nt) {
          const int col = nt * 8 + 2 * t4;
          const int2 kp2 = *reinterpret_cast<const int2*>(kpos + col);
          float pv[4], dsv[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int kp = e & 1 ? kp2.y : kp2.x, i = 2 * mt + (e >> 1);
            bool masked;
            const float sc = masked_score(s[mt][nt][e], qpos[i], kp, g.causal, &masked);
            const float p = fast_exp(sc - qm[i]) * qiz[i];
            const bool valid = qpos[i] >= 0 && kp >= 0;
            pv[e] = valid ? p : 0.0f;
            dsv[e] = valid && !masked ? p * (dp[mt][nt][e] - qD[i]) : 0.0f;
          }
          const int at = (row0 + 16 * mt) * kPStride + 32 * quarter + col;
          *reinterpret_cast<uint32_t*>(sP + at) = pack_bf16(pv[0], pv[1]);
          *reinterpret_cast<uint32_t*>(sP + at + 8 * kPStride) = pack_bf16(pv[2], pv[3]);
          *reinterpret_cast<uint32_t*>(sdS + at) = pack_bf16(dsv[0], dsv[1]);
          *reinterpret_cast<uint32_t*>(sdS + at + 8 * kPStride) = pack_bf16(dsv[2], dsv[3]);
        }
    }
    __syncthreads();  // sP, sdS of the window complete

    // Phase 2: dq of chunk c (this warp's query strips and columns) over
    // the keys of c - 1, then of c.
    if (kQ && !post) {
      const int qg = warp % QG, d0 = (warp / QG) * OQ * 8;
      float dq[MQ][OQ][4];
      zero_tiles(dq);
      ldsm_tile_nn<kMmaRows / 16, MQ, OQ>(dq, sdS, kPStride, 16 * MQ * qg,
                                          sK + prev_slot * T + d0, S, lane);
      ldsm_tile_nn<kMmaRows / 16, MQ, OQ>(dq, sdS + kMmaRows, kPStride, 16 * MQ * qg,
                                          sK + own_slot * T + d0, S, lane);
#pragma unroll
      for (int mt = 0; mt < MQ; ++mt) {
        const int q0 = 16 * (MQ * qg + mt) + gr;
        const int rows[2] = {own_pos[q0], own_pos[q0 + 8]};
        dq_write<DH, OQ, false>(g, o, r, rows, dq[mt], lane, d0);
      }
    }
    // dv += P^T dO and dk_hat += dS^T Q for this warp's keys: chunk c's
    // start from zero; chunk c - 1's (not at the run's first step: the run
    // before completes them) end here.
    if (!prev_half && !post) {
      zero_tiles(dk);
      zero_tiles(dvv);
    }
    const int e0 = (quarter & 1) * (DH / 2);  // this warp's columns of dk, dv
    if (prev_half ? j > 0 : !post) {
      const int col0 = (prev_half ? 0 : kMmaRows) + 32 * half;
      ldsm_tile_tn<kMmaRows / 16, MT, OKV>(dvv, sP, kPStride, col0, sG + qb * T + e0, S, lane);
      ldsm_tile_tn<kMmaRows / 16, MT, OKV>(dk, sdS, kPStride, col0, sQ + qb * T + e0, S, lane);
    }
    // Chunk c - 1's keys are complete; so are chunk c's at the run's last
    // step when no queries follow (the last chunk without wrap).
    if (prev_half ? j > 0 : j == n - 1 && !post_step) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int* kp = (prev_half ? prev_pos : own_pos) + 32 * half + 16 * mt + gr;
        const int kw[2] = {kp[0], kp[8]};
        if (o.dkh_r) write_round_rows<DH, OKV>(o.dkh_r, g, r, kw, dk[mt], lane, e0);
        if (o.dv_r) write_round_rows<DH, OKV>(o.dv_r, g, r, kw, dvv[mt], lane, e0);
      }
    }
    if (more_pos) spos[(j + 3) % 4][tid] = pos_next;
    if (more_stats)
      for (int u = 0; u < 3; ++u) sstat[(j + 1) & 1][u][tid] = stats_next[u];
  }
  cp_async_wait<0>();
}

// q, k_hat (from qk; |k| into norm, for the key side's direct writes or the
// round sum), v and dout staged, with the row statistics of `rounds` rounds
// from dout, out and lse. With kept (AttentionParams::kept) q, k_hat, v and
// |k| are the forward's there: only dout is staged.
template <int DH>
MmaStage stage_mma_backward(const AttnGeom& g, int rounds, const float* qk, const float* v,
                            const float* dout, const float* out, int64_t ld_out,
                            const float* lse, float* rm, float* riz, float* rD, float* norm,
                            void* stage, cudaStream_t s, void* kept = nullptr) {
  MmaStage st{{qk, nullptr, v, dout}, {g.ld, g.dh, g.ld, g.ld}, {}, kMmaBwdStaged, !kept, norm,
              rm, riz, rD, out, ld_out, lse, rounds};
  st.first = kept ? 3 : 0;
  st.out_bf16 = g.out_bf16;
  st.src_bf16 = g.in_bf16;
  launch_mma_stage<DH>(g, stage, &st, s, kept);
  return st;
}

// The backward's kernels over operands already staged (st).
template <int DH, bool FULL>
void launch_mma_backward_kernels(const AttnGeom& g, int rounds, const MmaStage& st,
                                 const float* rm, const float* riz, const float* rD,
                                 const MmaBwdOut& o, cudaStream_t s) {
  const bool want_q = o.direct ? o.dq != nullptr : o.dq_r != nullptr;
  const bool want_kv = o.direct ? o.dkh || o.dv : o.dkh_r || o.dv_r;
  if (!FULL && mma_walks(g) && !o.direct) {
    constexpr size_t smem = mma_bwd_walk_smem<DH>();
    const unsigned runs = unsigned(rounds * ((g.n_chunks + g.walk - 1) / g.walk));
    auto* kernel = want_q ? mma_bwd_walk_kernel<DH, true> : mma_bwd_walk_kernel<DH, false>;
    set_mma_smem(kernel, smem);
    kernel<<<runs, kBwdBlock, smem, s>>>(g, st, rm, riz, rD, o);
    CUDA_CHECK_LAUNCH("mma_bwd_walk_kernel");
  } else if (!FULL && mma_walks(g)) {
    constexpr size_t smem = mma_walk_bwd_smem<DH>();
    const unsigned runs = unsigned(rounds * ((g.n_chunks + g.walk - 1) / g.walk));
    if (want_q) {
      set_mma_smem(mma_dq_walk_kernel<DH>, smem);
      mma_dq_walk_kernel<DH><<<runs, kMmaBlock, smem, s>>>(g, st, rm, riz, rD, o);
      CUDA_CHECK_LAUNCH("mma_dq_walk_kernel");
    }
    if (want_kv) {
      set_mma_smem(mma_dkv_walk_kernel<DH>, smem);
      mma_dkv_walk_kernel<DH><<<runs, kMmaBlock, smem, s>>>(g, st, rm, riz, rD, o);
      CUDA_CHECK_LAUNCH("mma_dkv_walk_kernel");
    }
  } else {
    const unsigned blocks = attn_blocks(g, rounds);
    if (want_q) {
      constexpr size_t smem = mma_dq_smem<DH>();
      set_mma_smem(mma_dq_kernel<DH, FULL>, smem);
      mma_dq_kernel<DH, FULL><<<blocks, kMmaBlock, smem, s>>>(g, st, rm, riz, rD, o);
      CUDA_CHECK_LAUNCH("mma_dq_kernel");
    }
    if (want_kv) {
      constexpr size_t smem = mma_dkv_smem<DH>();
      set_mma_smem(mma_dkv_kernel<DH, FULL>, smem);
      mma_dkv_kernel<DH, FULL><<<blocks, kMmaBlock, smem, s>>>(g, st, rm, riz, rD, o);
      CUDA_CHECK_LAUNCH("mma_dkv_kernel");
    }
  }
}

template <int DH, bool FULL>
void launch_mma_backward(const AttnGeom& g, int rounds, const float* qk, const float* v,
                         const float* dout, const float* out, int64_t ld_out, const float* lse,
                         float* rm, float* riz, float* rD, const MmaBwdOut& o, void* stage,
                         cudaStream_t s) {
  const MmaStage st =
      stage_mma_backward<DH>(g, rounds, qk, v, dout, out, ld_out, lse, rm, riz, rD, o.norm,
                             stage, s, o.kept);
  launch_mma_backward_kernels<DH, FULL>(g, rounds, st, rm, riz, rD, o, s);
  if (o.direct) return;
  // k_hat from the staged query rows (bf16(qk), as the staging normalised
  // them): no fp32 qk read here.
  if (o.ld_grad)  // bf16 rows (AttentionParams::grad_bf16)
    launch_finish_rounds<DH / 32, bf16, bf16>(
        reinterpret_cast<bf16*>(o.dkh), reinterpret_cast<bf16*>(o.dv), o.dq_r, o.dkh_r, o.dv_r,
        DH, st.dst[0], DH, o.norm, g.L, o.ld_grad, g.dh, rounds, o.add, s);
  else
    launch_finish_rounds<DH / 32, bf16>(o.dkh, o.dv, o.dq_r, o.dkh_r, o.dv_r, DH, st.dst[0], DH,
                                        o.norm, g.L, g.ld, g.dh, rounds, o.add, s);
}

// fold_rounds (direct outputs): the staging once with the statistics of all
// the rounds, then per round r its one-round kernels over perm + r L, adding
// (round 0 writing unless o.add).
template <int DH>
void launch_mma_backward_folded(AttnGeom g, const int32_t* perm, int rounds, const float* qk,
                                const float* v, const float* dout, const float* out,
                                int64_t ld_out, const float* lse, float* rm, float* riz,
                                float* rD, const MmaBwdOut& o, void* stage, cudaStream_t s) {
  const MmaStage st =
      stage_mma_backward<DH>(g, rounds, qk, v, dout, out, ld_out, lse, rm, riz, rD, o.norm,
                             stage, s);
  for (int r = 0; r < rounds; ++r) {
    g.perm = perm + int64_t(r) * g.L;
    MmaBwdOut round_out = o;
    round_out.add = o.add || r > 0;
    launch_mma_backward_kernels<DH, false>(g, 1, st, rm, riz, rD, round_out, s);
  }
}

template <bool FULL>
void dispatch_mma_backward(const AttnGeom& g, int rounds, const float* qk, const float* v,
                           const float* dout, const float* out, int64_t ld_out, const float* lse,
                           float* rm, float* riz, float* rD, const MmaBwdOut& o, void* stage,
                           cudaStream_t s) {
  switch (kernel_dhm(g.dh)) {
    case 32:
      launch_mma_backward<32, FULL>(g, rounds, qk, v, dout, out, ld_out, lse, rm, riz, rD, o,
                                      stage, s);
      break;
    case 64:
      launch_mma_backward<64, FULL>(g, rounds, qk, v, dout, out, ld_out, lse, rm, riz, rD, o,
                                      stage, s);
      break;
    default:
      launch_mma_backward<128, FULL>(g, rounds, qk, v, dout, out, ld_out, lse, rm, riz, rD, o,
                                      stage, s);
      break;
  }
}

}  // namespace

void mma_chunked_backward_folded(const AttentionParams& p, const int32_t* perm, const float* qk,
                                 const float* v, const float* dout, const float* out,
                                 int64_t ld_out, const float* lse, float* rm, float* riz,
                                 float* rD, const MmaBwdOut& o, void* stage, cudaStream_t s) {
  AttentionParams one = p;
  one.n_rounds = 1;
  AttnGeom g = mma_geom(one, perm, false);  // one round's walk, as a one-round call's
  g.pairs = mma_pairs(g.dh, g.ld, {o.dq, o.dkh, o.dv, qk});
  switch (kernel_dhm(g.dh)) {
    case 32:
      launch_mma_backward_folded<32>(g, perm, p.n_rounds, qk, v, dout, out, ld_out, lse, rm, riz,
                                     rD, o, stage, s);
      break;
    case 64:
      launch_mma_backward_folded<64>(g, perm, p.n_rounds, qk, v, dout, out, ld_out, lse, rm, riz,
                                     rD, o, stage, s);
      break;
    default:
      launch_mma_backward_folded<128>(g, perm, p.n_rounds, qk, v, dout, out, ld_out, lse, rm,
                                      riz, rD, o, stage, s);
      break;
  }
}

void mma_attention_backward(const AttentionParams& p, const int32_t* perm, bool full,
                            const float* qk, const float* v, const float* dout, const float* out,
                            int64_t ld_out, const float* lse, float* rm, float* riz, float* rD,
                            const MmaBwdOut& o, void* stage, cudaStream_t s) {
  AttnGeom g = mma_geom(p, perm, full);
  if (!full && !o.direct) g.walk = mma_bwd_walk(g.n_chunks, p.n_rounds);
  g.pairs = o.direct && mma_pairs(g.dh, g.ld, {o.dq, o.dkh, o.dv, qk});
  if (full)
    dispatch_mma_backward<true>(g, 1, qk, v, dout, out, ld_out, lse, rm, riz, rD, o, stage, s);
  else
    dispatch_mma_backward<false>(g, p.n_rounds, qk, v, dout, out, ld_out, lse, rm, riz, rD, o,
                                 stage, s);
}

}  // namespace cuda
}  // namespace reformer
