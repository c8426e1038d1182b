// Tensor-core pieces of the bf16 attention kernels (attention_mma_forward.cu,
// attention_mma_backward.cu): the m16n8k16 bf16 mma with fp32 accumulation,
// the staging pre-pass (operands as bf16 rows by position, once per call),
// cp.async tile copies gathered by position and ldmatrix fragment loads from
// shared memory.
// Internal to those files (unnamed namespace, as attention_common.cuh).
//
// Fragment layout of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for
// lane = 4 * gr + t4 (gr = lane / 4 in 0..7, t4 = lane % 4):
//  - A (16 x 16, row major), four 32-bit registers of two bf16 each (the
//    lower column in the low half): a0 = A[gr][2t4, 2t4+1],
//    a1 = A[gr+8][2t4, 2t4+1], a2 = A[gr][2t4+8, +9], a3 = A[gr+8][2t4+8, +9];
//  - B (16 x 8, k x n): b0 = B[2t4, 2t4+1][gr], b1 = B[2t4+8, +9][gr];
//  - C (16 x 8, fp32): c0, c1 = C[gr][2t4, 2t4+1], c2, c3 = C[gr+8][2t4, 2t4+1].
// Every product here is C = A B with A stored row major [m][k] and B stored
// either as B^T row major [n][k] (ldmatrix) or as B row major [k][n]
// (ldmatrix.trans) in shared memory. An accumulator tile pair
// (C tiles 2kk and 2kk+1 of one 16-row strip) is the A fragment of k-step kk
// of the next product (pack_a).
// Shared rows are padded by 8 bf16 (16 bytes): with row strides of
// 20, 36 or 68 words the eight 16-byte rows of an ldmatrix matrix fall in
// distinct banks.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/attention_common.cuh"

namespace reformer {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kMmaWarps = 4;                 // warps per block
constexpr int kMmaBlock = 32 * kMmaWarps;    // threads per block
constexpr int kMmaRows = 16 * kMmaWarps;     // rows per block: 16 per warp

// Row stride (bf16 elements) of a shared tile whose rows hold n values.
constexpr int mma_stride(int n) { return n + 8; }

// The A fragment of k-step kk from fp32 accumulator tiles c[2kk], c[2kk+1]
// (C layout, columns 16kk .. 16kk+15 of a 16-row strip), rounded to bf16.
__device__ __forceinline__ void pack_a(uint32_t* a, const float* c0, const float* c1) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// Zeroes M x N accumulator tiles of 4 per thread (the C fragments of m16n8
// products) before their first mma.
template <int M, int N>
__device__ __forceinline__ void zero_tiles(float (&x)[M][N][4]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) x[m][n][e] = 0.0f;
}

// ---- staged tiles (bf16 rows by position, see mma_stage_kernel): cp.async
// copies (device_utils.cuh) of gathered rows into shared memory and ldmatrix
// fragment loads.

// Issues the copies of ROWS rows of DH bf16 into dst (row stride st): row i
// from src + row_of(i) * DH (row_of returns an int position), zero where
// row_of(i) < 0. Thread tid of THREADS copies
// piece tid % (DH / 8) of rows tid / (DH / 8) + k * (rows per sweep): one
// row lookup and one wide multiply per 16 bytes.
template <int ROWS, int DH, int THREADS = kMmaBlock, class RowOf>
__device__ __forceinline__ void copy_rows(bf16* dst, int st, const bf16* src, RowOf row_of,
                                          int tid) {
  constexpr int kPieces = DH / 8;               // 16-byte pieces per row
  constexpr int kSweep = THREADS / kPieces;     // rows per sweep of the block
  static_assert(THREADS % kPieces == 0 && ROWS % kSweep == 0, "whole sweeps");
  const int i0 = tid / kPieces, q = 8 * (tid % kPieces);
  bf16* d = dst + i0 * st + q;
  const bf16* s = src + q;
#pragma unroll
  for (int k = 0; k < ROWS / kSweep; ++k) {
    const int row = row_of(i0 + k * kSweep);
    cp_async16(d + k * kSweep * st, row < 0 ? s : s + uint64_t(uint32_t(row)) * DH, row >= 0);
  }
}

