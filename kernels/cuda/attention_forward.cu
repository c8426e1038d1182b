// Attention forward on CUDA: the key tiles, online softmax and round
// combination (the kernels are described in attention_common.cuh).
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/cuda_ops_impl.h"

namespace reformer {
namespace cuda {
namespace {

// out[i, d] = sum_r w[r, i] out_r[r, i, d] (when out is non-null) and the
// weights w[r, i] = exp(lse[r, i] - m_i) / z_i (when w is non-null); one
// thread per (i, d), or per i when out is null (dh_threads 1).
__global__ void combine_rounds_kernel(float* out, float* w, int64_t ld, const float* out_r,
                                      const float* lse, int64_t L, int dh, int dh_threads,
                                      int R) {
  const int64_t n = L * dh_threads;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / dh_threads;
    const int d = int(e % dh_threads);
    const RoundWeights weight = round_weights(lse, L, i, R);
    if (w && d == 0)
      for (int r = 0; r < R; ++r) w[int64_t(r) * L + i] = weight(r);
    if (!out) continue;
    float o = 0.0f;
    for (int r = 0; r < R; ++r) o += weight(r) * out_r[(int64_t(r) * L + i) * dh + d];
    out[i * ld + d] = o;
  }
}

void launch_combine(float* out, float* w, int64_t ld, const float* out_r, const float* lse,
                    int64_t L, int dh, int R, cudaStream_t s) {
  const int dh_threads = out ? dh : 1;
  combine_rounds_kernel<<<grid_for(L * dh_threads), kThreads, 0, s>>>(out, w, ld, out_r, lse, L,
                                                                      dh, dh_threads, R);
  CUDA_CHECK_LAUNCH("combine_rounds_kernel");
}

// fold_round (kernels/ops.h): out = (a out + b out_r) / (a + b), a and b the
// weights of rounds 0..r-1 and of round r against their largest lse; one
// warp per position (every lane computes the two weights, the lanes split
// the dh columns, 128 at a time). Every load of a row's columns is issued
// before the first store (the stores may alias the loads, for all the
// compiler knows): with kVec (dh == 128, rows aligned to 4 elements) lane l
// takes columns 4 l .. 4 l + 3 by one access of each row. The round's rows
// are fp32 [L, dh] (the op's out_r) or bf16 [L, ld_r] (a device's own slot,
// mma_chunked_forward_folded).
template <bool kVec, class Src>
__global__ void fold_round_kernel(float* out, const Src* out_r, int64_t ld_r, const float* lse,
                                  int r, int64_t L, int dh, int64_t ld) {
  constexpr int E = 4;  // columns per lane and pass
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= L) return;
  float* o = out + i * ld;
  const Src* src = out_r + i * ld_r;
  float a = 0.0f, b = 1.0f, inv = 1.0f;  // r = 0: out_r copied, out not read
  if (r > 0) {
    float m = lse[i];
    for (int k = 1; k <= r; ++k) m = fmaxf(m, lse[int64_t(k) * L + i]);
    for (int k = 0; k < r; ++k) a += expf(lse[int64_t(k) * L + i] - m);
    b = expf(lse[int64_t(r) * L + i] - m);
    inv = 1.0f / (a + b);
  }
  for (int d0 = 0; d0 < dh; d0 += 32 * E) {
    float x[E], y[E] = {};  // out_r's and (r > 0) out's columns
    if constexpr (kVec) {
      load_cols<E>(src + d0 + E * lane, x);
      if (r > 0) load_cols<E>(o + d0 + E * lane, y);
    } else {
#pragma unroll
      for (int t = 0; t < E; ++t) {
        const int d = d0 + lane + 32 * t;
        x[t] = d < dh ? row_value(src[d]) : 0.0f;
        if (r > 0 && d < dh) y[t] = o[d];
      }
    }
    if (r > 0) {
#pragma unroll
      for (int t = 0; t < E; ++t) x[t] = (a * y[t] + b * x[t]) * inv;
    }
    if constexpr (kVec) {
      store_cols<E>(o + d0 + E * lane, x);
    } else {
#pragma unroll
      for (int t = 0; t < E; ++t)
        if (d0 + lane + 32 * t < dh) o[d0 + lane + 32 * t] = x[t];
    }
  }
}

// fold_round_kernel over rows of `ld_r` elements (vector accesses where dh is
// 128 and the rows allow).
template <class Src>
void launch_fold_round(float* out, const Src* out_r, int64_t ld_r, const float* lse, int r,
                       int64_t L, int dh, int64_t ld, cudaStream_t s) {
  const bool vec = dh == 128 && ld % 4 == 0 && ld_r % 4 == 0 && aligned(out, 16) &&
                   aligned(out_r, 4 * sizeof(Src));
  auto run = [&](auto kernel) {
    kernel<<<warp_rows_blocks(L), kBlock, 0, s>>>(out, out_r, ld_r, lse, r, L, dh, ld);
    CUDA_CHECK_LAUNCH("fold_round_kernel");
  };
  vec ? run(fold_round_kernel<true, Src>) : run(fold_round_kernel<false, Src>);
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

// ---------------------------------------------------------------- launchers

size_t fwd_smem(int dhm, int tile) {
  return sizeof(float) * size_t(tile * dhm + tile * kCols + kCols * (dhm + 1) + kCols * dhm);
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

template <bool FULL>
void dispatch_forward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                      const float* v, float* out, float* lse, cudaStream_t s) {
  switch (kernel_dhm(g.dh)) {
    case 32: launch_forward<32, FULL>(g, rounds, qk, khat, v, out, lse, s); break;
    case 64: launch_forward<64, FULL>(g, rounds, qk, khat, v, out, lse, s); break;
    default: launch_forward<128, FULL>(g, rounds, qk, khat, v, out, lse, s); break;
  }
}

}  // namespace
}  // namespace cuda

