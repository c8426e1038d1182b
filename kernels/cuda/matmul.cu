// Dense linear layer out = inp @ w + bias (CUDA twin of kernels/cpu/matmul.cpp).
//
// Products go through cuBLASLt on the tensor cores with bf16 operands and
// fp32 accumulation and results. The ops keep fp32 activations and weights
// in memory and round them to bf16 into the op workspace first, the weight
// whole and the activations (and dout) a block of rows at a time
// (kernels/common/gemm_staging.h): the same rounding bf16 tensor-core math
// applies to fp32 operands (CUBLAS_COMPUTE_32F_FAST_16BF), at about twice
// its speed, so results carry bf16 input rounding (~3 significant digits
// relative to the output scale). Row-major [N, C] @ [C, OC] is computed as
// the column-major product out^T = w^T inp^T by swapping the operands. The
// bias is added by a separate broadcast kernel; dbias is a deterministic
// two-pass column sum. The algorithm is chosen once per (shape, strides,
// alignment, operand type) and kept for the process: for products of 4
// GFLOP and more, the fastest of the heuristic's first 8 candidates, timed
// on the first call's operands (on the H200 the heuristic's first ran up to
// 43% slower than the fastest of the model's product shapes in isolation,
// and the step at 64K gained 1.8%: bench/RESULTS.md); otherwise the
// heuristic's first. Where it offers no kernel for bf16 operands the
// product runs on the fp32 operands instead. A product repeats its bits for
// the same algorithm on the same GPU model and toolkit (cuBLAS's
// guarantee); timed choices can differ between processes, so
// `REFORMER_GEMM_TUNING=off` (the heuristic's first everywhere) is the
// setting for runs compared bit for bit.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/common/gemm_staging.h"
#include "kernels/errors.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

// out[r, c] += alpha * bias[c] for a row-major [rows, cols] matrix: a
// block per row (grid-stride over rows), its threads along the columns, so
// no element pays a 64-bit division for its column.
__global__ void add_bias_kernel(float* out, const float* bias, int64_t rows, int64_t cols,
                                float alpha) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* o = out + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] += alpha * bias[c];
  }
}

// The same, four columns per thread (cols % 4 == 0, out 16-byte aligned).
__global__ void add_bias_vec4_kernel(float4* out, const float* bias, int64_t rows, int64_t cols4,
                                     float alpha) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float4* o = out + r * cols4;
    for (int64_t c = threadIdx.x; c < cols4; c += blockDim.x) {
      float4 v = o[c];
      v.x += alpha * bias[4 * c];
      v.y += alpha * bias[4 * c + 1];
      v.z += alpha * bias[4 * c + 2];
      v.w += alpha * bias[4 * c + 3];
      o[c] = v;
    }
  }
}

// dst[r * ld_dst + c] = bf16(src[r * ld_src + c]), four columns per thread
// (cols, both strides and both addresses multiples of 4 elements / 16 and 8 bytes).
__global__ void round_bf16_2d_vec4_kernel(__nv_bfloat16* dst, int64_t ld_dst, const float* src,
                                          int64_t ld_src, int64_t rows, int64_t cols4) {
  const int64_t n = rows * cols4;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols4, c = 4 * (i - r * cols4);
    const float4 v = *reinterpret_cast<const float4*>(src + r * ld_src + c);
    __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst + r * ld_dst + c);
    d[0] = __floats2bfloat162_rn(v.x, v.y);
    d[1] = __floats2bfloat162_rn(v.z, v.w);
  }
}

// dst[r * ld_dst + c] = bf16(src[r * ld_src + c]) (round to nearest even),
// one element per thread.
__global__ void round_bf16_2d_kernel(__nv_bfloat16* dst, int64_t ld_dst, const float* src,
                                     int64_t ld_src, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[r * ld_dst + c] = __float2bfloat16_rn(src[r * ld_src + c]);
  }
}