// copy_rows for one row set copied from several operands, or at several
// times: each row is looked up and its offset computed once, when built
// (copy_rows' "memory" clobber reloads the row from shared memory for every
// copy), so a copy costs an address add and the cp.async itself.
template <int ROWS, int DH, int THREADS = kMmaBlock>
struct RowCopies {
  static constexpr int kPieces = DH / 8;
  static constexpr int kSweep = THREADS / kPieces;
  static constexpr int K = ROWS / kSweep;  // rows per thread
  static_assert(THREADS % kPieces == 0 && ROWS % kSweep == 0, "whole sweeps");
  uint64_t off[K];
  bool ok[K];
  int i0, q;

  template <class RowOf>
  __device__ __forceinline__ RowCopies(RowOf row_of, int tid)
      : i0(tid / kPieces), q(8 * (tid % kPieces)) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int row = row_of(i0 + k * kSweep);
      ok[k] = row >= 0;
      off[k] = (ok[k] ? uint64_t(uint32_t(row)) * DH : 0) + q;
    }
  }
  // Issues the copies of these rows of src into dst (row stride st).
  __device__ __forceinline__ void copy(bf16* dst, int st, const bf16* src) const {
#pragma unroll
    for (int k = 0; k < K; ++k) cp_async16(dst + (i0 + k * kSweep) * st + q, src + off[k], ok[k]);
  }
};

// The walks' masks (mma_walks below): a key after the query (causal) or a
// padded key (kp < 0; as an unsigned value it comes after every query)
// scores kCausalMask, the query's own key kSelfMask (tested only when kSelf:
// a window's tile of the previous chunk never holds it); masked is set for
// both. The general kernels score padded keys -inf (masked_score,
// attention_common.cuh): the weights are the same, 0, wherever the window
// holds the query's own key (so its row maximum is at least kSelfMask), as
// every look-one-back window does; a padded query row (qp < 0) has zero
// rows of q and dout, so its weights and dS are 0 either way.
template <bool kSelf>
__device__ __forceinline__ float walk_score(float s, int qp, int kp, bool causal, bool* masked) {
  const bool after = causal ? uint32_t(kp) > uint32_t(qp) : kp < 0;
  const bool self = kSelf && kp == qp;
  *masked = after || self;
  return after ? kCausalMask : self ? kSelfMask : s;
}

// exp(x) for the softmax weights: one multiply and the hardware ex2
// (relative error about 2^-22; 0 for x = -inf and below about -87).
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// ldsm_x4 (device_utils.cuh) of the transposed matrices: r[m] holds matrix
// m's column l / 4, rows 2 (l % 4) and + 1.
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const bf16* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// Warp tiles of MT 16-row strips: each B fragment is loaded once for the MT
// strips (per k step MT + NT / 2 ldmatrix for MT NT mma, against 1 + NT / 2
// for NT of a single strip), with the k steps and so every element's sum in
// the order of a single strip.
//
// c[mt][nt] (MT strips of 16 x 8*NT, NT even) += A B with A = the 16 MT x DH
// rows row0.. of sa and B^T = the 8*NT x DH rows of sb (both row major, DH
// columns = k). ldmatrix matrices: A rows 0-7 / 8-15 x k 0-7 / 8-15 in
// fragment order a0..a3; B^T n 0-7 k 0-7, n 0-7 k 8-15, n 8-15 k 0-7, n 8-15
// k 8-15 = the b0, b1 of tiles nt and nt + 1.
template <int DH, int MT, int NT>
__device__ __forceinline__ void ldsm_tile_nt(float (*c)[NT][4], const bf16* sa, int sta,
                                             int row0, const bf16* sb, int stb, int lane) {
  const bf16* pa = sa + (row0 + (lane & 15)) * sta + (lane >> 4) * 8;
  const bf16* pb = sb + ((lane >> 4) * 8 + (lane & 7)) * stb + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < DH; kk += 16) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], pa + mt * 16 * sta + kk);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      ldsm_x4(b, pb + nt * 8 * stb + kk);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_bf16(c[mt][nt], a[mt], b[0], b[1]);
        mma_bf16(c[mt][nt + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// The same for one strip: c[nt] (16 x 8*NT) += A B.
template <int DH, int NT>
__device__ __forceinline__ void ldsm_strip_nt(float (*c)[4], const bf16* sa, int sta, int row0,
                                              const bf16* sb, int stb, int lane) {
  ldsm_tile_nt<DH, 1, NT>(reinterpret_cast<float (*)[NT][4]>(c), sa, sta, row0, sb, stb, lane);
}

// acc[mt][ot] (MT strips of 16 x 8 OT) += a[mt] (one 16 x 16 A fragment per
// strip) times the 16 x 8 OT B rows at pb, row major [k][n] (pb: this lane's
// ldmatrix.trans address of the matrices k 0-7 / 8-15 x n 0-7, then n 8-15,
// which give b0, b1 of tiles ot and ot + 1).
template <int MT, int OT>
__device__ __forceinline__ void mma_b_tile(float (*acc)[OT][4], const uint32_t (*a)[4],
                                           const bf16* pb) {
  static_assert(OT % 2 == 0, "tile pairs");
#pragma unroll
  for (int ot = 0; ot < OT; ot += 2) {
    uint32_t b[4];
    ldsm_x4_t(b, pb + ot * 8);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_bf16(acc[mt][ot], a[mt], b[0], b[1]);
      mma_bf16(acc[mt][ot + 1], a[mt], b[2], b[3]);
    }
  }
}

// acc[ot] (16 x DH strip) += P B where P (16 x 16*KS) comes as fp32
// accumulator tiles p[0 .. 2*KS) and B (16*KS x DH) is row major in sb
// ([key][d], not transposed): ldmatrix.trans of the matrices keys 0-7 /
// 8-15 x d 0-7, then d 8-15 gives b0, b1 of tiles ot and ot + 1.
template <int DH, int KS>
__device__ __forceinline__ void ldsm_strip_pv(float (*acc)[4], float (*p)[4], const bf16* sb,
                                              int stb, int lane) {
  const bf16* pv = sb + (((lane >> 3) & 1) * 8 + (lane & 7)) * stb + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[1][4];
    pack_a(a[0], p[2 * kk], p[2 * kk + 1]);
    mma_b_tile<1, DH / 8>(reinterpret_cast<float (*)[DH / 8][4]>(acc), a, pv + kk * 16 * stb);
  }
}

