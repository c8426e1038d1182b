// Shared pieces of the CUDA attention ops (attention_forward.cu,
// attention_backward.cu): the call geometry, device helpers for windows,
// masks and tile loads, the key normalisation, argument checks and the
// per-call scratch layout. Internal to those two files (everything is in an
// unnamed namespace, one copy per translation unit).
//
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
//  - finish_rounds_kernel: sums the rounds in order, projects dkhat through
//    the normalisation and ACCUMULATES into dqk and dv.
// Every output element is written by one thread in a fixed order: the
// forward and backward are bitwise reproducible (no atomics).
// These kernels run with AttentionParams::precision == fp32. With bf16 the
// forward, query-side and key-side kernels are replaced by their tensor-core
// twins (attention_mma_forward.cu, attention_mma_backward.cu: 64-row tiles,
// bf16 mma with fp32 accumulation, same window lists, masks and outputs);
// row_stats' arithmetic is shared (the tensor-core staging does it as it
// reads dout), and combine_rounds where the caller keeps the rounds' outputs
// (out_r). The tensor-core kernels take k_hat from qk (no
// normalise_keys pass), and keep a call's round outputs and per-round
// gradients in bf16 with their own combine and round sum
// (combine_bf16_kernel; finish_rounds_kernel on bf16 rows).
// Limits: dh <= 128, chunks_before + chunks_after + 1 <= 32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