// Timed algorithm choice (CudaOps::tuned_choice): products of at least
// kTuneFlops take the fastest of cuBLASLt's first kTuneCandidates, each run
// kTuneReps times after one untimed run; REFORMER_GEMM_TUNING=off keeps the
// heuristic's first everywhere.
constexpr double kTuneFlops = 4.0e9;
constexpr int kTuneCandidates = 8;
constexpr int kTuneReps = 3;
// The largest output timed apart from its own (a product accumulating into
// it), and the device memory that must stay free besides. Timing the
// residual stream's row blocks too (up to 256 MiB) gained 0.25% at 1M
// (bench/RESULTS.md): not worth the memory outside the plan.
constexpr size_t kTuneScratchBytes = size_t(64) << 20;
constexpr size_t kTuneFreeMargin = size_t(1) << 30;
bool gemm_tuning() {
  static const bool on =
      switch_from_env("REFORMER_GEMM_TUNING", std::getenv("REFORMER_GEMM_TUNING"));
  return on;
}
// Whether products may take an epilogue (REFORMER_GEMM_EPILOGUES): off,
// gemm_to declines every product with one, as where cuBLASLt has no kernel
// for it, so that the callers' fallbacks can be run and tested on any GPU.
bool gemm_epilogues() {
  static const bool on =
      switch_from_env("REFORMER_GEMM_EPILOGUES", std::getenv("REFORMER_GEMM_EPILOGUES"));
  return on;
}

// The choices, shared by every CudaOps of the process (so that two models
// in one process multiply alike), and their lock.
std::mutex& gemm_choices_mutex() {
  static std::mutex m;
  return m;
}
template <class Key, class Choice>
std::map<Key, Choice>& gemm_choices() {
  static std::map<Key, Choice> choices;
  return choices;
}

// Largest power of two (<= 16) dividing both the address and the row stride in bytes.
int alignment(const void* p, int64_t ld, int elem_bytes) {
  const uint64_t a = uint64_t(reinterpret_cast<uintptr_t>(p)) | uint64_t(ld * elem_bytes);
  int al = 16;
  while (al > elem_bytes && (a % uint64_t(al)) != 0) al >>= 1;
  return al;
}

// RAII holders for the cuBLASLt descriptors of one call.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

void round_bf16_2d(__nv_bfloat16* dst, int64_t ld_dst, const float* src, int64_t ld_src,
                   int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n <= 0) return;
  const bool vec = cols % 4 == 0 && ld_src % 4 == 0 && ld_dst % 4 == 0 &&
                   aligned(src, 16) && aligned(dst, 8);
  if (vec) {
    round_bf16_2d_vec4_kernel<<<grid_for(n / 4), kThreads, 0, stream>>>(dst, ld_dst, src, ld_src,
                                                                       rows, cols / 4);
    CUDA_CHECK_LAUNCH("round_bf16_2d_vec4_kernel");
  } else {
    round_bf16_2d_kernel<<<grid_for(n), kThreads, 0, stream>>>(dst, ld_dst, src, ld_src, rows,
                                                                cols);
    CUDA_CHECK_LAUNCH("round_bf16_2d_kernel");
  }
}

void round_bf16(__nv_bfloat16* dst, const float* src, int64_t rows, int64_t cols,
                cudaStream_t stream) {
  round_bf16_2d(dst, cols, src, cols, rows, cols, stream);
}

}  // namespace cuda