// acc[mt][ot] (MT strips of 16 x 8 OT) += A B with both operands in shared
// memory: A (16 MT x 16 KS) the rows row0.. of sa (row major [m][k]), B
// (16 KS x 8 OT) row major [k][n] in sb (ldmatrix.trans, as ldsm_strip_pv).
template <int KS, int MT, int OT>
__device__ __forceinline__ void ldsm_tile_nn(float (*acc)[OT][4], const bf16* sa, int sta,
                                             int row0, const bf16* sb, int stb, int lane) {
  const bf16* pa = sa + (row0 + (lane & 15)) * sta + (lane >> 4) * 8;
  const bf16* pb = sb + (((lane >> 3) & 1) * 8 + (lane & 7)) * stb + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], pa + mt * 16 * sta + kk * 16);
    mma_b_tile<MT, OT>(acc, a, pb + kk * 16 * stb);
  }
}

// The same with A transposed in shared memory: A (16 MT x 16 KS) = columns
// col0 .. col0 + 16 MT - 1 of sa read down its rows (sa row major [k][m];
// ldmatrix.trans of the matrices k 0-7 / 8-15 x m 0-7 / 8-15 in fragment
// order).
template <int KS, int MT, int OT>
__device__ __forceinline__ void ldsm_tile_tn(float (*acc)[OT][4], const bf16* sa, int sta,
                                             int col0, const bf16* sb, int stb, int lane) {
  const bf16* pa = sa + ((lane >> 4) * 8 + (lane & 7)) * sta + col0 + ((lane >> 3) & 1) * 8;
  const bf16* pb = sb + (((lane >> 3) & 1) * 8 + (lane & 7)) * stb + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldsm_x4_t(a[mt], pa + mt * 16 + kk * 16 * sta);
    mma_b_tile<MT, OT>(acc, a, pb + kk * 16 * stb);
  }
}

// ---- staging pre-pass: operands rounded once per call, by position.
// The kernels gather their tiles through the rounds' permutations, so every
// round of a call reads the same staged rows (R times fewer bytes staged
// than a copy per round in slot order).

constexpr int kMmaMaxStaged = 4;  // staged operands per call
constexpr int kStageWarps = 8;    // rows (one per warp) per block of mma_stage_kernel

