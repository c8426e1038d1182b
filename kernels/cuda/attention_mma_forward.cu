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
// mma. out = O / l and lse = m + log l are written in fp32 by position (or,
// where the caller keeps no round outputs, out in bf16 rows into the op's
// workspace, combined from there by combine_bf16_kernel). The
// weights use the hardware ex2 (fast_exp), the fp32 kernels expf.
// The same bf16 operands meet in the same order as in a gathered load, so
// staging changes no result.
//
// mma_forward_walk_kernel: the same for the Reformer's look-one-back window
// (chunks of 64, mma_walks in attention_mma.cuh): one block walks a run of
// g.walk chunks and gathers each chunk's K and V once, not twice.
//
// Work per call: 4 * dh * (query, key) pairs flops, the pairs being
// R * L * W (chunked, W = window keys = chunks in the window * chunk) or
// L^2 / 2 (full causal); at L = 64K, R = 4, W = 128, dh = 128 that is
// 17 GFLOP per head. Limits: chunks of 32 leave half of the warps idle
// (64-query tiles).
#include <cuda_runtime.h>

#include <cmath>
#include <functional>
#include <type_traits>

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

// One key tile of the online softmax for this thread's two rows (C rows gr
// and gr + 8 of its warp's strip): sc holds the tile's fp32 scores S (8 NT
// keys, positions kpos; -1 = none) and leaves as the unnormalised weights P;
// the masks apply by position, m, l and the output o (8 OT columns) are
// rescaled to the new row maxima. kMask: kMaskAny (masked_score, padded
// keys -inf), or the walks' masks (walk_score) without or with the query's
// own key in the tile. kFirst: the row's first tile (m = -inf, l = 0, o =
// 0 on entry), whose rescaling by 0 is skipped (the same values).
enum { kMaskAny, kMaskWalk, kMaskWalkSelf };
template <int NT, int OT, int kMask = kMaskAny, bool kFirst = false>
__device__ __forceinline__ void softmax_tile(float (*sc)[4], float (*o)[4], float* m, float* l,
                                             const int* kpos, const int* qpos, bool causal,
                                             int t4) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int2 kp2 = *reinterpret_cast<const int2*>(kpos + nt * 8 + 2 * t4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kp = e & 1 ? kp2.y : kp2.x;
      bool masked;
      if (kMask == kMaskAny)
        sc[nt][e] =
            kp < 0 ? -INFINITY : masked_score(sc[nt][e], qpos[e >> 1], kp, causal, &masked);
      else
        sc[nt][e] =
            walk_score<kMask == kMaskWalkSelf>(sc[nt][e], qpos[e >> 1], kp, causal, &masked);
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
  for (int h = 0; h < 2; ++h) l[h] = kFirst ? ls[h] : l[h] * corr[h] + ls[h];
  if constexpr (!kFirst) {
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      o[ot][0] *= corr[0];
      o[ot][1] *= corr[0];
      o[ot][2] *= corr[1];
      o[ot][3] *= corr[1];
    }
  }
}

// out[qpos] (row stride ld) = o / l and lse[qpos] = m + log l for this
// thread's two rows (skipped where qpos < 0).
template <int OT>
__device__ __forceinline__ void write_rows(const AttnGeom& g, float* out, int64_t ld, float* lse,
                                           float (*o)[4], const float* m, const float* l,
                                           const int* qpos, int t4) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float lt = quad_sum(l[h]);  // each lane summed its own columns
    if (qpos[h] < 0) continue;
    const float inv = 1.0f / lt;
    float v[OT][2];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      v[ot][0] = o[ot][2 * h] * inv;
      v[ot][1] = o[ot][2 * h + 1] * inv;
    }
    store_row<OT>(out + int64_t(qpos[h]) * ld, 2 * t4, g.dh, g.pairs, v, false);
    if (t4 == 0) lse[qpos[h]] = m[h] + logf(lt);
  }
}

