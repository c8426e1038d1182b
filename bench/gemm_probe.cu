// gemm_probe: the model's linear-layer products timed three ways on one GPU,
// to choose how matmul.cu feeds the tensor cores.
//
//   fast16  fp32 operands in memory, CUBLAS_COMPUTE_32F_FAST_16BF (bf16 math)
//   bf16    bf16 operands, fp32 output, CUBLAS_COMPUTE_32F
//   +cvt    bf16, plus converting both fp32 operands to bf16 first
//
// Usage: gemm_probe [rows ...]   (default 16384 65536)
// Prints one row per (shape, rows): ms and TFLOP/s of each way.
//
//   gemm_probe --algos K [rows ...]
// times, for the bf16 products, each of the first K algorithms cuBLASLt's
// heuristic offers (the model takes its first) and prints the first's and
// the fastest's TFLOP/s. Operands are random (zeros draw less power and run
// at higher clocks than real data).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

// The probe is its own program: a failed call prints where and exits 1.
static void die_unless(bool ok, const char* file, int line, const std::string& what) {
  if (ok) return;
  std::fprintf(stderr, "%s:%d %s\n", file, line, what.c_str());
  std::exit(1);
}
#define CK(x)                                                                          \
  do {                                                                                 \
    const cudaError_t e_ = (x);                                                        \
    die_unless(e_ == cudaSuccess, __FILE__, __LINE__, cudaGetErrorString(e_));         \
  } while (0)
#define CB(x)                                                                          \
  do {                                                                                 \
    const cublasStatus_t s_ = (x);                                                     \
    die_unless(s_ == CUBLAS_STATUS_SUCCESS, __FILE__, __LINE__,                        \
               "cublas status " + std::to_string(int(s_)));                            \
  } while (0)

__global__ void to_bf16(__nv_bfloat16* dst, const float* src, int64_t n) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i + 3 < n) {
    const float4 v = *reinterpret_cast<const float4*>(src + i);
    __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    *reinterpret_cast<__nv_bfloat162*>(dst + i) = a;
    *reinterpret_cast<__nv_bfloat162*>(dst + i + 2) = b;
  } else {
    for (int64_t j = i; j < n; ++j) dst[j] = __float2bfloat16_rn(src[j]);
  }
}

static void convert(__nv_bfloat16* dst, const float* src, int64_t n, cudaStream_t s) {
  const int64_t threads = (n + 3) / 4;
  to_bf16<<<unsigned((threads + 255) / 256), 256, 0, s>>>(dst, src, n);
}

struct Shape {
  const char* name;
  bool ta, tb;
  int64_t m, n, k;  // column-major C[m, n] = op(A) op(B); n or k is "rows" where marked
};

static cublasLtHandle_t lt;
static void* ws;
static const size_t ws_bytes = 64u << 20;

// The descriptors of one product, A [m,k] (or [k,m] transposed), B [k,n]
// (or [n,k]), C [m,n] fp32, and the heuristic's first k candidates for it.
struct Product {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> algos;
  Product(const Shape& s, cudaDataType_t ab, cublasComputeType_t compute, int k) {
    CB(cublasLtMatmulDescCreate(&op, compute, CUDA_R_32F));
    cublasOperation_t ta = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb = s.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    CB(cublasLtMatrixLayoutCreate(&a, ab, s.ta ? s.k : s.m, s.ta ? s.m : s.k, s.ta ? s.k : s.m));
    CB(cublasLtMatrixLayoutCreate(&b, ab, s.tb ? s.n : s.k, s.tb ? s.k : s.n, s.tb ? s.n : s.k));
    CB(cublasLtMatrixLayoutCreate(&c, CUDA_R_32F, s.m, s.n, s.m));
    cublasLtMatmulPreference_t pref;
    CB(cublasLtMatmulPreferenceCreate(&pref));
    CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &ws_bytes, sizeof(ws_bytes)));
    algos.resize(static_cast<size_t>(k));
    int found = 0;
    CB(cublasLtMatmulAlgoGetHeuristic(lt, op, a, b, c, c, pref, k, algos.data(), &found));
    algos.resize(static_cast<size_t>(found));
    cublasLtMatmulPreferenceDestroy(pref);
  }
  ~Product() {
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(c);
    cublasLtMatmulDescDestroy(op);
  }
  // ms per run of candidate i (C += A B), after `warm` untimed runs; -1
  // where cuBLASLt refuses it.
  float time(size_t i, const void* A, const void* B, float* C, cudaStream_t st, int warm,
             int reps) const {
    const float alpha = 1.0f, beta = 1.0f;
    auto run = [&] {
      return cublasLtMatmul(lt, op, &alpha, A, a, B, b, &beta, C, c, C, c, &algos[i].algo, ws,
                            ws_bytes, st);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) return -1.0f;
    for (int w = 1; w < warm; ++w) run();
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0, st));
    for (int r = 0; r < reps; ++r) run();
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return ms / reps;
  }
};

// The heuristic's first algorithm for one product: ms per run.
static float time_gemm(const Shape& s, cudaDataType_t ab, cublasComputeType_t compute, const void* A,
                       const void* B, float* C, cudaStream_t st, int reps) {
  const Product p(s, ab, compute, 1);
  return p.algos.empty() ? -1.0f : p.time(0, A, B, C, st, 1, reps);
}

__global__ void fill_random(__nv_bfloat16* p, int64_t n, uint32_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    p[i] = __float2bfloat16_rn(float(x & 0xffff) / 32768.0f - 1.0f);
  }
}

