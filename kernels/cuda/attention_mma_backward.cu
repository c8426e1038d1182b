// Attention backward on tensor cores (AttentionParams::precision == bf16):
// the query side and the key side of attention_backward.cu on mma.m16n8k16
// (bf16 operands, fp32 accumulators); row_stats_kernel before them and
// finish_backward_kernel after them are shared with the fp32 path.
//
// Both recompute the probabilities from the row statistics (m_i, 1 / z_i,
// D_i of row_stats_kernel), as the fp32 kernels:
//   P_ij = exp(s_ij - m_i) / z_i,  dS_ij = P_ij (dout_i . v_j - D_i)
// (dS = 0 for masked pairs, whose scores are constants).
//  - mma_dq_kernel: one block of 4 warps per (round, chunk, tile of 64
//    queries), as the forward; per pass of 64 window keys, S = Q K_hat^T and
//    dP = dO V^T on mma, dS in fp32 registers, dq += dS K_hat on mma (dS
//    rounded to bf16, K_hat transposed in shared memory).
//  - mma_dkv_kernel: one block per (round, key chunk, tile of 64 keys); per
//    pass of 32 queries of the chunks whose window holds the keys,
//    S^T = K_hat Q^T and dP^T = V dO^T on mma, P^T and dS^T in fp32
//    registers, dv += P^T dO and dk_hat += dS^T Q on mma (Q and dO
//    transposed in shared memory).
// Each writes every element of its outputs once, in a fixed order: the
// backward is bitwise reproducible (no atomics).
//
// Work per call: 6 dh (query side: S, dP, dQ) + 8 dh (key side: S, dP, dV,
// dK) = 14 dh flops per (query, key) pair (pairs as in the forward,
// attention_mma_forward.cu: 60 GFLOP per head at L = 64K, R = 4, W = 128,
// dh = 128). Limits: S and dP are computed twice (once per side), the
// gathered loads (and the transposed copies) are not overlapped with the
// mma, and the key side holds two 16 x dh fp32 accumulators per warp
// (dh = 128: ~200 registers, one or two blocks per SM).
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
  return sizeof(bf16) * size_t(2 * kMmaRows * mma_stride(DH) + 2 * kDqKeys * mma_stride(DH) +
                               DH * mma_stride(kDqKeys));
}

template <int DH>
constexpr size_t mma_dkv_smem() {
  return sizeof(bf16) * size_t(2 * kMmaRows * mma_stride(DH) +
                               2 * kDkvQueries * mma_stride(DH) +
                               2 * DH * mma_stride(kDkvQueries));
}

// Query side: dq_r[r, i, :] = sum_j dS_ij k_hat_j (overwritten).
template <int DH, bool FULL>
__global__ void __launch_bounds__(kMmaBlock)
    mma_dq_kernel(AttnGeom g, const float* qk, const float* khat, const float* v,
                  const float* dout, const float* rm, const float* riz, const float* rD,
                  float* dq_r) {
  constexpr int S = mma_stride(DH);         // row stride of sQ, sG, sK, sV
  constexpr int SK = mma_stride(kDqKeys);   // row stride of sKt
  constexpr int NT = kDqKeys / 8;
  constexpr int OT = DH / 8;
  extern __shared__ float4 mma_dq_smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(mma_dq_smem4);  // [kMmaRows][S] queries
  bf16* sG = sQ + kMmaRows * S;                       // [kMmaRows][S] their dout
  bf16* sK = sG + kMmaRows * S;                       // [kDqKeys][S] k_hat
  bf16* sV = sK + kDqKeys * S;                        // [kDqKeys][S] v
  bf16* sKt = sV + kDqKeys * S;                       // [DH][SK] k_hat transposed
  __shared__ int sqpos[kMmaRows];
  __shared__ int skpos[kDqKeys];
  __shared__ int swin[kMaxWindow];
  __shared__ int s_nwin;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  int64_t r, c, t;
  const int32_t* pr = mma_block_start<FULL>(g, +1, sqpos, swin, &s_nwin, &r, &c, &t);
  load_tile<kMmaRows, DH>(sQ, S, sqpos, qk, g.ld, g.dh, tid);
  load_tile<kMmaRows, DH>(sG, S, sqpos, dout, g.ld, g.dh, tid);
  const int64_t n_keys = FULL ? (g.causal ? min(g.L, (t + 1) * kMmaRows) : g.L)
                              : int64_t(s_nwin) * g.chunk;
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

  for (int64_t k0 = 0; k0 < n_keys; k0 += kDqKeys) {
    __syncthreads();  // the previous tile is consumed
    if (tid < kDqKeys) skpos[tid] = window_position<FULL>(g, pr, swin, 0, k0 + tid, n_keys);
    __syncthreads();
    load_tile<kDqKeys, DH>(sK, S, skpos, khat, g.dh, g.dh, tid);
    load_tile<kDqKeys, DH>(sV, S, skpos, v, g.ld, g.dh, tid);
    load_tile_t<kDqKeys, DH>(sKt, SK, skpos, khat, g.dh, g.dh, tid);
    __syncthreads();

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
    mma_strip_nt<DH, NT>(s, sQ, S, 16 * warp, sK, S, lane);
    mma_strip_nt<DH, NT>(dp, sG, S, 16 * warp, sV, S, lane);
    // s becomes dS (0 for masked pairs and padding).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kp = skpos[nt * 8 + 2 * t4 + (e & 1)], h = e >> 1;
        bool masked = true;
        if (kp >= 0 && qpos[h] >= 0) masked_score(s[nt][e], qpos[h], kp, g.causal, &masked);
        s[nt][e] = masked ? 0.0f : expf(s[nt][e] - qm[h]) * qiz[h] * (dp[nt][e] - qD[h]);
      }
    }
    mma_strip_pv<DH, kDqKeys / 16>(dq, s, sKt, SK, lane);
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (qpos[h] < 0) continue;
    float* dst = dq_r + (r * g.L + qpos[h]) * g.dh;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      const int d = ot * 8 + 2 * t4;
      if (d < g.dh) dst[d] = dq[ot][2 * h];
      if (d + 1 < g.dh) dst[d + 1] = dq[ot][2 * h + 1];
    }
  }
}