// dst[a][pos * DH + d] = bf16(src[a][pos * lds[a] + d]) for a < n; zero for
// d >= dh. Every dst[a] is [L, DH] bf16 (carve_scratch's staged layout).
// The operands are read as bf16 values: every one (and `out`, below) is
// rounded before any arithmetic, so operands that arrive already rounded
// (a sequence-parallel exchange in bf16, framework/sequence_parallel.h)
// give the same bits as fp32 ones. With khat_from_q, operand 1 (src[1]
// unused) is k_hat computed from the rounded src[0] in
// normalise_keys_kernel's order (same sum order, same division), so the
// forward needs no fp32 k_hat; |k| goes into norm when it is non-null (a
// direct backward's key side divides by it, and rounds its k the same way).
// A backward's staging also writes the row statistics of row_stats_kernel
// (attention_backward.cu) when rm is non-null: D_i = dout_i . out_i from
// operand 3 (dout) as it is staged and `out` (row stride ld_out), and m_i,
// 1 / z_i from the R rounds' lse: one pass over dout instead of two.
struct MmaStage {
  const float* src[kMmaMaxStaged];
  int64_t lds[kMmaMaxStaged];
  bf16* dst[kMmaMaxStaged];
  int n;
  bool khat_from_q;
  float* norm;
  float* rm = nullptr;
  float* riz = nullptr;
  float* rD = nullptr;
  const float* out = nullptr;  // bf16 values where out_bf16 (AttentionParams::out_bf16)
  int64_t ld_out = 0;
  const float* lse = nullptr;
  int R = 0;
  bool out_bf16 = false;
  // src[0] (qk) and src[2] (v) hold bf16 values (AttentionParams::in_bf16),
  // lds[0] and lds[2] counting them: staged as they are (stage_value).
  bool src_bf16 = false;
  // Operands a < first are staged already (a forward's, kept:
  // AttentionParams::kept): their dst come from the kept buffer and they
  // are not read or written (khat_from_q is then false).
  int first = 0;
};

// A staged operand's values as bf16 values in fp32: an fp32 row's rounded
// (bf16_value), a bf16 row's (AttentionParams::out_bf16's `out`) as they
// are: the same values for the same originals.
__device__ __forceinline__ float stage_value(float x) { return bf16_value(x); }
__device__ __forceinline__ float stage_value(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float2 stage_pair(const float* p) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  return make_float2(bf16_value(v.x), bf16_value(v.y));
}
__device__ __forceinline__ float2 stage_pair(const bf16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

// Lane `lane`'s column pairs 2 lane + 64 k of a row (fp32 or bf16), as bf16
// values (0 past dh), for k < (DH + 63) / 64: one 8- or 4-byte load per
// pair with kPairs (dh == DH, rows aligned to a pair: mma_stage_pairs).
template <int DH, bool kPairs, class Row>
__device__ __forceinline__ void load_stage_pairs(const Row* row, float (*x)[2], int lane,
                                                 int dh) {
  constexpr int K = (DH + 63) / 64;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int d = 2 * lane + 64 * k;
    if (d >= DH) break;
    if (kPairs) {
      const float2 v = stage_pair(row + d);
      x[k][0] = v.x;
      x[k][1] = v.y;
    } else {
      x[k][0] = d < dh ? stage_value(row[d]) : 0.0f;
      x[k][1] = d + 1 < dh ? stage_value(row[d + 1]) : 0.0f;
    }
  }
}

// The row of `out` at position pos (fp32 or bf16 values, st.out_bf16).
template <int DH, bool kPairs>
__device__ __forceinline__ void load_out_pairs(const MmaStage& st, int64_t pos, float (*x)[2],
                                               int lane, int dh) {
  if (st.out_bf16)
    load_stage_pairs<DH, kPairs>(reinterpret_cast<const bf16*>(st.out) + pos * st.ld_out, x,
                                 lane, dh);
  else
    load_stage_pairs<DH, kPairs>(st.out + pos * st.ld_out, x, lane, dh);
}

