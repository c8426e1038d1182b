// Attention backward on CUDA: row statistics, the query side (dq), the key
// side (dk_hat, dv) and the round sum (the kernels are described in
// attention_common.cuh).
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/cuda_ops_impl.h"

namespace reformer {
namespace cuda {
namespace {

// Per position i: m_i, 1 / z_i (over the R rounds' lse; full: lse_i and 1)
// and D_i = dout_i . out_i (out: the combined output, row stride ld_out).
__global__ void row_stats_kernel(float* rm, float* riz, float* rD, const float* dout,
                                 const float* out, int64_t ld_out, const float* lse, int64_t L,
                                 int64_t ld, int dh, int R) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= L) return;
  const float* g = dout + i * ld;
  const float* o = out + i * ld_out;
  float dsum = 0.0f;
  for (int d = lane; d < dh; d += 32) dsum += g[d] * o[d];
  const RoundWeights w = round_weights(lse, L, i, R);
  dsum = warp_sum(dsum);
  if (lane == 0) {
    rm[i] = w.m;
    riz[i] = w.inv_z;
    rD[i] = dsum;
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

size_t bwd_smem(int dhm) { return sizeof(float) * size_t(2 * kTile * dhm + 2 * kCols * (dhm + 1)); }

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

// The shared backward: row statistics, query side, key side, finish.
// The query and key sides run on tensor cores when p.precision is bf16 (the
// row statistics then come with their staging), and add into dqk, dv
// themselves for one round (mma_backward_direct).
template <bool FULL>
void run_backward(const AttnScratch& sc, const AttentionParams& p, const AttnGeom& g, int R,
                  float* dqk, float* dv, const float* dout, const float* out, int64_t ld_out,
                  const float* qk, const float* v, const float* lse, cudaStream_t s) {
  if (p.precision == AttentionPrecision::bf16) {  // direct, or bf16 rounds and their sum
    const bool direct = mma_backward_direct(p, FULL);
    // The forward's staged operands and |k|, where it kept them.
    void* kept = FULL ? nullptr : p.kept;
    // Without accumulate the direct kernels write: the query side its dq
    // rows, the key side dv and its dk_hat rows added onto them (no zeroing
    // pass over the [L, dh] slices of dqk and dv).
    const MmaBwdOut o{dqk,
                      dqk,
                      dv,
                      direct,
                      kept ? kept_norm(kept, p.L, p.dh) : sc.norm,
                      direct || !dqk ? nullptr : sc.dq_b,
                      direct || !dqk ? nullptr : sc.dkh_b,
                      direct || !dv ? nullptr : sc.dv_b,
                      p.accumulate,
                      kept,
                      p.grad_bf16 ? p.ld_grad : 0};
    mma_attention_backward(p, g.perm, FULL, qk, v, dout, out, ld_out, lse, sc.rm, sc.riz, sc.rD,
                           o, sc.stage, s);
    return;
  }
  row_stats_kernel<<<warp_rows_blocks(g.L), kBlock, 0, s>>>(sc.rm, sc.riz, sc.rD, dout, out,
                                                            ld_out, lse, g.L, g.ld, g.dh, R);
  CUDA_CHECK_LAUNCH("row_stats_kernel");
  float* dq_r = dqk ? sc.dq_r : nullptr;
  float* dkh_r = dqk ? sc.dkh_r : nullptr;
  float* dv_r = dv ? sc.dv_r : nullptr;
  dispatch_backward<FULL>(g, R, qk, sc.khat, v, dout, sc.rm, sc.riz, sc.rD, dq_r, dkh_r, dv_r, s);
  launch_finish_rounds<4, float>(dqk, dv, sc.dq_r, sc.dkh_r, sc.dv_r, g.dh, qk, g.ld, sc.norm,
                                 g.L, g.ld, g.dh, R, p.accumulate, s);
}

// fold_rounds: the row statistics of all p.n_rounds rounds once, then each
// round's kernels with its share added into dqk, dv (round 0 writing them
// unless p.accumulate); sc holds one round's scratch.
void run_backward_folded(const AttnScratch& sc, const AttentionParams& p, const int32_t* perm,
                         float* dqk, float* dv, const float* dout, const float* out,
                         int64_t ld_out, const float* qk, const float* v, const float* lse,
                         cudaStream_t s) {
  if (p.precision == AttentionPrecision::bf16) {
    const MmaBwdOut o{dqk, dqk, dv, true, sc.norm, nullptr, nullptr, nullptr, p.accumulate};
    mma_chunked_backward_folded(p, perm, qk, v, dout, out, ld_out, lse, sc.rm, sc.riz, sc.rD, o,
                                sc.stage, s);
    return;
  }
  row_stats_kernel<<<warp_rows_blocks(p.L), kBlock, 0, s>>>(
      sc.rm, sc.riz, sc.rD, dout, out, ld_out, lse, p.L, p.ld, p.dh, p.n_rounds);
  CUDA_CHECK_LAUNCH("row_stats_kernel");
  for (int r = 0; r < p.n_rounds; ++r) {
    const AttnGeom g = make_geom(p, perm + int64_t(r) * p.L, false);
    dispatch_backward<false>(g, 1, qk, sc.khat, v, dout, sc.rm, sc.riz, sc.rD,
                             dqk ? sc.dq_r : nullptr, dqk ? sc.dkh_r : nullptr,
                             dv ? sc.dv_r : nullptr, s);
    launch_finish_rounds<4, float>(dqk, dv, sc.dq_r, sc.dkh_r, sc.dv_r, g.dh, qk, g.ld, sc.norm,
                                   g.L, g.ld, g.dh, 1, p.accumulate || r > 0, s);
  }
}

}  // namespace
}  // namespace cuda

// ---------------------------------------------------------------- op entries

void CudaOps::chunked_attention_backward(float* dqk, float* dv, const float* dout,
                                         const float* qk, const float* v, const int32_t* perm,
                                         const float* out, int64_t ld_out, const float* lse,
                                         const AttentionParams& p) {
  cuda::check_chunked(p, "chunked_attention_backward");
  cuda::check_out_bf16(p, p.precision == AttentionPrecision::bf16 && !p.fold_rounds,
                       "chunked_attention_backward");
  cuda::check_in_bf16(
      p, p.precision == AttentionPrecision::bf16 && !p.fold_rounds && p.n_rounds > 1,
      "chunked_attention_backward");
  cuda::check_grad_bf16(
      p, p.precision == AttentionPrecision::bf16 && !p.fold_rounds && p.n_rounds > 1,
      "chunked_attention_backward");
  if (p.L == 0 || (!dqk && !dv)) return;
  const int staged = p.precision == AttentionPrecision::bf16 ? cuda::kMmaBwdStaged : 0;
  if (p.fold_rounds) {  // one round's scratch, the rounds' shares added in turn
    AttentionParams one = p;
    one.n_rounds = 1;
    const cuda::AttnScratch sc = cuda::carve_scratch(ws_, p.L, p.dh, 1, true, staged,
                                                     cuda::backward_grads(one, false));
    if (staged == 0) cuda::launch_normalise(sc, qk, p, stream_);
    cuda::run_backward_folded(sc, p, perm, dqk, dv, dout, out, ld_out, qk, v, lse, stream_);
    return;
  }
  const cuda::AttnScratch sc = cuda::carve_scratch(ws_, p.L, p.dh, p.n_rounds, true, staged,
                                                   cuda::backward_grads(p, false));
  if (staged == 0) cuda::launch_normalise(sc, qk, p, stream_);
  const cuda::AttnGeom g = cuda::make_geom(p, perm, false);
  cuda::run_backward<false>(sc, p, g, p.n_rounds, dqk, dv, dout, out, ld_out, qk, v, lse,
                            stream_);
}

void CudaOps::full_attention_backward(float* dqk, float* dv, const float* dout, const float* out,
                                      const float* qk, const float* v, const float* lse,
                                      const AttentionParams& p) {
  cuda::check_common(p, "full_attention_backward");
  cuda::check_out_bf16(p, false, "full_attention_backward");
  cuda::check_grad_bf16(p, false, "full_attention_backward");
  cuda::check_in_bf16(p, false, "full_attention_backward");
  if (p.L == 0 || (!dqk && !dv)) return;
  const int staged = p.precision == AttentionPrecision::bf16 ? cuda::kMmaBwdStaged : 0;
  const cuda::AttnScratch sc =
      cuda::carve_scratch(ws_, p.L, p.dh, 1, true, staged, cuda::backward_grads(p, true));
  if (staged == 0) cuda::launch_normalise(sc, qk, p, stream_);
  const cuda::AttnGeom g = cuda::make_geom(p, nullptr, true);
  cuda::run_backward<true>(sc, p, g, 1, dqk, dv, dout, out, p.ld, qk, v, lse, stream_);
}

}  // namespace reformer