// Key side: for the keys of this block's tile, dkh_r[r, j] = sum_i dS_ij q_i
// and dv_r[r, j] = sum_i P_ij dout_i (overwritten; either may be null).
template <int DH, bool FULL>
__global__ void __launch_bounds__(kMmaBlock)
    mma_dkv_kernel(AttnGeom g, const float* qk, const float* khat, const float* v,
                   const float* dout, const float* rm, const float* riz, const float* rD,
                   float* dkh_r, float* dv_r) {
  constexpr int S = mma_stride(DH);            // row stride of sK, sV, sQ, sG
  constexpr int SQ = mma_stride(kDkvQueries);  // row stride of sQt, sGt
  constexpr int NT = kDkvQueries / 8;
  constexpr int OT = DH / 8;
  extern __shared__ float4 mma_dkv_smem4[];
  bf16* sK = reinterpret_cast<bf16*>(mma_dkv_smem4);  // [kMmaRows][S] this tile's k_hat
  bf16* sV = sK + kMmaRows * S;                        // [kMmaRows][S] this tile's v
  bf16* sQ = sV + kMmaRows * S;                        // [kDkvQueries][S] queries
  bf16* sG = sQ + kDkvQueries * S;                     // [kDkvQueries][S] their dout
  bf16* sQt = sG + kDkvQueries * S;                    // [DH][SQ] queries transposed
  bf16* sGt = sQt + DH * SQ;                           // [DH][SQ] dout transposed
  __shared__ int skpos[kMmaRows];
  __shared__ int sqpos[kDkvQueries];
  __shared__ float sm_m[kDkvQueries], sm_iz[kDkvQueries], sm_D[kDkvQueries];
  __shared__ int sinv[kMaxWindow];
  __shared__ int s_ninv;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  int64_t r, c, t;
  const int32_t* pr = mma_block_start<FULL>(g, -1, skpos, sinv, &s_ninv, &r, &c, &t);
  load_tile<kMmaRows, DH>(sK, S, skpos, khat, g.dh, g.dh, tid);
  load_tile<kMmaRows, DH>(sV, S, skpos, v, g.ld, g.dh, tid);
  const int64_t q_lo = FULL && g.causal ? t * kMmaRows : 0;
  const int64_t n_q = FULL ? g.L - q_lo : int64_t(s_ninv) * g.chunk;
  const int kpos[2] = {skpos[row0], skpos[row0 + 8]};
  float dk[OT][4], dvv[OT][4];
#pragma unroll
  for (int ot = 0; ot < OT; ++ot)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[ot][e] = dvv[ot][e] = 0.0f;

  for (int64_t q0 = 0; q0 < n_q; q0 += kDkvQueries) {
    __syncthreads();  // the previous queries are consumed
    if (tid < kDkvQueries) {
      const int pos = window_position<FULL>(g, pr, sinv, q_lo, q0 + tid, n_q);
      sqpos[tid] = pos;
      sm_m[tid] = pos >= 0 ? rm[pos] : 0.0f;
      sm_iz[tid] = pos >= 0 ? riz[pos] : 0.0f;
      sm_D[tid] = pos >= 0 ? rD[pos] : 0.0f;
    }
    __syncthreads();
    load_tile<kDkvQueries, DH>(sQ, S, sqpos, qk, g.ld, g.dh, tid);
    load_tile<kDkvQueries, DH>(sG, S, sqpos, dout, g.ld, g.dh, tid);
    load_tile_t<kDkvQueries, DH>(sQt, SQ, sqpos, qk, g.ld, g.dh, tid);
    load_tile_t<kDkvQueries, DH>(sGt, SQ, sqpos, dout, g.ld, g.dh, tid);
    __syncthreads();

    float st[NT][4], dpt[NT][4];  // S^T and dP^T: rows = keys, columns = queries
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.0f;
    mma_strip_nt<DH, NT>(st, sK, S, 16 * warp, sQ, S, lane);
    mma_strip_nt<DH, NT>(dpt, sV, S, 16 * warp, sG, S, lane);
    // st becomes P^T, dpt becomes dS^T (both 0 for padding; dS^T 0 when masked).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t4 + (e & 1);
        const int qp = sqpos[col], kp = kpos[e >> 1];
        if (qp < 0 || kp < 0) {
          st[nt][e] = dpt[nt][e] = 0.0f;
        } else {
          bool masked;
          const float sc = masked_score(st[nt][e], qp, kp, g.causal, &masked);
          const float p = expf(sc - sm_m[col]) * sm_iz[col];
          st[nt][e] = p;
          dpt[nt][e] = masked ? 0.0f : p * (dpt[nt][e] - sm_D[col]);
        }
      }
    }
    mma_strip_pv<DH, kDkvQueries / 16>(dvv, st, sGt, SQ, lane);
    mma_strip_pv<DH, kDkvQueries / 16>(dk, dpt, sQt, SQ, lane);
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (kpos[h] < 0) continue;
    const int64_t base = (r * g.L + kpos[h]) * g.dh;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int d = ot * 8 + 2 * t4 + u;
        if (d >= g.dh) continue;
        if (dkh_r) dkh_r[base + d] = dk[ot][2 * h + u];
        if (dv_r) dv_r[base + d] = dvv[ot][2 * h + u];
      }
    }
  }
}