// One warp per position. Every load of the row is issued before the first
// store (the operands, `out` for the statistics, q once more by columns for
// the norm), so a warp has them all in flight at once; lane l takes the
// column pairs 2 l + 64 k of each operand (kPairs: one 8-byte load per
// pair, where dh == DH and every row is 8-byte aligned: mma_stage_pairs).
// NA: st.n, the operands (kMmaFwdStaged: a forward's; kMmaBwdStaged: a
// backward's, dout last, with the row statistics where st.rm), so that
// neither carries the other's code.
template <int DH, bool kPairs, int NA>
__global__ void __launch_bounds__(32 * kStageWarps) mma_stage_kernel(AttnGeom g, MmaStage st) {
  constexpr int K = (DH + 63) / 64;  // column pairs per lane and operand
  constexpr int E = DH / 32;         // columns per lane of the norm's sum
  const int64_t pos = int64_t(blockIdx.x) * kStageWarps + (threadIdx.x >> 5);
  if (pos >= g.L) return;
  const int lane = threadIdx.x & 31;
  constexpr bool kStats = NA == kMmaBwdStaged;
  float x[NA][K][2] = {};
#pragma unroll
  for (int a = 0; a < NA; ++a) {
    if (a < st.first || (a == 1 && st.khat_from_q)) continue;  // kept; k_hat from q below
    if (st.src_bf16 && (a == 0 || a == 2))  // qk, v
      load_stage_pairs<DH, kPairs>(reinterpret_cast<const bf16*>(st.src[a]) + pos * st.lds[a],
                                   x[a], lane, g.dh);
    else
      load_stage_pairs<DH, kPairs>(st.src[a] + pos * st.lds[a], x[a], lane, g.dh);
  }
  float o[K][2] = {};
  if (kStats && st.rm) load_out_pairs<DH, kPairs>(st, pos, o, lane, g.dh);
  float qc[E];  // q by columns lane + 32 t, normalise_keys_kernel's order
  if (st.khat_from_q) {
    auto columns = [&](const auto* q) {
#pragma unroll
      for (int t = 0; t < E; ++t)
        qc[t] = lane + 32 * t < g.dh ? stage_value(q[lane + 32 * t]) : 0.0f;
    };
    if (st.src_bf16)
      columns(reinterpret_cast<const bf16*>(st.src[0]) + pos * st.lds[0]);
    else
      columns(st.src[0] + pos * st.lds[0]);
  }
  RoundWeights w{};
  if (kStats && st.rm) w = warp_round_weights(st.lse, g.L, pos, st.R, lane);

  if (st.khat_from_q) {
    float s = 0.0f;
#pragma unroll
    for (int t = 0; t < E; ++t)
      if (lane + 32 * t < g.dh) s += qc[t] * qc[t];
    const float norm = sqrtf(warp_sum(s) + kNormEps);
    if (st.norm && lane == 0) st.norm[pos] = norm;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      x[1][k][0] = x[0][k][0] / norm;
      x[1][k][1] = x[0][k][1] / norm;
    }
  }
#pragma unroll
  for (int a = 0; a < NA; ++a) {
    if (a < st.first) continue;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int d = 2 * lane + 64 * k;
      if (d >= DH) break;
      *reinterpret_cast<uint32_t*>(st.dst[a] + pos * DH + d) = pack_bf16(x[a][k][0], x[a][k][1]);
    }
  }
  if (kStats && st.rm) {
    float dsum = 0.0f;  // dout . out, over dout's pairs in order
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int d = 2 * lane + 64 * k;
      if (d >= DH) break;
      if (d < g.dh) dsum += x[NA - 1][k][0] * o[k][0];
      if (d + 1 < g.dh) dsum += x[NA - 1][k][1] * o[k][1];
    }
    dsum = warp_sum(dsum);
    if (lane == 0) {
      st.rm[pos] = w.m;
      st.riz[pos] = w.inv_z;
      st.rD[pos] = dsum;
    }
  }
}