// Index of the fastest of `algos` for this call, timed on its own operands
// (the lowest index within 2% of the fastest, so that near ties keep the
// heuristic's order). The timing runs leave D as one run leaves it: they
// write D from A, B and C where C is not D; a product accumulating into D
// itself is timed into a scratch D instead, allocated for the timing and
// freed after it (at most kTuneScratchBytes, and only with
// kTuneFreeMargin more free; else not timed: 0). The scratch is outside
// the tracked allocations (peak_bytes) and the memory plan: it exists for
// the first call of a shape only. Waits for the stream.
int CudaOps::tuned_choice(cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la,
                          cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc,
                          const std::vector<cublasLtMatmulAlgo_t>& algos, const void* A,
                          const void* B, float beta, const GemmOut& out, float alpha, int64_t n) {
  void* d = out.d;
  const void* c = out.c ? out.c : out.d;
  if (d == A || d == B) return 0;
  // The scratch output and the events, released on every way out.
  struct Timing {
    void* scratch = nullptr;
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    ~Timing() {
      if (e0) cudaEventDestroy(e0);
      if (e1) cudaEventDestroy(e1);
      if (scratch) cudaFree(scratch);
    }
  } t;
  if (beta != 0.0f && c == d) {
    const size_t bytes = size_t(out.ld) * size_t(n) * (out.bf16 ? 2 : 4);
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    if (bytes > cuda::kTuneScratchBytes || free_bytes < bytes + cuda::kTuneFreeMargin) return 0;
    if (cudaMalloc(&t.scratch, bytes) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    d = t.scratch;
  }
  CUDA_CHECK(cudaEventCreate(&t.e0));
  CUDA_CHECK(cudaEventCreate(&t.e1));
  std::vector<float> ms(algos.size(), -1.0f);
  for (size_t i = 0; i < algos.size(); ++i) {
    auto run = [&] {
      return cublasLtMatmul(lt_, op, &alpha, A, la, B, lb, &beta, c, lc, d, lc, &algos[i], lt_ws_,
                            lt_ws_bytes_, stream_);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;
    CUDA_CHECK(cudaEventRecord(t.e0, stream_));
    bool ok = true;
    for (int r = 0; r < cuda::kTuneReps && ok; ++r) ok = run() == CUBLAS_STATUS_SUCCESS;
    CUDA_CHECK(cudaEventRecord(t.e1, stream_));
    CUDA_CHECK(cudaEventSynchronize(t.e1));
    if (ok) CUDA_CHECK(cudaEventElapsedTime(&ms[i], t.e0, t.e1));
  }
  float best = -1.0f;
  for (float t : ms)
    if (t > 0.0f && (best < 0.0f || t < best)) best = t;
  for (size_t i = 0; i < ms.size(); ++i)
    if (ms[i] > 0.0f && ms[i] <= 1.02f * best) return int(i);
  return 0;
}

bool CudaOps::gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* A,
                   int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc,
                   GemmOperands operands, float alpha, const float* c_in) {
  GemmOut out;
  out.d = C;
  out.ld = ldc;
  out.c = c_in;
  return gemm_to(trans_a, trans_b, m, n, k, A, lda, B, ldb, beta, out, operands, alpha);
}

bool CudaOps::gemm_to(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* A,
                      int64_t lda, const void* B, int64_t ldb, float beta, const GemmOut& out,
                      GemmOperands operands, float alpha) {
  if (out.epilogue != CUBLASLT_EPILOGUE_DEFAULT && !cuda::gemm_epilogues()) return false;
  const bool bf16 = operands == GemmOperands::bf16;
  const cudaDataType_t ab = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cudaDataType_t cd = out.bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const int eb = bf16 ? 2 : 4, ec = out.bf16 ? 2 : 4;
  const int al_a = cuda::alignment(A, lda, eb), al_b = cuda::alignment(B, ldb, eb),
            al_c = std::min(cuda::alignment(out.d, out.ld, ec),
                            out.c ? cuda::alignment(out.c, out.ld, ec) : 16);
  const int al_ext = (out.bias ? cuda::alignment(out.bias, 0, out.bias_bf16 ? 2 : 4) : 0) * 1000 +
                     (out.aux ? cuda::alignment(out.aux, out.aux_ld, 2) : 0) * 10 +
                     int(out.bias_bf16);
  const GemmKey key{device_, int(trans_a), int(trans_b), m, n, k, lda, ldb, out.ld,
                    beta != 0.0f ? 1 : 0,
                    al_a * 10000 + al_b * 100 + al_c, int(operands), int(out.bf16),
                    int(out.epilogue), al_ext, out.aux_ld};
  auto make = [&](cuda::LtDescs& d, cublasComputeType_t compute) {
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F));
    const cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    if (out.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
      const uint32_t ep = uint32_t(out.epilogue);
      CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
      if (out.bias) {
        const int32_t bt = out.bias_bf16 ? CUDA_R_16BF : CUDA_R_32F;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                    &out.bias, sizeof(out.bias)));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt,
                                                    sizeof(bt)));
      }
      if (out.aux) {
        const int32_t at = CUDA_R_16BF;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                    &out.aux, sizeof(out.aux)));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                                    &out.aux_ld, sizeof(out.aux_ld)));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
            d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &at, sizeof(at)));
      }
    }
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, ab, uint64_t(trans_a ? k : m),
                                            uint64_t(trans_a ? m : k), lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, ab, uint64_t(trans_b ? n : k),
                                            uint64_t(trans_b ? k : n), ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, cd, uint64_t(m), uint64_t(n), out.ld));
  };

  // The algorithm and compute type chosen for this key. bf16 operands:
  // fp32 accumulation, or no product (false: the caller multiplies the fp32
  // operands instead). fp32 operands: tensor-core math first (TF32 or bf16
  // as asked), plain fp32 only if cuBLASLt offers no such kernel. Large
  // products take the fastest of the heuristic's first candidates, timed
  // on this call's operands (tuned_choice); the rest its first.
  std::unique_lock<std::mutex> lock(cuda::gemm_choices_mutex());
  auto& choices = cuda::gemm_choices<GemmKey, GemmChoice>();
  auto it = choices.find(key);
  if (it == choices.end()) {
    std::vector<cublasComputeType_t> computes;
    if (bf16) computes = {CUBLAS_COMPUTE_32F};
    else if (operands == GemmOperands::fp32_tf32) computes = {CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_32F};
    else computes = {CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_COMPUTE_32F};
    const bool tune = cuda::gemm_tuning() && 2.0 * double(m) * double(n) * double(k) >= cuda::kTuneFlops;
    for (cublasComputeType_t compute : computes) {
      cuda::LtDescs q;
      make(q, compute);
      CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&q.pref));
      const uint64_t ws = lt_ws_bytes_;
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      const uint32_t aa = uint32_t(al_a), ab_al = uint32_t(al_b), ac = uint32_t(al_c);
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa)));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab_al, sizeof(ab_al)));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof(ac)));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof(ac)));
      std::vector<cublasLtMatmulHeuristicResult_t> results(tune ? cuda::kTuneCandidates : 1);
      int found = 0;
      const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
          lt_, q.op, q.a, q.b, q.c, q.c, q.pref, int(results.size()), results.data(), &found);
      if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
        int pick = 0;
        if (found > 1) {
          std::vector<cublasLtMatmulAlgo_t> algos;
          for (int i = 0; i < found; ++i) algos.push_back(results[size_t(i)].algo);
          pick = tuned_choice(q.op, q.a, q.b, q.c, algos, A, B, beta, out, alpha, n);
        }
        it = choices.emplace(key, GemmChoice{true, results[size_t(pick)].algo, compute}).first;
        break;
      }
    }
    if (it == choices.end()) {
      if (bf16 || out.bf16 || out.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
        choices.emplace(key, GemmChoice{false, {}, CUBLAS_COMPUTE_32F});
        return false;
      }
      throw DeviceError("cublasLtMatmulAlgoGetHeuristic: no algorithm for m=" + std::to_string(m) +
                        " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                        " (at " __FILE__ ")");
    }
  }
  const GemmChoice choice = it->second;
  lock.unlock();
  if (!choice.found) return false;
  cuda::LtDescs d;
  make(d, choice.compute);
  const void* c = out.c ? out.c : out.d;
  CUBLAS_CHECK(cublasLtMatmul(lt_, d.op, &alpha, A, d.a, B, d.b, &beta, c, d.c, out.d, d.c,
                              &choice.algo, lt_ws_, lt_ws_bytes_, stream_));
  return true;
}