#include "kernels/errors.h"
#include "kernels/common/attention_checks.h"
#include "kernels/common/params.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/workspace.h"

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
  int chunk_shift;      // log2(chunk) when chunk is a power of two, else -1
  int64_t n_chunks;     // L / chunk (chunked); 1 when full
  int before, after;    // window offsets (chunked)
  bool wrap;            // window wraps around the round (chunked)
  bool causal;          // mask keys after the query
  bool pairs;           // (mma kernels) outputs written two columns per 8-byte access
  int64_t row_tiles;    // kTile-row tiles per chunk (chunked) or per sequence (full)
  int walk;             // (mma walking kernels) chunks per block
  bool out_bf16;        // out in bf16 (AttentionParams::out_bf16): tensor-core paths
  bool in_bf16;         // qk, v in bf16 (AttentionParams::in_bf16): tensor-core stagings
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
// -1 past the window's end. A window holds each chunk once, so k < L fits
// an int; a power-of-two chunk (the usual case) divides by a shift.
template <bool FULL>
__device__ __forceinline__ int window_position(const AttnGeom& g, const int32_t* pr,
                                               const int* chunks, int64_t first, int64_t k,
                                               int64_t n) {
  if (k >= n) return -1;
  if (FULL) return int(first + k);
  const int kw = int(k);
  const int kc = chunks[g.chunk_shift >= 0 ? kw >> g.chunk_shift : kw / g.chunk];
  const int in = g.chunk_shift >= 0 ? kw & (g.chunk - 1) : kw % g.chunk;
  return pr[int64_t(kc) * g.chunk + in];
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

// The weights that combine position i's rounds from their log-sum-exps lse
// [R, L]: m = max_r lse[r, i], 1 / z = 1 / sum_r exp(lse[r, i] - m), and
// round r's weight exp(lse[r, i] - m) / z.
struct RoundWeights {
  const float* lse;
  int64_t L, i;
  float m, inv_z;
  __device__ float operator()(int r) const { return expf(lse[int64_t(r) * L + i] - m) * inv_z; }
};
// The lse of up to kRoundBatch rounds are loaded together, then used in
// round order: a loop over a runtime R stays rolled and would wait out one
// memory latency per round (at 64K, R = 4: the tensor-core backward's
// staging 73.2 -> 66.2 us a call, combine_bf16_kernel 32.3 -> 30.7 us;
// bench/RESULTS.md, 2026-12-02 (thirteenth)).
constexpr int kRoundBatch = 4;
__device__ __forceinline__ RoundWeights round_weights(const float* lse, int64_t L, int64_t i,
                                                      int R) {
  float m = 0.0f, z = 0.0f;
  for (int pass = 0; pass < 2; ++pass) {  // the max, then the sum (the same loads again)
    for (int r0 = 0; r0 < R; r0 += kRoundBatch) {
      float x[kRoundBatch];
#pragma unroll
      for (int k = 0; k < kRoundBatch; ++k)
        if (r0 + k < R) x[k] = lse[int64_t(r0 + k) * L + i];
#pragma unroll
      for (int k = 0; k < kRoundBatch; ++k) {
        if (r0 + k >= R) break;
        if (pass == 0)
          m = r0 + k == 0 ? x[k] : fmaxf(m, x[k]);
        else
          z += expf(x[k] - m);
      }
    }
  }
  return {lse, L, i, m, 1.0f / z};
}

// round_weights computed by a warp together, every lane calling it for the
// same position i: lane r < R loads lse[r, i] and takes exp(lse[r, i] - m)
// once, the max comes by shuffles (fmaxf gives the same maximum in any
// order) and every lane sums the R exponentials in round order, so m and
// 1 / z are round_weights' bits (its weights recompute their exponentials).
// For the stagings' row statistics, where every lane computed all of them
// itself (2 R expf a lane and position): at 64K the kept backward's staging
// 29.8 -> 26.2 us a call. combine_bf16_kernel, which also wants the
// weights, stays with round_weights: the weights shuffled from these lanes
// left it 28.6 -> 29.9 us (bench/RESULTS.md, 2026-12-03 (twenty-third)).
// R > 32: round_weights itself.
__device__ __forceinline__ RoundWeights warp_round_weights(const float* lse, int64_t L, int64_t i,
                                                           int R, int lane) {
  if (R > 32) return round_weights(lse, L, i, R);
  const float x = lane < R ? lse[int64_t(lane) * L + i] : -INFINITY;
  float m = x;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float e = lane < R ? expf(x - m) : 0.0f;
  float z = 0.0f;
  for (int r = 0; r < R; ++r) z += __shfl_sync(0xffffffffu, e, r);
  return {lse, L, i, m, 1.0f / z};
}

__device__ __forceinline__ float row_value(float x) { return x; }
__device__ __forceinline__ float row_value(__nv_bfloat16 x) { return __bfloat162float(x); }

// E consecutive row values from p (aligned to E elements) as floats, and
// back: one 4E- or 2E-byte access instead of E.
template <int E>
__device__ __forceinline__ void load_cols(const float* p, float* v) {
  if constexpr (E == 4) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else if constexpr (E == 2) {
    const float2 x = *reinterpret_cast<const float2*>(p);
    v[0] = x.x, v[1] = x.y;
  } else {
    v[0] = *p;
  }
}
template <int E>
__device__ __forceinline__ void load_cols(const __nv_bfloat16* p, float* v) {
  if constexpr (E == 8) {
    const uint4 x = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[k]));
      v[2 * k] = a.x, v[2 * k + 1] = a.y;
    }
  } else if constexpr (E == 4) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x.y));
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  } else if constexpr (E == 2) {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    v[0] = a.x, v[1] = a.y;
  } else {
    v[0] = __bfloat162float(*p);
  }
}
template <int E>
__device__ __forceinline__ void store_cols(float* p, const float* v) {
  if constexpr (E == 8) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
  } else if constexpr (E == 4)
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  else if constexpr (E == 2)
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  else
    *p = v[0];
}
template <int E>
__device__ __forceinline__ void store_cols(__nv_bfloat16* p, const float* v) {  // rounded
  if constexpr (E == 8) {
    uint4 x;
    uint32_t* w = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      *reinterpret_cast<__nv_bfloat162*>(&w[k]) = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = x;
  } else if constexpr (E == 4) {
    uint2 x;
    *reinterpret_cast<__nv_bfloat162*>(&x.x) = __floats2bfloat162_rn(v[0], v[1]);
    *reinterpret_cast<__nv_bfloat162*>(&x.y) = __floats2bfloat162_rn(v[2], v[3]);
    *reinterpret_cast<uint2*>(p) = x;
  } else if constexpr (E == 2) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
  } else {
    *p = __float2bfloat16_rn(v[0]);
  }
}