// The backward's staging where the forward's q, k_hat and v are kept
// (st.first == 3, AttentionParams::kept): dout staged and the row
// statistics, as mma_stage_kernel computes them (the same values), for
// kStageDoutRows consecutive positions per warp whose dout and out rows are
// all loaded before the first is used. One position per warp, as there,
// left each warp with two rows in flight: 53.9 us a call at 64K against
// the 27 us its bytes take (bench/RESULTS.md).
constexpr int kStageDoutRows = 4;
template <int DH, bool kPairs>
__global__ void __launch_bounds__(32 * kStageWarps)
    mma_stage_dout_kernel(AttnGeom g, MmaStage st) {
  constexpr int K = (DH + 63) / 64;  // column pairs per lane
  constexpr int P = kStageDoutRows;
  const int64_t pos0 = (int64_t(blockIdx.x) * kStageWarps + (threadIdx.x >> 5)) * P;
  if (pos0 >= g.L) return;
  const int lane = threadIdx.x & 31;
  auto load_pairs = [&](const float* row, float (*x)[2]) {
    load_stage_pairs<DH, kPairs>(row, x, lane, g.dh);
  };
  float x[P][K][2] = {}, o[P][K][2] = {};
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t pos = pos0 + p;
    if (pos >= g.L) break;
    load_pairs(st.src[3] + pos * st.lds[3], x[p]);
    load_out_pairs<DH, kPairs>(st, pos, o[p], lane, g.dh);
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t pos = pos0 + p;
    if (pos >= g.L) break;
    const RoundWeights w = warp_round_weights(st.lse, g.L, pos, st.R, lane);
    float dsum = 0.0f;  // dout . out, over dout's pairs in order
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int d = 2 * lane + 64 * k;
      if (d >= DH) break;
      *reinterpret_cast<uint32_t*>(st.dst[3] + pos * DH + d) = pack_bf16(x[p][k][0], x[p][k][1]);
      if (d < g.dh) dsum += x[p][k][0] * o[p][k][0];
      if (d + 1 < g.dh) dsum += x[p][k][1] * o[p][k][1];
    }
    dsum = warp_sum(dsum);
    if (lane == 0) {
      st.rm[pos] = w.m;
      st.riz[pos] = w.inv_z;
      st.rD[pos] = dsum;
    }
  }
}

// Whether every staged row (and `out`) can be read in 8-byte pairs.
inline bool mma_stage_pairs(const AttnGeom& g, int DH, const MmaStage& st) {
  bool ok = g.dh == DH;
  for (int a = 0; a < st.n; ++a) {
    if (a == 1 && st.khat_from_q) continue;
    ok = ok && st.lds[a] % 2 == 0 && aligned(st.src[a], st.src_bf16 && (a == 0 || a == 2) ? 4 : 8);
  }
  if (st.rm) ok = ok && st.ld_out % 2 == 0 && aligned(st.out, st.out_bf16 ? 4 : 8);
  return ok;
}

// Fills st.dst[a] (consecutive [L, DH] arrays from `stage`) from st.src /
// st.lds; operands a < st->first are in `kept` at the same places (kept_norm).
template <int DH>
void launch_mma_stage(const AttnGeom& g, void* stage, MmaStage* st, cudaStream_t s,
                      void* kept = nullptr) {
  for (int a = 0; a < st->n; ++a)
    st->dst[a] = static_cast<bf16*>(a < st->first ? kept : stage) + a * g.L * DH;
  if (st->first == 3 && st->n == 4 && st->rm) {  // dout only (kept operands)
    const int64_t rows = int64_t(kStageWarps) * kStageDoutRows;
    const unsigned blocks = unsigned((g.L + rows - 1) / rows);
    if (mma_stage_pairs(g, DH, *st))
      mma_stage_dout_kernel<DH, true><<<blocks, 32 * kStageWarps, 0, s>>>(g, *st);
    else
      mma_stage_dout_kernel<DH, false><<<blocks, 32 * kStageWarps, 0, s>>>(g, *st);
    CUDA_CHECK_LAUNCH("mma_stage_dout_kernel");
    return;
  }
  const unsigned blocks = unsigned((g.L + kStageWarps - 1) / kStageWarps);
  const bool pairs = mma_stage_pairs(g, DH, *st);
  if (st->n == kMmaFwdStaged)
    (pairs ? mma_stage_kernel<DH, true, kMmaFwdStaged> : mma_stage_kernel<DH, false, kMmaFwdStaged>)
        <<<blocks, 32 * kStageWarps, 0, s>>>(g, *st);
  else
    (pairs ? mma_stage_kernel<DH, true, kMmaBwdStaged> : mma_stage_kernel<DH, false, kMmaBwdStaged>)
        <<<blocks, 32 * kStageWarps, 0, s>>>(g, *st);
  CUDA_CHECK_LAUNCH("mma_stage_kernel");
}