void CudaOps::add_bias(float* out, const float* bias, int64_t rows, int64_t cols, float alpha) {
  if (rows <= 0 || cols <= 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(rows, int64_t(65535) * 16));
  if (cols % 4 == 0 && cuda::aligned(out, 16)) {
    const int threads = int(std::min<int64_t>(cuda::kThreads, (cols / 4 + 31) / 32 * 32));
    cuda::add_bias_vec4_kernel<<<blocks, threads, 0, stream_>>>(reinterpret_cast<float4*>(out),
                                                                bias, rows, cols / 4, alpha);
    CUDA_CHECK_LAUNCH("add_bias_vec4_kernel");
  } else {
    const int threads = int(std::min<int64_t>(cuda::kThreads, (cols + 31) / 32 * 32));
    cuda::add_bias_kernel<<<blocks, threads, 0, stream_>>>(out, bias, rows, cols, alpha);
    CUDA_CHECK_LAUNCH("add_bias_kernel");
  }
}

void CudaOps::matmul_forward(float* out, Operand<float> inp, const float* w, const float* bias,
                             int64_t N, int C, int OC) {
  product(out, inp, w, bias, N, C, OC, 1.0f, 0.0f);
}

// out += alpha (inp @ w): the product's epilogue reads out (beta 1), so the
// branch never goes through memory; the bias follows in its own pass
// (alpha bias), which rounds once more than the CPU's out + alpha (inp @ w +
// bias).
void CudaOps::matmul_accumulate(float* out, Operand<float> inp, const float* w,
                                const float* bias, int64_t N, int C, int OC, float alpha,
                                const float* res) {
  product(out, inp, w, bias, N, C, OC, alpha, 1.0f, res);
}