// The same in bf16 into out [., DH] rows (the padding columns 0), a quad
// filling one 32-byte sector per store (store_rows_bf16). Every lane of the
// warp must call it.
template <int OT>
__device__ __forceinline__ void write_rows_bf16(bf16* out, float* lse, float (*o)[4],
                                                const float* m, const float* l, const int* qpos,
                                                int lane) {
  bf16* rows[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float lt = quad_sum(l[h]);
    const float inv = 1.0f / lt;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      o[ot][2 * h] *= inv;
      o[ot][2 * h + 1] *= inv;
    }
    rows[h] = qpos[h] < 0 ? nullptr : out + int64_t(qpos[h]) * (8 * OT);
    if (qpos[h] >= 0 && (lane & 3) == 0) lse[qpos[h]] = m[h] + logf(lt);
  }
  store_rows_bf16<OT>(rows, o, lane);
}

// The same through shared memory: the warp's 16 rows go as bf16 into sw
// (its own 16 rows of row stride st, which no other warp reads meanwhile),
// then each row to out[wpos[row]] in 16-byte pieces (skipped where wpos <
// 0). Fewer instructions than the quads' trades of store_rows_bf16 (8 OT
// shuffles a row pair); the same values.
template <int OT>
__device__ __forceinline__ void write_rows_bf16_staged(bf16* out, float* lse, float (*o)[4],
                                                       const float* m, const float* l,
                                                       const int* qpos, const int* wpos,
                                                       bf16* sw, int st, int lane) {
  constexpr int DH = 8 * OT, kPieces = DH / 8;  // 16-byte pieces a row
  const int t4 = lane & 3, gr = lane >> 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float lt = quad_sum(l[h]);
    const float inv = 1.0f / lt;
    if (qpos[h] >= 0 && t4 == 0) lse[qpos[h]] = m[h] + logf(lt);
    bf16* row = sw + (gr + 8 * h) * st + 2 * t4;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot)
      *reinterpret_cast<uint32_t*>(row + 8 * ot) =
          pack_bf16(o[ot][2 * h] * inv, o[ot][2 * h + 1] * inv);
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * kPieces; i += 32) {
    const int r = i / kPieces, piece = i % kPieces, pos = wpos[r];
    if (pos >= 0)
      *reinterpret_cast<uint4*>(out + int64_t(pos) * DH + 8 * piece) =
          *reinterpret_cast<const uint4*>(sw + r * st + 8 * piece);
  }
}