template <int DH, bool FULL>
void launch_mma_backward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                         const float* v, const float* dout, const float* rm, const float* riz,
                         const float* rD, float* dq_r, float* dkh_r, float* dv_r,
                         cudaStream_t s) {
  const unsigned blocks = attn_blocks(g, rounds);
  if (dq_r) {
    constexpr size_t smem = mma_dq_smem<DH>();
    set_smem(mma_dq_kernel<DH, FULL>, smem);
    mma_dq_kernel<DH, FULL><<<blocks, kMmaBlock, smem, s>>>(g, qk, khat, v, dout, rm, riz, rD,
                                                            dq_r);
    CUDA_CHECK_LAUNCH("mma_dq_kernel");
  }
  if (dkh_r || dv_r) {
    constexpr size_t smem = mma_dkv_smem<DH>();
    set_smem(mma_dkv_kernel<DH, FULL>, smem);
    mma_dkv_kernel<DH, FULL><<<blocks, kMmaBlock, smem, s>>>(g, qk, khat, v, dout, rm, riz, rD,
                                                             dkh_r, dv_r);
    CUDA_CHECK_LAUNCH("mma_dkv_kernel");
  }
}

template <bool FULL>
void dispatch_mma_backward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                           const float* v, const float* dout, const float* rm, const float* riz,
                           const float* rD, float* dq_r, float* dkh_r, float* dv_r,
                           cudaStream_t s) {
  switch (kernel_dhm(g.dh)) {
    case 32:
      launch_mma_backward<32, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r,
                                    dv_r, s);
      break;
    case 64:
      launch_mma_backward<64, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r,
                                    dv_r, s);
      break;
    default:
      launch_mma_backward<128, FULL>(g, rounds, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r,
                                     dv_r, s);
      break;
  }
}

}  // namespace

void mma_attention_backward(const AttentionParams& p, const int32_t* perm, bool full,
                            const float* qk, const float* khat, const float* v, const float* dout,
                            const float* rm, const float* riz, const float* rD, float* dq_r,
                            float* dkh_r, float* dv_r, cudaStream_t s) {
  const AttnGeom g = mma_geom(p, perm, full);
  if (full)
    dispatch_mma_backward<true>(g, 1, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r, dv_r, s);
  else
    dispatch_mma_backward<false>(g, p.n_rounds, qk, khat, v, dout, rm, riz, rD, dq_r, dkh_r,
                                 dv_r, s);
}

}  // namespace cuda
}  // namespace reformer