// Every staged-tile kernel wants the most shared memory per SM.
template <class Kernel>
void set_mma_smem(Kernel k, size_t bytes) {
  set_smem(k, bytes);
  CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout,
                                  int(cudaSharedmemCarveoutMaxShared)));
}

// This thread's column pairs of one fp32 row: columns d + 8 ot and
// d + 8 ot + 1 for ot < OT (d even), as the C fragments of an 8 OT-wide
// strip hold them. Columns past dh read as 0 and are not written; one
// 8-byte access per pair when `pairs` (dh even, rows 8-byte aligned;
// mma_pairs), else one per column.
template <int OT>
__device__ __forceinline__ void load_row(float (*v)[2], const float* row, int d, int dh,
                                         bool pairs) {
#pragma unroll
  for (int ot = 0; ot < OT; ++ot) {
    const int c = d + 8 * ot;
    if (pairs) {
      const float2 x = c < dh ? *reinterpret_cast<const float2*>(row + c) : make_float2(0.f, 0.f);
      v[ot][0] = x.x;
      v[ot][1] = x.y;
    } else {
      v[ot][0] = c < dh ? row[c] : 0.0f;
      v[ot][1] = c + 1 < dh ? row[c + 1] : 0.0f;
    }
  }
}

// The same columns of a staged bf16 row (DH wide, zero past dh: the
// staging's padding), one 4-byte access per pair.
template <int OT>
__device__ __forceinline__ void load_row(float (*v)[2], const bf16* row, int d) {
#pragma unroll
  for (int ot = 0; ot < OT; ++ot) {
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + d + 8 * ot));
    v[ot][0] = x.x;
    v[ot][1] = x.y;
  }
}

// Writes (add: adds) v to those columns. Adding reads every old pair before
// the first write, so the OT read-modify-writes overlap instead of waiting
// on each other (a store may alias a later load, for all the compiler
// knows: the direct backward's key side ran 4.7x slower than its query
// side with one read-modify-write after another).
template <int OT>
__device__ __forceinline__ void store_row(float* row, int d, int dh, bool pairs,
                                          const float (*v)[2], bool add) {
  float old[OT][2];
  if (add) load_row<OT>(old, row, d, dh, pairs);
#pragma unroll
  for (int ot = 0; ot < OT; ++ot) {
    const int c = d + 8 * ot;
    const float x = add ? v[ot][0] + old[ot][0] : v[ot][0];
    const float y = add ? v[ot][1] + old[ot][1] : v[ot][1];
    if (pairs) {
      if (c < dh) *reinterpret_cast<float2*>(row + c) = make_float2(x, y);
    } else {
      if (c < dh) row[c] = x;
      if (c + 1 < dh) row[c + 1] = y;
    }
  }
}

// A 16 x 8 OT accumulator strip's two rows of this thread (h = 0: row
// lane / 4, h = 1: that + 8) as bf16 into rows[h] (8 OT values, 8-byte
// aligned; null: not stored). The quad's lanes trade their column pairs so
// that lane t4 stores columns 4 t4 .. 4 t4 + 3 of each 16: a quad's four
// 8-byte stores fill one 32-byte sector (the fragment's own pairs would fill
// half sectors). Every lane of the warp must call it.
template <int OT>
__device__ __forceinline__ void store_rows_bf16(bf16* const* rows, float (*acc)[4], int lane) {
  static_assert(OT % 2 == 0, "tile pairs");
  const int t4 = lane & 3;
  const int src0 = (lane & ~3) | ((2 * t4) & 3), src1 = (lane & ~3) | ((2 * t4 + 1) & 3);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int ot = 0; ot < OT; ot += 2) {
      const uint32_t x = pack_bf16(acc[ot][2 * h], acc[ot][2 * h + 1]);
      const uint32_t y = pack_bf16(acc[ot + 1][2 * h], acc[ot + 1][2 * h + 1]);
      const uint32_t ax = __shfl_sync(0xffffffffu, x, src0);
      const uint32_t ay = __shfl_sync(0xffffffffu, y, src0);
      const uint32_t bx = __shfl_sync(0xffffffffu, x, src1);
      const uint32_t by = __shfl_sync(0xffffffffu, y, src1);
      if (rows[h])
        *reinterpret_cast<uint2*>(rows[h] + ot * 8 + 4 * t4) =
            t4 < 2 ? make_uint2(ax, bx) : make_uint2(ay, by);
    }
  }
}