// Chunked: out = out_r [R, L, dh] (or, out_b non-null, the rounds' outputs
// in bf16 [R, L, DH] there), lse [R, L]. Full: out [L, ld], lse [L].
template <int DH, bool FULL>
__global__ void __launch_bounds__(kMmaBlock, DH == 32 ? 5 : 4)
    mma_forward_kernel(AttnGeom g, MmaStage st, float* out, bf16* out_b, float* lse) {
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

    softmax_tile<NT, OT>(sc, o, m, l, skpos[buf], qpos, g.causal, t4);
    cp_async_wait<1>();
    __syncthreads();  // V_i landed for every thread
    ldsm_strip_pv<DH, kFwdKeys / 16>(o, sc, sV, S, lane);
    __syncthreads();  // sV consumed: fetch V_i+1
    if (k1 < n_keys) copy_rows<kFwdKeys, DH>(sV, S, st.dst[2], next_row, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();
  if (!FULL && out_b)
    write_rows_bf16<OT>(out_b + r * g.L * DH, lse + r * g.L, o, m, l, qpos, lane);
  else
    write_rows<OT>(g, FULL ? out : out + r * g.L * g.dh, FULL ? g.ld : g.dh,
                   FULL ? lse : lse + r * g.L, o, m, l, qpos, t4);
}

// Walking forward: chunks of kMmaRows slots whose window is the previous
// chunk and the chunk itself (chunks_before 1, chunks_after 0: the Reformer's
// look-one-back), at least two chunks. One block per (round, run of g.walk
// consecutive chunks) walks its chunks in order. The keys of chunk c serve
// as the second tile of c's window and the first of c + 1's, so each chunk's
// K and V are gathered once per run instead of twice: two K / V slots
// alternate (the previous chunk's, this chunk's), and the slot of c - 1 is
// refilled with c + 1 as soon as c's first tile has used it (K after S, V
// after P V). Q is double buffered: Q of c + 1 is fetched at the start of c.
// Every copy of chunk c + 1 has a whole tile or more to land before the wait
// at the start of c + 1, the block's one wait per chunk. Per chunk the
// tiles and softmax steps are the mma_forward_kernel's in the same order
// (chunk_list's: c - 1, then c), and so are the results: the masks are
// walk_score's (fewer instructions, the same weights), the first tile skips
// rescaling a zero output, and the rows go out through shared memory.
template <int DH>
constexpr size_t mma_walk_smem() {
  return sizeof(bf16) * size_t(6 * kMmaRows * mma_stride(DH));
}

template <int DH>
__global__ void __launch_bounds__(kMmaBlock, 2)
    mma_forward_walk_kernel(AttnGeom g, MmaStage st, float* out, bf16* out_b, float* lse) {
  constexpr int S = mma_stride(DH);
  constexpr int NT = kMmaRows / 8;
  constexpr int OT = DH / 8;
  constexpr int T = kMmaRows * S;  // one tile
  extern __shared__ float4 mma_walk_smem4[];
  bf16* sQ = reinterpret_cast<bf16*>(mma_walk_smem4);  // [2][kMmaRows][S]
  bf16* sK = sQ + 2 * T;                                // [2][kMmaRows][S] slots
  bf16* sV = sK + 2 * T;                                // [2][kMmaRows][S] slots
  // Positions of the walk's chunks: chunk index i (-1: the one before the
  // run's first) in spos[(i + 1) % 3].
  __shared__ __align__(8) int spos[3][kMmaRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t4 = lane & 3, row0 = 16 * warp + (lane >> 2);
  const int64_t runs = (g.n_chunks + g.walk - 1) / g.walk;
  const int64_t r = blockIdx.x / runs, c0 = (blockIdx.x % runs) * g.walk;
  const int n = int(min(int64_t(g.walk), g.n_chunks - c0));  // chunks of this run
  const int32_t* pr = g.perm + r * g.L;
  const int64_t first_prev = c0 > 0 ? c0 - 1 : g.wrap ? g.n_chunks - 1 : -1;
  if (tid < kMmaRows) {
    spos[0][tid] = first_prev < 0 ? -1 : pr[first_prev * kMmaRows + tid];
    spos[1][tid] = pr[c0 * kMmaRows + tid];
  }
  __syncthreads();
  auto rows_of = [&](const int* pos) { return [pos](int i) -> int { return pos[i]; }; };
  using Rows = RowCopies<kMmaRows, DH>;
  {
    const Rows before(rows_of(spos[0]), tid), first(rows_of(spos[1]), tid);
    before.copy(sK, S, st.dst[1]);
    before.copy(sV, S, st.dst[2]);
    first.copy(sQ + T, S, st.dst[0]);
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
    cp_async_wait<0>();
    __syncthreads();  // Q of c, both slots and the positions of c + 1 in place
    const Rows next(rows_of(next_pos), tid);  // chunk c + 1's rows, for Q, K and V
    if (more) next.copy(sQ + P * T, S, st.dst[0]);
    cp_async_commit();
    const int qpos[2] = {cur_pos[row0], cur_pos[row0 + 8]};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[OT][4];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) o[ot][0] = o[ot][1] = o[ot][2] = o[ot][3] = 0.0f;
    float sc[NT][4];
    // Tile 0: the keys of chunk c - 1 (slot P).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
    ldsm_strip_nt<DH, NT>(sc, sQ + N * T, S, 16 * warp, sK + P * T, S, lane);
    __syncthreads();  // K of c - 1 consumed: fetch K of c + 1
    if (more) next.copy(sK + P * T, S, st.dst[1]);
    cp_async_commit();
    softmax_tile<NT, OT, kMaskWalk, true>(sc, o, m, l, prev_pos, qpos, g.causal, t4);
    ldsm_strip_pv<DH, kMmaRows / 16>(o, sc, sV + P * T, S, lane);
    __syncthreads();  // V of c - 1 consumed: fetch V of c + 1
    if (more) next.copy(sV + P * T, S, st.dst[2]);
    cp_async_commit();
    // Tile 1: the keys of chunk c (slot N).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
    ldsm_strip_nt<DH, NT>(sc, sQ + N * T, S, 16 * warp, sK + N * T, S, lane);
    softmax_tile<NT, OT, kMaskWalkSelf>(sc, o, m, l, cur_pos, qpos, g.causal, t4);
    ldsm_strip_pv<DH, kMmaRows / 16>(o, sc, sV + N * T, S, lane);
    // The rows' outputs go through this warp's own rows of Q of c (read
    // only by its own S above; refilled after the next chunk's barrier).
    if (out_b)
      write_rows_bf16_staged<OT>(out_b + r * g.L * DH, lse + r * g.L, o, m, l, qpos,
                                 cur_pos + 16 * warp, sQ + N * T + 16 * warp * S, S, lane);
    else
      write_rows<OT>(g, out + r * g.L * g.dh, g.dh, lse + r * g.L, o, m, l, qpos, t4);
  }
  cp_async_wait<0>();
}

// The forward's kernels over operands already staged (st).
template <int DH, bool FULL>
void launch_mma_forward_kernels(const AttnGeom& g, int rounds, const MmaStage& st, float* out,
                                bf16* out_b, float* lse, cudaStream_t s) {
  if (!FULL && mma_walks(g)) {
    constexpr size_t smem = mma_walk_smem<DH>();
    set_mma_smem(mma_forward_walk_kernel<DH>, smem);
    const int64_t runs = (g.n_chunks + g.walk - 1) / g.walk;
    mma_forward_walk_kernel<DH>
        <<<unsigned(rounds * runs), kMmaBlock, smem, s>>>(g, st, out, out_b, lse);
    CUDA_CHECK_LAUNCH("mma_forward_walk_kernel");
    return;
  }
  constexpr size_t smem = mma_fwd_smem<DH>();
  set_mma_smem(mma_forward_kernel<DH, FULL>, smem);
  mma_forward_kernel<DH, FULL>
      <<<attn_blocks(g, rounds), kMmaBlock, smem, s>>>(g, st, out, out_b, lse);
  CUDA_CHECK_LAUNCH("mma_forward_kernel");
}

// The operands of a forward call staged (k_hat from qk where khat is null:
// the forward skips the fp32 k_hat).
template <int DH>
MmaStage stage_mma_forward(const AttnGeom& g, const float* qk, const float* khat,
                           const float* v, void* stage, cudaStream_t s, float* norm = nullptr) {
  MmaStage st{{qk, khat, v}, {g.ld, g.dh, g.ld}, {}, kMmaFwdStaged, khat == nullptr, norm};
  st.src_bf16 = g.in_bf16;
  launch_mma_stage<DH>(g, stage, &st, s);
  return st;
}

template <int DH, bool FULL>
void launch_mma_forward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                        const float* v, float* out, bf16* out_b, float* lse, void* stage,
                        cudaStream_t s, float* norm) {
  const MmaStage st = stage_mma_forward<DH>(g, qk, khat, v, stage, s, norm);
  launch_mma_forward_kernels<DH, FULL>(g, rounds, st, out, out_b, lse, s);
}

