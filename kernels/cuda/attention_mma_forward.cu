// Attention forward on tensor cores (AttentionParams::precision == bf16):
// same semantics and outputs as attn_forward_kernel (attention_common.cuh),
// FlashAttention-2 style.
//
// mma_stage_kernel (attention_mma.cuh; pre-pass, once per call): for every
// position the query, k_hat and v rows as bf16, zero padded to DH = 32, 64
// or 128 columns: Qs[pos] = bf16(qk[pos]), Ks (k_hat, normalised there from
// qk when the caller passes no fp32 k_hat), Vs (v), each [L, DH]
// in the op's workspace (carve_scratch, 3 * 2 * L * DH bytes), read by every
// round.
//
// mma_forward_kernel: one block of 4 warps per (round, chunk, tile of 64
// queries) (full: per tile of 64 positions); warp w owns queries
// 16w .. 16w+15 of the tile. The tile's query rows are gathered by position
// (the round's permutation); for each tile of 64 keys of the window
// (chunk_list order, as the fp32 kernel) the staged k_hat and v rows of its
// positions are copied with cp.async into one K and one V buffer: K of tile
// i + 1 is in flight during the softmax and P V of tile i, V of tile i + 1
// during S of tile i + 1.
// Fragments come by ldmatrix (.trans for V). S = Q K_hat^T runs on
// mma.m16n8k16 with fp32 accumulators, the masks are applied to the fp32
// scores by the original positions, the online max-shifted softmax runs in
// fp32 registers, P is rounded to bf16 in registers and O += P V runs on
// mma. out = O / l and lse = m + log l are written in fp32 by position. The
// weights use the hardware ex2 (fast_exp), the fp32 kernels expf.
// The same bf16 operands meet in the same order as in a gathered load, so
// staging changes no result.
//
// Work per call: 4 * dh * (query, key) pairs flops, the pairs being
// R * L * W (chunked, W = window keys = chunks in the window * chunk) or
// L^2 / 2 (full causal); at L = 64K, R = 4, W = 128, dh = 128 that is
// 17 GFLOP per head. Limits: chunks of 32 leave half of the warps idle
// (64-query tiles).
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/attention_mma.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr int kFwdKeys = 64;  // keys per pass
static_assert(kFwdKeys == kMmaRows, "the Q, K and V tiles share one shape");

template <int DH>
constexpr size_t mma_fwd_smem() {
  return sizeof(bf16) * size_t(3 * kMmaRows * mma_stride(DH));
}