// Whether outputs with row stride `ld` (elements) from these pointers can be
// written in column pairs (store_row).
inline bool mma_pairs(int dh, int64_t ld, std::initializer_list<const float*> outs) {
  bool ok = dh % 2 == 0 && ld % 2 == 0;
  for (const float* p : outs) ok = ok && aligned(p, 8);
  return ok;
}

// Max and sum over the four lanes of a quad (the lanes sharing a C row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Prologue of every mma kernel: this block's round r, chunk c and row tile t,
// the round's permutation (returned; null when FULL), the tile's positions in
// spos[kMmaRows] and (chunked) the chunk list of sign `sign` (chunk_list) in
// swin / *s_n. Ends with __syncthreads().
template <bool FULL>
__device__ __forceinline__ const int32_t* mma_block_start(const AttnGeom& g, int sign, int* spos,
                                                          int* swin, int* s_n, int64_t* r,
                                                          int64_t* c, int64_t* t) {
  *r = *c = *t = 0;
  if (FULL)
    *t = blockIdx.x;
  else
    decode_block(g, r, c, t);
  const int32_t* pr = FULL ? nullptr : g.perm + *r * g.L;
  const int tid = threadIdx.x;
  if (tid < kMmaRows) spos[tid] = tile_position<FULL, kMmaRows>(g, pr, *c, *t, tid);
  if (!FULL && tid == 0) *s_n = chunk_list(swin, *c, sign, g);
  __syncthreads();
  return pr;
}

// The walking kernels (attention_mma_forward.cu, attention_mma_backward.cu)
// take a chunked call whose chunks are one row tile and whose window is the
// previous chunk and the chunk itself (the Reformer's look-one-back), at
// least two chunks; each block walks g.walk consecutive chunks of a round
// (mma_walk). The results do not depend on g.walk (each chunk's products
// and sums are the same, in the same order).
inline bool mma_walks(const AttnGeom& g) {
  return g.chunk == kMmaRows && g.before == 1 && g.after == 0 && g.n_chunks >= 2;
}

// Chunks per walking block: 8 where runs of 8 still give every SM two
// blocks (fewer chunks gathered twice: at 64K the backward takes 24.4
// instead of 25.1 ms per step, bench/RESULTS.md), else 4.
inline int mma_sm_count() {
  static const int sms = [] {
    int device = 0, n = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return sms;
}

constexpr int kWalkLong = 8, kWalkShort = 4;
inline int mma_walk(int64_t n_chunks, int rounds) {
  const int64_t runs = rounds * ((n_chunks + kWalkLong - 1) / kWalkLong);
  return runs >= 2 * int64_t(mma_sm_count()) ? kWalkLong : kWalkShort;
}

// Chunks per block of the walking backward (mma_bwd_walk_kernel, one block
// per SM): the run length of 4 to 32 with the fewest chunk steps on the
// busiest SM, waves x (walk + 1/2) (each run takes half a step more than its
// chunks: the post step); the shorter on a tie. At 64K, 4 rounds: 32 (128
// blocks); runs of 8, 16 and 32 measured within 1.5% (bench/RESULTS.md).
inline int mma_bwd_walk(int64_t n_chunks, int rounds) {
  const int64_t sms = mma_sm_count();
  int best = 4;
  int64_t best_cost = -1;
  for (int w = 4; w <= 32; w *= 2) {
    const int64_t runs = rounds * ((n_chunks + w - 1) / w);
    const int64_t cost = (runs + sms - 1) / sms * (2 * w + 1);
    if (best_cost < 0 || cost < best_cost) best = w, best_cost = cost;
  }
  return best;
}

// The geometry of a call with g.row_tiles counting kMmaRows-row tiles (so
// decode_block and attn_blocks agree with the mma kernels) and g.walk.
inline AttnGeom mma_geom(const AttentionParams& p, const int32_t* perm, bool full) {
  AttnGeom g = make_geom(p, perm, full);
  g.row_tiles = ((full ? p.L : int64_t(p.chunk)) + kMmaRows - 1) / kMmaRows;
  g.walk = full ? 1 : mma_walk(g.n_chunks, p.n_rounds);
  return g;
}

}  // namespace
}  // namespace cuda
}  // namespace reformer