// fold_rounds: the staging once, then per round its kernels into out_1 and
// lse + r L, and fold(r).
template <int DH>
void launch_mma_forward_folded(AttnGeom g, const int32_t* perm, int rounds, const float* qk,
                               const float* v, float* out_1, bf16* out_b, float* lse,
                               void* stage, cudaStream_t s,
                               const std::function<void(int)>& fold) {
  const MmaStage st = stage_mma_forward<DH>(g, qk, nullptr, v, stage, s);
  for (int r = 0; r < rounds; ++r) {
    g.perm = perm + int64_t(r) * g.L;
    launch_mma_forward_kernels<DH, false>(g, 1, st, out_1, out_b, lse + int64_t(r) * g.L, s);
    fold(r);
  }
}

// out = sum_r w[r, i] out_b[r, i] for the bf16 round outputs [R, L, DH] of
// a call, the weights as combine_rounds_kernel's (attention_forward.cu),
// sums in fp32 in round order. With kVec (dh == DH, out's row stride a
// multiple of 8 values and both buffers 16-byte aligned: combine_rounds_bf16)
// kCombineLanes<DH> lanes take a position, lane l its columns 8 l .. 8 l +
// 7, one 16-byte access per row (load_cols, store_cols), 32 / that
// positions a warp (one per warp, 8 bytes a lane and row: 28.6 us a call
// at 64K, 2.7 TB/s; so 23.1 us, 3.3 TB/s; bench/RESULTS.md, 2026-12-03
// (twenty-third)). Else one warp per position, lane l its columns l + 32 t.
// OutT: float, or bf16 rounded to nearest even (AttentionParams::out_bf16).
template <int DH>
constexpr int kCombineLanes = DH / 8;
template <int DH, bool kVec>
constexpr int combine_positions_per_warp() {
  return kVec ? 32 / kCombineLanes<DH> : 1;
}
template <int DH, bool kVec, class OutT>
__global__ void combine_bf16_kernel(OutT* out, int64_t ld, const bf16* out_b, const float* lse,
                                    int64_t L, int dh, int R) {
  constexpr int E = kVec ? 8 : DH / 32;          // columns per lane
  constexpr int LP = kVec ? kCombineLanes<DH> : 32;  // lanes per position
  constexpr int PW = combine_positions_per_warp<DH, kVec>();
  const int lane = threadIdx.x & 31, l = lane % LP;
  const int64_t i = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * PW + lane / LP;
  if (i >= L) return;
  const RoundWeights weight = round_weights(lse, L, i, R);
  float acc[E] = {};
  for (int r = 0; r < R; ++r) {
    const float w = weight(r);
    const bf16* row = out_b + (int64_t(r) * L + i) * DH;
    float x[E];
    if constexpr (kVec) {
      load_cols<E>(row + l * E, x);
    } else {
#pragma unroll
      for (int t = 0; t < E; ++t) x[t] = __bfloat162float(row[l + 32 * t]);
    }
#pragma unroll
    for (int t = 0; t < E; ++t) acc[t] += w * x[t];
  }
  if constexpr (kVec) {
    store_cols<E>(out + i * ld + l * E, acc);
  } else {
#pragma unroll
    for (int t = 0; t < E; ++t)
      if (l + 32 * t < dh) store_cols<1>(out + i * ld + l + 32 * t, acc + t);
  }
}