// ---------------------------------------------------------------- op entries

void CudaOps::chunked_attention_forward(float* out, float* out_r, float* lse, const float* qk,
                                        const float* v, const int32_t* perm,
                                        const AttentionParams& p) {
  cuda::check_chunked(p, "chunked_attention_forward");
  check_chunked_outputs(out, out_r, p);
  cuda::check_out_bf16(p, p.precision == AttentionPrecision::bf16 && !p.fold_rounds && !out_r,
                       "chunked_attention_forward");
  cuda::check_in_bf16(p, p.precision == AttentionPrecision::bf16, "chunked_attention_forward");
  if (p.L == 0) return;
  const bool bf16 = p.precision == AttentionPrecision::bf16;
  const int staged = bf16 ? cuda::kMmaFwdStaged : 0;
  if (p.fold_rounds) {  // one round at a time into a slot, folded into out
    AttentionParams one = p;
    one.n_rounds = 1;
    one.fold_rounds = false;
    // The slot: the caller's out_r (fp32 [L, dh]), else the workspace's
    // (bf16 [L, DH] on tensor cores, as the all-rounds call keeps its
    // rounds; else fp32 [L, dh]).
    const int dhm = cuda::kernel_dhm(p.dh);
    const size_t own = out_r ? 0
                       : bf16 ? sizeof(__nv_bfloat16) * size_t(p.L) * size_t(dhm)
                              : sizeof(float) * size_t(p.L) * size_t(p.dh);
    const cuda::AttnScratch sc =
        cuda::carve_scratch(ws_, p.L, p.dh, 1, false, staged,
                            bf16 ? cuda::ScratchGrads::none : cuda::ScratchGrads::fp32, own);
    float* slot = out_r ? out_r : bf16 ? nullptr : static_cast<float*>(sc.extra);
    auto* slot_b = out_r || !bf16 ? nullptr : static_cast<__nv_bfloat16*>(sc.extra);
    auto fold = [&](int r) {
      if (slot_b)
        cuda::launch_fold_round(out, slot_b, dhm, lse, r, p.L, p.dh, p.ld, stream_);
      else
        cuda::launch_fold_round(out, static_cast<const float*>(slot), p.dh, lse, r, p.L, p.dh,
                                p.ld, stream_);
    };
    if (bf16) {  // the operands staged once for every round
      cuda::mma_chunked_forward_folded(p, perm, qk, v, slot, slot_b, lse, sc.stage, stream_, fold);
      return;
    }
    cuda::launch_normalise(sc, qk, one, stream_);  // k_hat once for every round
    for (int r = 0; r < p.n_rounds; ++r) {
      const cuda::AttnGeom g = cuda::make_geom(one, perm + r * p.L, false);
      cuda::dispatch_forward<false>(g, 1, qk, sc.khat, v, slot, lse + r * p.L, stream_);
      fold(r);
    }
    return;
  }
  // Round outputs the caller does not keep live in the workspace: bf16
  // [R, L, DH] on tensor cores (mma_chunked_forward_bf16), else fp32.
  const size_t rounds = size_t(p.n_rounds) * size_t(p.L);
  const size_t own =
      out_r ? 0
            : bf16 ? sizeof(__nv_bfloat16) * rounds * size_t(cuda::kernel_dhm(p.dh))
                   : sizeof(float) * rounds * size_t(p.dh);
  const cuda::AttnScratch sc = cuda::carve_scratch(
      ws_, p.L, p.dh, p.n_rounds, false, staged,
      staged == 0 ? cuda::ScratchGrads::fp32 : cuda::ScratchGrads::none, own);
  const cuda::AttnGeom g = cuda::make_geom(p, perm, false);
  if (bf16 && !out_r) {
    cuda::mma_chunked_forward_bf16(p, perm, qk, v, out, static_cast<__nv_bfloat16*>(sc.extra),
                                   lse, sc.stage, stream_);
    return;
  }
  if (!out_r) out_r = static_cast<float*>(sc.extra);
  if (bf16) {  // k_hat staged from qk directly
    cuda::mma_attention_forward(p, perm, false, qk, nullptr, v, out_r, lse, sc.stage, stream_);
  } else {
    cuda::launch_normalise(sc, qk, p, stream_);
    cuda::dispatch_forward<false>(g, p.n_rounds, qk, sc.khat, v, out_r, lse, stream_);
  }
  if (out) cuda::launch_combine(out, nullptr, p.ld, out_r, lse, p.L, p.dh, p.n_rounds, stream_);
}