// Each of the heuristic's first k algorithms for the bf16 product on random
// operands (4 untimed runs, 10 timed): prints the first's time, the
// fastest's and its index.
static void time_algos(const Shape& s, int k, int64_t N, cudaStream_t st) {
  __nv_bfloat16 *A, *B;
  float* C;
  CK(cudaMalloc(&A, 2 * s.m * s.k));
  CK(cudaMalloc(&B, 2 * s.k * s.n));
  CK(cudaMalloc(&C, sizeof(float) * s.m * s.n));
  fill_random<<<1024, 256, 0, st>>>(A, s.m * s.k, 1u);
  fill_random<<<1024, 256, 0, st>>>(B, s.k * s.n, 2u);
  CK(cudaMemsetAsync(C, 0, sizeof(float) * s.m * s.n, st));
  const Product p(s, CUDA_R_16BF, CUBLAS_COMPUTE_32F, k);
  const double flop = 2.0 * double(s.m) * double(s.n) * double(s.k);
  float first = -1, best = -1;
  int best_i = -1;
  for (size_t i = 0; i < p.algos.size(); ++i) {
    const float ms = p.time(i, A, B, C, st, 4, 10);
    if (ms < 0) continue;
    if (i == 0) first = ms;
    if (best < 0 || ms < best) best = ms, best_i = int(i);
  }
  std::printf("| %s | %lld | %d | %.3f | %.0f | %.3f | %.0f | %d |\n", s.name, (long long)N,
              int(p.algos.size()), first, flop / first / 1e9, best, flop / best / 1e9, best_i);
  cudaFree(A);
  cudaFree(B);
  cudaFree(C);
}

static float time_convert(const Shape& s, __nv_bfloat16* a16, const float* a, __nv_bfloat16* b16,
                          const float* b, cudaStream_t st, int reps) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventRecord(e0, st));
  for (int i = 0; i < reps; ++i) {
    convert(a16, a, s.m * s.k, st);
    convert(b16, b, s.k * s.n, st);
  }
  CK(cudaEventRecord(e1, st));
  CK(cudaEventSynchronize(e1));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  return ms / reps;
}

int main(int argc, char** argv) {
  std::vector<int64_t> rows;
  int algos = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--algos" && i + 1 < argc) algos = std::atoi(argv[++i]);
    else rows.push_back(std::atoll(argv[i]));
  }
  if (rows.empty()) rows = {16384, 65536};
  CB(cublasLtCreate(&lt));
  CK(cudaMalloc(&ws, ws_bytes));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  if (algos > 0) {
    std::printf("| product | rows | algorithms | first ms | TFLOP/s | fastest ms | TFLOP/s | index |\n");
    std::printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
  } else {
  std::printf("| product | rows | fast16 ms | TFLOP/s | bf16 ms | TFLOP/s | convert ms | bf16+cvt TFLOP/s |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
  }
  for (int64_t N : rows) {
    // Column-major views of the row-major model products (matmul.cu):
    // forward out^T[OC,N] = w^T[OC,C] inp^T[C,N]; dinp^T[C,N] = w[C,OC] dout^T;
    // dw^T[OC,C] = dout^T[OC,N] inp[N,C].
    const Shape shapes[] = {
        {"fwd 1024->1024", false, false, 1024, N, 1024},
        {"fwd 1024->4096", false, false, 4096, N, 1024},
        {"fwd 4096->1024", false, false, 1024, N, 4096},
        {"dinp 1024<-4096", true, false, 1024, N, 4096},
        {"dinp 4096<-1024", true, false, 4096, N, 1024},
        {"dw 1024x4096", false, true, 4096, 1024, N},
        {"dw 4096x1024", false, true, 1024, 4096, N},
        {"fwd 1024->2048", false, false, 2048, N, 1024},
        {"dinp 1024<-2048", true, false, 1024, N, 2048},
        {"dw 1024x1024", false, true, 1024, 1024, N},
        {"dw 1024x2048", false, true, 2048, 1024, N},
    };
    for (const Shape& s : shapes) {
      if (algos > 0) {
        time_algos(s, algos, N, st);
        continue;
      }
      float *A, *B, *C;
      __nv_bfloat16 *A16, *B16;
      CK(cudaMalloc(&A, sizeof(float) * s.m * s.k));
      CK(cudaMalloc(&B, sizeof(float) * s.k * s.n));
      CK(cudaMalloc(&C, sizeof(float) * s.m * s.n));
      CK(cudaMalloc(&A16, 2 * s.m * s.k));
      CK(cudaMalloc(&B16, 2 * s.k * s.n));
      CK(cudaMemset(A, 0, sizeof(float) * s.m * s.k));
      CK(cudaMemset(B, 0, sizeof(float) * s.k * s.n));
      CK(cudaMemset(C, 0, sizeof(float) * s.m * s.n));
      const int reps = 20;
      const double flop = 2.0 * double(s.m) * double(s.n) * double(s.k);
      const float f = time_gemm(s, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF, A, B, C, st, reps);
      const float h = time_gemm(s, CUDA_R_16BF, CUBLAS_COMPUTE_32F, A16, B16, C, st, reps);
      const float c = time_convert(s, A16, A, B16, B, st, reps);
      std::printf("| %s | %lld | %.3f | %.0f | %.3f | %.0f | %.3f | %.0f |\n", s.name,
                  (long long)N, f, flop / f / 1e9, h, flop / h / 1e9, c, flop / (h + c) / 1e9);
      cudaFree(A);
      cudaFree(B);
      cudaFree(C);
      cudaFree(A16);
      cudaFree(B16);
    }
  }
  return 0;
}