// combine_bf16_kernel over a call's rounds into out (OutT rows, stride
// p.ld), by vector accesses where the rows allow.
template <class OutT>
void combine_rounds_bf16(OutT* out, const AttentionParams& p, int dhm, const bf16* out_b,
                         const float* lse, cudaStream_t s) {
  const bool vec = p.dh == dhm && p.ld % 8 == 0 && aligned(out, 16) && aligned(out_b, 16);
  auto combine = [&](auto kernel, int per_warp) {
    const int64_t rows = int64_t(kWarps) * per_warp;
    kernel<<<unsigned((p.L + rows - 1) / rows), kBlock, 0, s>>>(out, p.ld, out_b, lse, p.L,
                                                                 p.dh, p.n_rounds);
    CUDA_CHECK_LAUNCH("combine_bf16_kernel");
  };
  auto launch = [&](auto dh) {
    constexpr int DH = decltype(dh)::value;
    if (vec)
      combine(combine_bf16_kernel<DH, true, OutT>, combine_positions_per_warp<DH, true>());
    else
      combine(combine_bf16_kernel<DH, false, OutT>, 1);
  };
  switch (dhm) {
    case 32: launch(std::integral_constant<int, 32>{}); break;
    case 64: launch(std::integral_constant<int, 64>{}); break;
    default: launch(std::integral_constant<int, 128>{}); break;
  }
}