void CudaOps::fold_round(float* out, const float* out_r, const float* lse, int r, int64_t L,
                         int dh, int64_t ld) {
  check_fold_round(r, L, dh, ld);
  if (L == 0) return;
  cuda::launch_fold_round(out, out_r, dh, lse, r, L, dh, ld, stream_);
}

void CudaOps::combine_rounds(float* out, float* w, const float* out_r, const float* lse,
                             int n_rounds, int64_t L, int dh, int64_t ld) {
  check_combine_rounds(n_rounds, L, dh, ld);
  if (L == 0 || (!out && !w)) return;
  cuda::launch_combine(out, w, ld, out_r, lse, L, dh, n_rounds, stream_);
}

void CudaOps::full_attention_forward(float* out, float* lse, const float* qk, const float* v,
                                     const AttentionParams& p) {
  cuda::check_common(p, "full_attention_forward");
  cuda::check_out_bf16(p, false, "full_attention_forward");
  cuda::check_in_bf16(p, false, "full_attention_forward");
  if (p.L == 0) return;
  const int staged = p.precision == AttentionPrecision::bf16 ? cuda::kMmaFwdStaged : 0;
  const cuda::AttnScratch sc = cuda::carve_scratch(
      ws_, p.L, p.dh, 1, false, staged,
      staged == 0 ? cuda::ScratchGrads::fp32 : cuda::ScratchGrads::none);
  const cuda::AttnGeom g = cuda::make_geom(p, nullptr, true);
  if (p.precision == AttentionPrecision::bf16) {  // k_hat staged from qk directly
    cuda::mma_attention_forward(p, nullptr, true, qk, nullptr, v, out, lse, sc.stage, stream_);
  } else {
    cuda::launch_normalise(sc, qk, p, stream_);
    cuda::dispatch_forward<true>(g, 1, qk, sc.khat, v, out, lse, stream_);
  }
}

}  // namespace reformer