// The round sum of a backward of several rounds, one warp per position j,
// from per-round rows [R, L, ld_r] (fp32, or bf16 on tensor cores):
// dv[j] += sum_r dv_r[r, j]; dqk[j] += P_j(sum_r dkh_r[r, j]) / |k_j| +
// sum_r dq_r[r, j] with P_j = I - k_hat_j k_hat_j^T and k_hat_j = k_j /
// |k_j| (normalise_keys_kernel's division), k_j the row j of kq (row
// stride ld_k): qk itself on the fp32 path; with bf16 rows, those of the
// tensor-core path, the staged query rows (bf16(qk_j), the k its staging
// normalised), so that the backward reads no fp32 qk once staged (and
// none at all where the forward kept its staging); sums in fp32 in round
// order.
// E columns per lane, dh <= 32 E: with kVec (dh == 32 E, every row aligned
// to E elements: launch_finish_rounds) lane l takes columns E l .. E l + E -
// 1, one vector access per row; else columns l + 32 t. Without kAdd, dqk
// and dv are written (=) instead (AttentionParams::accumulate false). Out:
// float, or bf16 rounded to nearest even (AttentionParams::grad_bf16, which
// only writes), ld counting Out elements.
template <int E, class Row, bool kVec, bool kAdd, class Out>
__global__ void finish_rounds_kernel(Out* dqk, Out* dv, const Row* dq_r, const Row* dkh_r,
                                     const Row* dv_r, int64_t ld_r, const Row* kq, int64_t ld_k,
                                     const float* norm, int64_t L, int64_t ld, int dh, int R) {
  static_assert(!kAdd || std::is_same_v<Out, float>, "bf16 gradients are written, not added");
  const int64_t j = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (j >= L) return;
  // E values of this lane's columns of a row (0 past dh), and back.
  auto load = [&](const auto* row, float* v) {
    if constexpr (kVec) {
      load_cols<E>(row + lane * E, v);
    } else {
#pragma unroll
      for (int t = 0; t < E; ++t) v[t] = lane + 32 * t < dh ? row_value(row[lane + 32 * t]) : 0.0f;
    }
  };
  auto store = [&](Out* row, const float* v) {
    if constexpr (kVec) {
      store_cols<E>(row + lane * E, v);
    } else {
#pragma unroll
      for (int t = 0; t < E; ++t)
        if (lane + 32 * t < dh) store_cols<1>(row + lane + 32 * t, v + t);
    }
  };
  auto round_sum = [&](const Row* x, float* acc) {
#pragma unroll
    for (int t = 0; t < E; ++t) acc[t] = 0.0f;
    for (int r = 0; r < R; ++r) {
      float v[E];
      load(x + (int64_t(r) * L + j) * ld_r, v);
#pragma unroll
      for (int t = 0; t < E; ++t) acc[t] += v[t];
    }
  };
  float acc[E], cur[E] = {};
  if (dv) {
    round_sum(dv_r, acc);
    if constexpr (kAdd) load(dv + j * ld, cur);
#pragma unroll
    for (int t = 0; t < E; ++t) cur[t] += acc[t];
    store(dv + j * ld, cur);
  }
  if (!dqk) return;
  const float n = norm[j];
  float kh[E], dq[E];
  round_sum(dkh_r, acc);
  round_sum(dq_r, dq);
  load(kq + j * ld_k, kh);
  float proj = 0.0f;
#pragma unroll
  for (int t = 0; t < E; ++t) {
    kh[t] /= n;
    proj += kh[t] * acc[t];
  }
  proj = warp_sum(proj);
  const float inv_norm = 1.0f / n;
#pragma unroll
  for (int t = 0; t < E; ++t) cur[t] = 0.0f;
  if constexpr (kAdd) load(dqk + j * ld, cur);
#pragma unroll
  for (int t = 0; t < E; ++t) cur[t] += (acc[t] - kh[t] * proj) * inv_norm + dq[t];
  store(dqk + j * ld, cur);
}

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


// ---------------------------------------------------------------- host helpers

inline int kernel_dhm(int dh) {
  if (dh <= 32) return 32;
  if (dh <= 64) return 64;
  return 128;
}