template <bool FULL>
void dispatch_mma_forward(const AttnGeom& g, int rounds, const float* qk, const float* khat,
                          const float* v, float* out, bf16* out_b, float* lse, void* stage,
                          cudaStream_t s, float* norm = nullptr) {
  switch (kernel_dhm(g.dh)) {
    case 32:
      launch_mma_forward<32, FULL>(g, rounds, qk, khat, v, out, out_b, lse, stage, s, norm);
      break;
    case 64:
      launch_mma_forward<64, FULL>(g, rounds, qk, khat, v, out, out_b, lse, stage, s, norm);
      break;
    default:
      launch_mma_forward<128, FULL>(g, rounds, qk, khat, v, out, out_b, lse, stage, s, norm);
      break;
  }
}

}  // namespace

void mma_attention_forward(const AttentionParams& p, const int32_t* perm, bool full,
                           const float* qk, const float* khat, const float* v, float* out,
                           float* lse, void* stage, cudaStream_t s) {
  AttnGeom g = mma_geom(p, perm, full);
  g.pairs = mma_pairs(g.dh, full ? g.ld : g.dh, {out});
  if (full)
    dispatch_mma_forward<true>(g, 1, qk, khat, v, out, nullptr, lse, stage, s);
  else if (p.kept && !khat)  // staged into p.kept, with |k| (kept_norm)
    dispatch_mma_forward<false>(g, p.n_rounds, qk, khat, v, out, nullptr, lse, p.kept, s,
                                kept_norm(p.kept, p.L, p.dh));
  else
    dispatch_mma_forward<false>(g, p.n_rounds, qk, khat, v, out, nullptr, lse, stage, s);
}

void mma_chunked_forward_folded(const AttentionParams& p, const int32_t* perm, const float* qk,
                                const float* v, float* out_1, __nv_bfloat16* out_b, float* lse,
                                void* stage, cudaStream_t s,
                                const std::function<void(int)>& fold) {
  AttentionParams one = p;
  one.n_rounds = 1;
  AttnGeom g = mma_geom(one, perm, false);
  g.pairs = out_1 && mma_pairs(g.dh, g.dh, {out_1});
  switch (kernel_dhm(p.dh)) {
    case 32:
      launch_mma_forward_folded<32>(g, perm, p.n_rounds, qk, v, out_1, out_b, lse, stage, s, fold);
      break;
    case 64:
      launch_mma_forward_folded<64>(g, perm, p.n_rounds, qk, v, out_1, out_b, lse, stage, s, fold);
      break;
    default:
      launch_mma_forward_folded<128>(g, perm, p.n_rounds, qk, v, out_1, out_b, lse, stage, s,
                                     fold);
      break;
  }
}

void mma_chunked_forward_bf16(const AttentionParams& p, const int32_t* perm, const float* qk,
                              const float* v, float* out, __nv_bfloat16* out_b, float* lse,
                              void* stage, cudaStream_t s) {
  AttnGeom g = mma_geom(p, perm, false);
  // With p.kept the operands are staged there (kept_norm), with |k|, for
  // the backward of this head.
  dispatch_mma_forward<false>(g, p.n_rounds, qk, nullptr, v, nullptr, out_b, lse,
                              p.kept ? p.kept : stage, s,
                              p.kept ? kept_norm(p.kept, p.L, p.dh) : nullptr);
  const int dhm = kernel_dhm(p.dh);
  if (p.out_bf16)  // out holds bf16 rows (AttentionParams::out_bf16)
    combine_rounds_bf16(reinterpret_cast<bf16*>(out), p, dhm, out_b, lse, s);
  else
    combine_rounds_bf16(out, p, dhm, out_b, lse, s);
}

}  // namespace cuda
}  // namespace reformer