namespace {
// Row r0 of a product's input (bf16 or fp32 rows of C values) and its bf16
// rows for cuBLASLt: the input's own where it is bf16, else x16 filled by
// rounding them.
const __nv_bfloat16* bf16_rows(Operand<float> inp, int64_t r0, int64_t rows, int C,
                               __nv_bfloat16* x16, cudaStream_t s) {
  if (inp.bf16) return reinterpret_cast<const __nv_bfloat16*>(inp.p) + r0 * C;
  cuda::round_bf16(x16, inp.p + r0 * C, rows, C, s);
  return x16;
}

void check_dense(Operand<float> inp, int C, const char* op) {
  if (!inp.dense(C))
    throw ShapeError(std::string(op) + ": input rows of stride " + std::to_string(inp.ld) +
                     " are not " + std::to_string(C) + " wide");
}

[[noreturn]] void no_bf16_product(const char* op, int C, int OC) {
  throw DeviceError(std::string(op) + ": no bf16 product for a bf16 input, C=" +
                    std::to_string(C) + " OC=" + std::to_string(OC));
}
}  // namespace

void CudaOps::product(float* out, Operand<float> inp, const float* w, const float* bias,
                      int64_t N, int C, int OC, float alpha, float beta, const float* res) {
  check_dense(inp, C, "matmul");
  if (N <= 0 || OC <= 0) return;
  if (C <= 0) {
    if (beta == 0.0f) fill(out, 0.0f, N * OC);
    else if (res && res != out) copy(out, res, N * OC);
  } else {
    // out^T [OC, N] = w^T [OC, C] inp^T [C, N], all column-major views of
    // row-major data, over blocks of rows with bf16 operands.
    const int64_t rows = gemm_block_rows(N, C, OC);
    const cuda::GemmStage st = cuda::carve_gemm_stage(ws_, C, OC, rows);
    __nv_bfloat16 *w16 = st.w, *x16 = st.x;
    cuda::round_bf16(w16, w, C, OC, stream_);
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t nr = std::min(rows, N - r0);
      const __nv_bfloat16* x = bf16_rows(inp, r0, nr, C, x16, stream_);
      const float* c_in = res ? res + r0 * OC : nullptr;
      if (gemm(false, false, OC, nr, C, w16, OC, x, C, beta, out + r0 * OC, OC,
               GemmOperands::bf16, alpha, c_in))
        continue;
      if (inp.bf16) no_bf16_product("matmul", C, OC);
      gemm(false, false, OC, nr, C, w, OC, inp.p + r0 * C, C, beta, out + r0 * OC, OC,
           GemmOperands::fp32_bf16_math, alpha, c_in);
    }
  }
  if (bias) add_bias(out, bias, N, OC, alpha);
}

void CudaOps::matmul_backward(float* dinp, float* dw, float* dbias, const float* dout,
                              Operand<float> inp, const float* w, int64_t N, int C, int OC,
                              bool add_dinp) {
  check_dense(inp, C, "matmul_backward");
  if (N <= 0 || OC <= 0) return;
  if ((dinp || dw) && C > 0) {
    const int64_t rows = gemm_block_rows(N, C, OC);
    const cuda::GemmStage st = cuda::carve_gemm_stage(ws_, C, OC, rows);
    __nv_bfloat16 *w16 = st.w, *x16 = st.x, *d16 = st.d;
    if (dinp) cuda::round_bf16(w16, w, C, OC, stream_);
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t nr = std::min(rows, N - r0);
      cuda::round_bf16(d16, dout + r0 * OC, nr, OC, stream_);
      if (dinp) {
        // dinp^T [C, nr] (+)= w [C, OC] dout^T [OC, nr].
        const float beta = add_dinp ? 1.0f : 0.0f;
        if (!gemm(true, false, C, nr, OC, w16, OC, d16, OC, beta, dinp + r0 * C, C,
                  GemmOperands::bf16))
          gemm(true, false, C, nr, OC, w, OC, dout + r0 * OC, OC, beta, dinp + r0 * C, C);
      }
      if (dw) {
        // dw^T [OC, C] += dout^T [OC, nr] inp [nr, C].
        const __nv_bfloat16* x = bf16_rows(inp, r0, nr, C, x16, stream_);
        if (!gemm(false, true, OC, C, nr, d16, OC, x, C, 1.0f, dw, OC, GemmOperands::bf16)) {
          if (inp.bf16) no_bf16_product("matmul_backward", C, OC);
          gemm(false, true, OC, C, nr, dout + r0 * OC, OC, inp.p + r0 * C, C, 1.0f, dw, OC);
        }
      }
    }
  }
  if (dbias) {
    double* scratch =
        static_cast<double*>(ws_.get(sizeof(double) * size_t(cuda::colsum_slabs(N) * OC)));
    cuda::colsum<double>(scratch, cuda::MatrixValue<float>{dout, OC}, cuda::AddTo{dbias}, N, OC,
                         stream_);
  }
}

}  // namespace reformer