// AttentionParams::kept (attention_kept_bytes, kernels/common/params.h): a
// tensor-core forward's staged q, k_hat, v [3, L, DH] bf16, where a
// staging area puts them (launch_mma_stage), then |k| [L].
inline float* kept_norm(void* kept, int64_t L, int dh) {
  return reinterpret_cast<float*>(static_cast<__nv_bfloat16*>(kept) + 3 * L * kernel_dhm(dh));
}

template <class Kernel>
void set_smem(Kernel k, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

inline unsigned attn_blocks(const AttnGeom& g, int rounds) {
  return unsigned(int64_t(rounds) * g.n_chunks * g.row_tiles);
}

inline void check_common(const AttentionParams& p, const char* op) {
  check_attention_shape(p, op);
  if (p.dh > 128)
    throw ShapeError(std::string(op) + ": the CUDA kernels support dh <= 128, got " +
                     std::to_string(p.dh));
  if (p.L > int64_t(0x7fffffff))
    throw ShapeError(std::string(op) + ": L must fit in int32");
}

// AttentionParams::grad_bf16 where this call cannot honour it (ok false).
inline void check_grad_bf16(const AttentionParams& p, bool ok, const char* op) {
  if (!p.grad_bf16) return;
  if (!ok || p.accumulate)
    throw ShapeError(std::string(op) +
                     ": grad_bf16 needs bf16 precision and a chunked call of several rounds "
                     "that writes its gradients (no fold_rounds, accumulate false)");
  if (p.ld_grad < p.dh)
    throw ShapeError(std::string(op) + ": ld_grad " + std::to_string(p.ld_grad) +
                     " is narrower than dh " + std::to_string(p.dh));
}

// AttentionParams::in_bf16 where this call cannot honour it (ok false).
inline void check_in_bf16(const AttentionParams& p, bool ok, const char* op) {
  if (p.in_bf16 && !ok)
    throw ShapeError(std::string(op) +
                     ": in_bf16 needs bf16 precision and a chunked call (no fold_rounds; a "
                     "backward of several rounds)");
  if (p.in_bf16 && (p.ld % 2 != 0 || p.dh % 2 != 0))
    throw ShapeError(std::string(op) + ": in_bf16 needs an even ld and dh");
}

// AttentionParams::out_bf16 where this call cannot honour it (ok false).
inline void check_out_bf16(const AttentionParams& p, bool ok, const char* op) {
  if (p.out_bf16 && !ok)
    throw ShapeError(std::string(op) +
                     ": out_bf16 needs bf16 precision and a chunked call that keeps its rounds "
                     "itself (no out_r, no fold_rounds)");
}

inline void check_chunked(const AttentionParams& p, const char* op) {
  check_common(p, op);
  check_chunked_attention_shape(p, op);
  if (p.chunks_before + p.chunks_after + 1 > kMaxWindow)
    throw ShapeError(std::string(op) + ": chunks_before + chunks_after + 1 must be <= " +
                     std::to_string(kMaxWindow));
}

inline AttnGeom make_geom(const AttentionParams& p, const int32_t* perm, bool full) {
  AttnGeom g;
  g.perm = perm;
  g.L = p.L;
  g.ld = p.ld;
  g.dh = p.dh;
  g.causal = p.causal;
  g.pairs = false;
  g.walk = 1;
  g.out_bf16 = p.out_bf16;
  g.in_bf16 = p.in_bf16;
  if (full) {
    g.chunk = 0;
    g.chunk_shift = -1;
    g.n_chunks = 1;
    g.before = g.after = 0;
    g.wrap = false;
    g.row_tiles = (p.L + kTile - 1) / kTile;
  } else {
    g.chunk = p.chunk;
    g.chunk_shift = -1;
    for (int s = 0; s < 31; ++s)
      if (p.chunk == (1 << s)) g.chunk_shift = s;
    g.n_chunks = p.L / p.chunk;
    g.before = p.chunks_before;
    g.after = p.chunks_after;
    g.wrap = p.wrap;
    g.row_tiles = (p.chunk + kTile - 1) / kTile;
  }
  return g;
}

inline unsigned warp_rows_blocks(int64_t L) { return unsigned((L + kWarps - 1) / kWarps); }

// finish_rounds_kernel over L positions, adding into dqk, dv (add) or
// writing them, by vector accesses where the rows allow (dh == 32 E, strides
// and pointers aligned to E elements). Out: float, or bf16 (written only).
template <int E, class Row, class Out = float>
void launch_finish_rounds(Out* dqk, Out* dv, const Row* dq_r, const Row* dkh_r,
                          const Row* dv_r, int64_t ld_r, const Row* kq, int64_t ld_k,
                          const float* norm, int64_t L, int64_t ld, int dh, int R, bool add,
                          cudaStream_t s) {
  const bool vec = dh == 32 * E && ld % E == 0 && ld_r % E == 0 && ld_k % E == 0 &&
                   aligned(dqk, sizeof(Out) * E) && aligned(dv, sizeof(Out) * E) &&
                   aligned(kq, sizeof(Row) * E) && aligned(dq_r, sizeof(Row) * E) &&
                   aligned(dkh_r, sizeof(Row) * E) && aligned(dv_r, sizeof(Row) * E);
  auto run = [&](auto kernel) {
    kernel<<<warp_rows_blocks(L), kBlock, 0, s>>>(dqk, dv, dq_r, dkh_r, dv_r, ld_r, kq, ld_k,
                                                 norm, L, ld, dh, R);
    CUDA_CHECK_LAUNCH("finish_rounds_kernel");
  };
  if constexpr (std::is_same_v<Out, float>) {
    if (vec)
      add ? run(finish_rounds_kernel<E, Row, true, true, Out>)
          : run(finish_rounds_kernel<E, Row, true, false, Out>);
    else
      add ? run(finish_rounds_kernel<E, Row, false, true, Out>)
          : run(finish_rounds_kernel<E, Row, false, false, Out>);
  } else {
    if (add) throw ShapeError("finish_rounds: bf16 gradients are written, not added");
    vec ? run(finish_rounds_kernel<E, Row, true, false, Out>)
        : run(finish_rounds_kernel<E, Row, false, false, Out>);
  }
}

// Scratch of one call: k_hat, norms, row statistics, the per-round gradients
// and `staged` bf16 arrays [L, kernel_dhm(dh)] (by position, shared by the
// rounds) for the tensor-core kernels (stage, one after another; null when
// staged == 0): 2 * staged * L * kernel_dhm(dh) bytes more.
struct AttnScratch {
  float *khat, *norm, *rm, *riz, *rD, *dq_r, *dkh_r, *dv_r;
  void* stage;
  __nv_bfloat16 *dq_b, *dkh_b, *dv_b;  // ScratchGrads::bf16: [R, L, kernel_dhm(dh)]
  void* extra;                         // extra_bytes more (a forward's own round outputs)
};

// What a call keeps besides norms, statistics and staged rows:
//  - fp32: the fp32 k_hat [L, dh] and (backward) the per-round gradients
//    dq_r, dkh_r, dv_r [R, L, dh] in fp32 (the fp32 kernels);
//  - bf16: the per-round gradients dq_b, dkh_b, dv_b [R, L, kernel_dhm(dh)]
//    in bf16 and no k_hat (a tensor-core backward of several rounds: its
//    staging takes k_hat from qk, the round sum divides qk by |k|);
//  - none: neither (the bf16 forward, a direct backward: mma_backward_direct).
enum class ScratchGrads { none, fp32, bf16 };

inline AttnScratch carve_scratch(Workspace& ws, int64_t L, int dh, int R, bool backward,
                                 int staged = 0, ScratchGrads grads = ScratchGrads::fp32,
                                 size_t extra_bytes = 0) {
  Carve carve;
  const size_t f = sizeof(float);
  const bool fp32 = grads == ScratchGrads::fp32, half = grads == ScratchGrads::bf16 && backward;
  const size_t per_round = fp32 && backward ? f * size_t(R) * size_t(L) * size_t(dh) : 0;
  const size_t per_round_b =
      half ? sizeof(__nv_bfloat16) * size_t(R) * size_t(L) * size_t(kernel_dhm(dh)) : 0;
  const size_t o_khat = carve.reserve(fp32 ? f * size_t(L) * size_t(dh) : 0);
  const size_t o_norm = carve.reserve(f * size_t(L));
  const size_t o_rm = carve.reserve(backward ? f * size_t(L) : 0);
  const size_t o_riz = carve.reserve(backward ? f * size_t(L) : 0);
  const size_t o_rD = carve.reserve(backward ? f * size_t(L) : 0);
  const size_t o_dq = carve.reserve(per_round + per_round_b);
  const size_t o_dkh = carve.reserve(per_round + per_round_b);
  const size_t o_dv = carve.reserve(per_round + per_round_b);
  const size_t o_stage =
      carve.reserve(2 * size_t(staged) * size_t(L) * size_t(kernel_dhm(dh)));
  const size_t o_extra = carve.reserve(extra_bytes);
  void* base = ws.get(carve.total());
  using bf16 = __nv_bfloat16;
  return AttnScratch{fp32 ? Carve::at<float>(base, o_khat) : nullptr,
                     Carve::at<float>(base, o_norm),
                     Carve::at<float>(base, o_rm),   Carve::at<float>(base, o_riz),
                     Carve::at<float>(base, o_rD),
                     per_round ? Carve::at<float>(base, o_dq) : nullptr,
                     per_round ? Carve::at<float>(base, o_dkh) : nullptr,
                     per_round ? Carve::at<float>(base, o_dv) : nullptr,
                     staged > 0 ? Carve::at<void>(base, o_stage) : nullptr,
                     per_round_b ? Carve::at<bf16>(base, o_dq) : nullptr,
                     per_round_b ? Carve::at<bf16>(base, o_dkh) : nullptr,
                     per_round_b ? Carve::at<bf16>(base, o_dv) : nullptr,
                     extra_bytes ? Carve::at<void>(base, o_extra) : nullptr};
}

inline void launch_normalise(const AttnScratch& sc, const float* qk, const AttentionParams& p,
                      cudaStream_t s) {
  normalise_keys_kernel<<<warp_rows_blocks(p.L), kBlock, 0, s>>>(sc.khat, sc.norm, qk, p.L, p.ld,
                                                                 p.dh);
  CUDA_CHECK_LAUNCH("normalise_keys_kernel");
}

}  // namespace