// Chunked: out = out_r [R, L, dh], lse [R, L]. Full: out [L, ld], lse [L].
template <int DH, bool FULL>
__global__ void __launch_bounds__(kMmaBlock, DH == 32 ? 5 : 4)
    mma_forward_kernel(AttnGeom g, MmaStage st, float* out, float* lse) {
  constexpr int S = mma_stride(DH);  // row stride of sQ, sK, sV
  constexpr int NT = kFwdKeys / 8;   // score tiles per warp strip
  constexpr int OT = DH / 8;         // output tiles per warp strip
  extern __shared__ float4 mma_fwd_smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(mma_fwd_smem4);  // [kMmaRows][S]
  bf16* sK = sQ + kMmaRows * S;                        // [kFwdKeys][S]
  bf16* sV = sK + kFwdKeys * S;                        // [kFwdKeys][S]
  __shared__ int sqpos[kMmaRows];
  __shared__ __align__(8) int skpos[2][kFwdKeys];  // positions of the keys of tiles i (i % 2)
  __shared__ int swin[kMaxWindow];
  __shared__ int s_nwin;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  int64_t r, c, t;
  const int32_t* pr = mma_block_start<FULL>(g, +1, sqpos, swin, &s_nwin, &r, &c, &t);
  const int64_t n_keys = FULL ? (g.causal ? min(g.L, (t + 1) * kMmaRows) : g.L)
                              : int64_t(s_nwin) * g.chunk;
  // Staged rows are positions: the tile's (sqpos), the first key tile's
  // (from the permutation), then those of key tile i + 1 (skpos[buf ^ 1],
  // written before the barrier that precedes its copies).
  auto q_row = [&](int i) -> int { return sqpos[i]; };
  auto first_key_row = [&](int i) -> int {
    return window_position<FULL>(g, pr, swin, 0, i, n_keys);
  };
  // cp.async groups in commit order: {Q, K_0}, {V_0}, then {K_i+1}, {V_i+1}
  // per tile i (empty past the last tile), so wait<1> before S of tile i
  // leaves only V_i in flight and wait<1> before P V only K_i+1.
  copy_rows<kMmaRows, DH>(sQ, S, st.dst[0], q_row, tid);
  if (tid < kFwdKeys) skpos[0][tid] = window_position<FULL>(g, pr, swin, 0, tid, n_keys);
  copy_rows<kFwdKeys, DH>(sK, S, st.dst[1], first_key_row, tid);
  cp_async_commit();
  copy_rows<kFwdKeys, DH>(sV, S, st.dst[2], first_key_row, tid);
  cp_async_commit();
  // This thread's two rows (C rows gr and gr + 8 of its warp's strip).
  const int qpos[2] = {sqpos[row0], sqpos[row0 + 8]};

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[OT][4];
#pragma unroll
  for (int ot = 0; ot < OT; ++ot) o[ot][0] = o[ot][1] = o[ot][2] = o[ot][3] = 0.0f;

  int buf = 0;
  for (int64_t k0 = 0; k0 < n_keys; k0 += kFwdKeys, buf ^= 1) {
    cp_async_wait<1>();
    __syncthreads();  // K_i (and Q) landed for every thread
    float sc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
    const int64_t k1 = k0 + kFwdKeys;
    // Positions of tile i + 1, loaded during the mma, stored before the
    // barrier (skpos[buf ^ 1] was last read by the masks of tile i - 1).
    const int next_kpos =
        tid < kFwdKeys ? window_position<FULL>(g, pr, swin, 0, k1 + tid, n_keys) : -1;
    ldsm_strip_nt<DH, NT>(sc, sQ, S, 16 * warp, sK, S, lane);
    if (tid < kFwdKeys) skpos[buf ^ 1][tid] = next_kpos;
    __syncthreads();  // sK consumed, positions of tile i + 1 written: fetch K_i+1
    const int* next_pos = skpos[buf ^ 1];
    auto next_row = [&](int i) -> int { return next_pos[i]; };
    if (k1 < n_keys) copy_rows<kFwdKeys, DH>(sK, S, st.dst[1], next_row, tid);
    cp_async_commit();

    // Masks by position on the fp32 scores; keys past the window get -inf.
    const int* kpos = skpos[buf];
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int2 kp2 = *reinterpret_cast<const int2*>(kpos + nt * 8 + 2 * t4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kp = e & 1 ? kp2.y : kp2.x;
        bool masked;
        sc[nt][e] = kp < 0 ? -INFINITY : masked_score(sc[nt][e], qpos[e >> 1], kp, g.causal,
                                                      &masked);
        mx[e >> 1] = fmaxf(mx[e >> 1], sc[nt][e]);
      }
    }
    float corr[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float mn = fmaxf(m[h], quad_max(mx[h]));
      shift[h] = mn == -INFINITY ? 0.0f : mn;  // no valid key yet: every p is 0
      corr[h] = fast_exp(m[h] - shift[h]);
      m[h] = mn;
    }
    float ls[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[nt][e] = fast_exp(sc[nt][e] - shift[e >> 1]);
        ls[e >> 1] += sc[nt][e];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * corr[h] + ls[h];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      o[ot][0] *= corr[0];
      o[ot][1] *= corr[0];
      o[ot][2] *= corr[1];
      o[ot][3] *= corr[1];
    }
    cp_async_wait<1>();
    __syncthreads();  // V_i landed for every thread
    ldsm_strip_pv<DH, kFwdKeys / 16>(o, sc, sV, S, lane);
    __syncthreads();  // sV consumed: fetch V_i+1
    if (k1 < n_keys) copy_rows<kFwdKeys, DH>(sV, S, st.dst[2], next_row, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float lt = quad_sum(l[h]);  // each lane summed its own columns
    if (qpos[h] < 0) continue;
    const float inv = 1.0f / lt;
    float* dst = FULL ? out + int64_t(qpos[h]) * g.ld : out + (r * g.L + qpos[h]) * g.dh;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot)
      store_pair(dst, ot * 8 + 2 * t4, g.dh, g.pairs, o[ot][2 * h] * inv, o[ot][2 * h + 1] * inv);
    if (t4 == 0) lse[(FULL ? 0 : r * g.L) + qpos[h]] = m[h] + logf(lt);
  }
}

template <int DH, bool FULL>
void launch_mma_forward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                        const float* v, float* out, float* lse, void* stage, cudaStream_t s) {
  // k_hat staged from qk (khat null: the forward skips the fp32 k_hat).
  MmaStage st{{qk, khat, v}, {g.ld, g.dh, g.ld}, {}, kMmaFwdStaged, khat == nullptr, nullptr};
  launch_mma_stage<DH>(g, stage, &st, s);
  constexpr size_t smem = mma_fwd_smem<DH>();
  set_mma_smem(mma_forward_kernel<DH, FULL>, smem);
  mma_forward_kernel<DH, FULL><<<attn_blocks(g, rounds), kMmaBlock, smem, s>>>(g, st, out, lse);
  CUDA_CHECK_LAUNCH("mma_forward_kernel");
}

template <bool FULL>
void dispatch_mma_forward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                          const float* v, float* out, float* lse, void* stage, cudaStream_t s) {
  switch (kernel_dhm(g.dh)) {
    case 32: launch_mma_forward<32, FULL>(g, rounds, qk, khat, v, out, lse, stage, s); break;
    case 64: launch_mma_forward<64, FULL>(g, rounds, qk, khat, v, out, lse, stage, s); break;
    default: launch_mma_forward<128, FULL>(g, rounds, qk, khat, v, out, lse, stage, s); break;
  }
}

}  // namespace

void mma_attention_forward(const AttentionParams& p, const int32_t* perm, bool full,
                           const float* qk, const float* khat, const float* v, float* out,
                           float* lse, void* stage, cudaStream_t s) {
  AttnGeom g = mma_geom(p, perm, full);
  g.pairs = mma_pairs(g.dh, full ? g.ld : g.dh, {out});
  if (full)
    dispatch_mma_forward<true>(g, 1, qk, khat, v, out, lse, stage, s);
  else
    dispatch_mma_forward<false>(g, p.n_rounds, qk, khat, v, out, lse, stage, s);
}

}  // namespace cuda
}  // namespace reformer