// Tensor-core (bf16) variants, AttentionParams::precision == bf16 (defined
// in attention_mma_forward.cu / attention_mma_backward.cu, described there).
// perm is null when full. Same outputs and contracts as the fp32 kernels:
// forward writes out_r / lse (chunked) or out / lse (full); backward adds
// into the op's dqk and dv ([L, ld]; either may be null) from the row
// statistics rm, riz, rD of row_stats_kernel: through bf16 per-round
// gradients ([R, L, DH], MmaBwdOut) and a round sum of its own, or, direct,
// from the query and key sides themselves.
//
// Several rounds: the query and key sides write each round's dq, dk_hat and
// dv rows in bf16 (half the bytes of fp32 through L2 and memory, written and
// read once each; the rounding, 2^-9 relative, is that of the operands the
// products already take), and finish_rounds_kernel sums the rounds in fp32,
// applies the normalisation's backward with k_hat_j = qk_j / |k_j| and adds
// into dqk and dv (as on the fp32 rows; no fp32 k_hat is kept).
//
// Direct (a bf16 call of one round, or full attention): every position is
// one query row of one block of the query side and one key row of one block
// of the key side, so those blocks write or add their rows into dqk and dv
// without a race (the query side runs before the key side; MmaBwdOut::add
// says which): no per-round scratch
// ([L, dh] x 3, 1.5 GiB at 1M tokens and dh 128) and no
// finish_rounds_kernel. The staging computes k_hat from qk and writes |k|
// into norm (no fp32 k_hat), and the key side applies the normalisation's
// backward to its dk_hat rows as finish_rounds_kernel does, with k_hat_j =
// qk_j / |k_j| (the same division: the same bits). Calls of
// several rounds keep the scratch: one launch of each side per round, adding
// directly, measured 1.65x slower at 64K tokens (bench/RESULTS.md).
struct MmaBwdOut {
  float *dq, *dkh, *dv;  // direct: dqk, dqk, dv (either pair may be null)
  bool direct;           // add into [L, ld] rows instead of writing [R, L, DH]
  float* norm;           // |k| [L], written by the staging
  // Not direct: the per-round gradients in bf16, [R, L, DH] rows (DH =
  // kernel_dhm(dh), the padding columns written 0), overwritten, then summed
  // over the rounds into dqk and dv (any may be null).
  __nv_bfloat16 *dq_r, *dkh_r, *dv_r;
  // The op's accumulate. Not direct: the round sum adds into dqk, dv (else
  // writes them). Direct: the query side adds its dq rows (else writes
  // them), the key side adds dk_hat (also onto the query side's rows when
  // dq is wanted) and dv (else writes them).
  bool add;
  // AttentionParams::kept of a chunked call: q, k_hat, v staged there by
  // the forward (norm then points into it too), so only dout is staged.
  void* kept = nullptr;
  // Not direct, not add: dkh and dv hold bf16 rows of this stride
  // (AttentionParams::grad_bf16: the round sum writes them rounded); 0:
  // fp32 rows of stride ld.
  int64_t ld_grad = 0;
};
inline bool mma_backward_direct(const AttentionParams& p, bool full) {
  return p.precision == AttentionPrecision::bf16 && (full || p.n_rounds == 1);
}
// The per-round scratch of a backward call (carve_scratch).
inline ScratchGrads backward_grads(const AttentionParams& p, bool full) {
  if (p.precision != AttentionPrecision::bf16) return ScratchGrads::fp32;
  return mma_backward_direct(p, full) ? ScratchGrads::none : ScratchGrads::bf16;
}
// The forward's / backward's `stage` holds kMmaFwdStaged / kMmaBwdStaged
// arrays of carve_scratch's staged layout (q, k_hat, v; and dout). A null
// khat in the forward: k_hat is staged from qk (no fp32 k_hat pass).
constexpr int kMmaFwdStaged = 3;
constexpr int kMmaBwdStaged = 4;
void mma_attention_forward(const AttentionParams& p, const int32_t* perm, bool full,
                           const float* qk, const float* khat, const float* v, float* out,
                           float* lse, void* stage, cudaStream_t s);
// A chunked call whose rounds' outputs the caller does not keep: they go in
// bf16 into out_b [R, L, DH] (the op's workspace) and are combined into out
// from there: half the bytes of the fp32 out_r, written and read once each.
void mma_chunked_forward_bf16(const AttentionParams& p, const int32_t* perm, const float* qk,
                              const float* v, float* out, __nv_bfloat16* out_b, float* lse,
                              void* stage, cudaStream_t s);
// fold_rounds (AttentionParams): q, k_hat and v staged once, then per round
// r the round's kernels into out_1 [L, dh] (fp32) and lse + r L, each
// followed by fold(r) (the caller's fold_round): the one-round calls' work
// without their stagings. With out_b non-null (out_1 null) each round goes
// into out_b [L, DH] in bf16 instead (write_rows_bf16, as the all-rounds
// call keeps its rounds).
void mma_chunked_forward_folded(const AttentionParams& p, const int32_t* perm, const float* qk,
                                const float* v, float* out_1, __nv_bfloat16* out_b, float* lse,
                                void* stage, cudaStream_t s,
                                const std::function<void(int)>& fold);
// Writes the row statistics rm, riz, rD (row_stats_kernel's, from dout, out
// and lse) as it stages its operands.
void mma_attention_backward(const AttentionParams& p, const int32_t* perm, bool full,
                            const float* qk, const float* v, const float* dout, const float* out,
                            int64_t ld_out, const float* lse, float* rm, float* riz, float* rD,
                            const MmaBwdOut& o, void* stage, cudaStream_t s);
// fold_rounds (AttentionParams) with direct outputs o: q, k_hat, v and dout
// staged once with the row statistics of all p.n_rounds rounds, then per
// round r the one-round kernels over perm + r L adding into o's dqk and dv
// (round 0 writing them unless o.add).
void mma_chunked_backward_folded(const AttentionParams& p, const int32_t* perm, const float* qk,
                                 const float* v, const float* dout, const float* out,
                                 int64_t ld_out, const float* lse, float* rm, float* riz,
                                 float* rD, const MmaBwdOut& o, void* stage, cudaStream_t s);

}  // namespace cuda
}  // namespace reformer
