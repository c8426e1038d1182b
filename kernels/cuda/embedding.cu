// Token plus axial position embedding (CUDA twin of kernels/cpu/embedding.cpp).
//
// Determinism: every gradient is summed in an order fixed by the inputs, so
// the backward is bitwise reproducible. The position-table gradients are
// summed by one thread per element in row order; the token-table gradient
// dwte over the positions sorted by token, window by window
// (kernels/common/embedding_sums.h), so that no two threads add into one
// element and no atomics are used. The CPU adds row by row into dwte; here
// each token's rows are summed first and the sum added, so the two differ in
// the last bits.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include "kernels/common/embedding_sums.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

// out[i, c] = wte[tokens[i], c] + (c < d1 ? pos1[p / a2, c] : pos2[p % a2, c - d1]).
__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* wte,
                                         const float* pos1, const float* pos2, int64_t L, int D,
                                         int d1, int a2, int64_t pos_offset) {
  const int d2 = D - d1;
  const int64_t n = L * D;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = k / D;
    const int c = int(k % D);
    const int64_t p = pos_offset + i;
    const float e = c < d1 ? pos1[(p / a2) * d1 + c] : pos2[(p % a2) * d2 + (c - d1)];
    out[k] = wte[int64_t(tokens[i]) * D + c] + e;
  }
}

__global__ void iota_kernel(int32_t* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = int32_t(i);
}

// Columns of dwte per block of the window sums (one per thread).
constexpr int kDwteCols = 128;
// dout rows a thread loads before it adds them (loads in flight).
constexpr int kDwteBatch = 8;

// Window blockIdx.x of the sorted slots (token key[j], row pos[j]), columns
// blockIdx.y * kDwteCols + threadIdx.x: sums each token's rows in slot
// order. A token whose slots all lie in the window adds its sum to its row
// of dwte (no other thread holds that token and column). Otherwise the part
// of a token that began in an earlier window goes to head[window], and the
// part of one that begins here and goes on into the next window to
// tail[window] (dwte_spill_kernel adds them up).
__global__ void __launch_bounds__(kDwteCols)
    dwte_window_kernel(float* dwte, float* head, float* tail, const float* dout,
                       const int32_t* key, const int32_t* pos, int64_t L, int D) {
  const int c = int(blockIdx.y) * kDwteCols + int(threadIdx.x);
  if (c >= D) return;
  const int64_t j0 = int64_t(blockIdx.x) * kDwteWindow;
  const int64_t j1 = min(L, j0 + kDwteWindow);
  const int64_t at = int64_t(blockIdx.x) * D + c;
  int32_t v = key[j0];
  bool began_before = j0 > 0 && key[j0 - 1] == v;
  float acc = 0.0f;
  for (int64_t jb = j0; jb < j1; jb += kDwteBatch) {
    float x[kDwteBatch];
#pragma unroll
    for (int u = 0; u < kDwteBatch; ++u)
      x[u] = jb + u < j1 ? dout[int64_t(pos[jb + u]) * D + c] : 0.0f;
#pragma unroll
    for (int u = 0; u < kDwteBatch; ++u) {
      const int64_t j = jb + u;
      if (j >= j1) break;
      acc += x[u];
      const bool goes_on = j + 1 < L && key[j + 1] == v;
      if (goes_on && j + 1 < j1) continue;
      if (began_before) head[at] = acc;
      else if (goes_on) tail[at] = acc;
      else dwte[int64_t(v) * D + c] += acc;
      if (j + 1 < j1) v = key[j + 1];
      acc = 0.0f;
      began_before = false;
    }
  }
}

// For each window whose last token began in it and goes on into the next
// window: that token's sum, tail[window] then head[] of each later window it
// reaches, in window order, added to its row of dwte.
__global__ void dwte_spill_kernel(float* dwte, const float* head, const float* tail,
                                  const int32_t* key, int64_t L, int D, int64_t windows) {
  const int64_t n = windows * D;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = k / D;
    const int c = int(k % D);
    const int64_t e = min(L, (w + 1) * kDwteWindow);
    if (e == L || key[e] != key[e - 1]) continue;  // the window's last token ends in it
    const int32_t v = key[e - 1];
    if (w > 0 && key[w * kDwteWindow - 1] == v) continue;  // it began in an earlier window
    float s = tail[k];
    for (int64_t u = w + 1;; ++u) {
      s += head[u * D + c];
      const int64_t eu = min(L, (u + 1) * kDwteWindow);
      if (eu == L || key[eu] != v) break;
    }
    dwte[int64_t(v) * D + c] += s;
  }
}

// dpos1[r, c] += sum of dout[i, c] over the rows i with (pos_offset + i) / a2 == r;
// one thread per touched (r, c), rows in increasing order.
__global__ void embedding_dpos1_kernel(float* dpos1, const float* dout, int64_t L, int D, int d1,
                                       int a2, int64_t pos_offset, int64_t r_first,
                                       int64_t n_rows) {
  const int64_t n = n_rows * d1;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = r_first + k / d1;
    const int c = int(k % d1);
    const int64_t i0 = max(int64_t(0), r * a2 - pos_offset);
    const int64_t i1 = min(L, (r + 1) * a2 - pos_offset);
    float s = 0.0f;
    for (int64_t i = i0; i < i1; ++i) s += dout[i * D + c];
    dpos1[r * d1 + c] += s;
  }
}

// dpos2[q, c] += sum of dout[i, d1 + c] over the rows i with (pos_offset + i) % a2 == q.
__global__ void embedding_dpos2_kernel(float* dpos2, const float* dout, int64_t L, int D, int d1,
                                       int a2, int64_t pos_offset) {
  const int d2 = D - d1;
  const int64_t n = int64_t(a2) * d2;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = k / d2;
    const int c = int(k % d2);
    // first row i >= 0 with (pos_offset + i) % a2 == q
    int64_t i = (q - pos_offset % a2 + a2) % a2;
    float s = 0.0f;
    for (; i < L; i += a2) s += dout[i * D + d1 + c];
    dpos2[q * d2 + c] += s;
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::embedding_forward(float* out, const int32_t* tokens, const float* wte,
                                const float* pos1, const float* pos2, int64_t L, int D, int d1,
                                int a2, int64_t pos_offset) {
  if (L <= 0 || D <= 0) return;
  cuda::embedding_forward_kernel<<<cuda::grid_for(L * D), cuda::kThreads, 0, stream_>>>(
      out, tokens, wte, pos1, pos2, L, D, d1, a2, pos_offset);
  CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

void CudaOps::embedding_backward(float* dwte, float* dpos1, float* dpos2, const float* dout,
                                 const int32_t* tokens, int64_t L, int D, int d1, int a2,
                                 int64_t pos_offset) {
  if (L <= 0 || D <= 0) return;
  if (dwte) {
    // kernels/common/embedding_sums.h: the positions sorted by token, then
    // summed window by window.
    const int64_t windows = dwte_windows(L);
    size_t temp_bytes = 0;
    cub::DoubleBuffer<int32_t> keys(nullptr, nullptr), rows(nullptr, nullptr);
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, rows, L, 0, 32,
                                               stream_));
    cuda::Carve carve;
    size_t off[4];
    for (size_t& o : off) o = carve.reserve(sizeof(int32_t) * size_t(L));
    const size_t off_temp = carve.reserve(temp_bytes);
    const size_t off_head = carve.reserve(sizeof(float) * size_t(windows * D));
    const size_t off_tail = carve.reserve(sizeof(float) * size_t(windows * D));
    void* base = ws_.get(carve.total());
    keys = cub::DoubleBuffer<int32_t>(cuda::Carve::at<int32_t>(base, off[0]),
                                      cuda::Carve::at<int32_t>(base, off[1]));
    rows = cub::DoubleBuffer<int32_t>(cuda::Carve::at<int32_t>(base, off[2]),
                                      cuda::Carve::at<int32_t>(base, off[3]));
    float* head = cuda::Carve::at<float>(base, off_head);
    float* tail = cuda::Carve::at<float>(base, off_tail);
    CUDA_CHECK(cudaMemcpyAsync(keys.Current(), tokens, sizeof(int32_t) * size_t(L),
                               cudaMemcpyDeviceToDevice, stream_));
    cuda::iota_kernel<<<cuda::grid_for(L), cuda::kThreads, 0, stream_>>>(rows.Current(), L);
    CUDA_CHECK_LAUNCH("iota_kernel");
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cuda::Carve::at<char>(base, off_temp),
                                               temp_bytes, keys, rows, L, 0, 32, stream_));
    const dim3 grid(unsigned(windows), unsigned((D + cuda::kDwteCols - 1) / cuda::kDwteCols));
    cuda::dwte_window_kernel<<<grid, cuda::kDwteCols, 0, stream_>>>(
        dwte, head, tail, dout, keys.Current(), rows.Current(), L, D);
    CUDA_CHECK_LAUNCH("dwte_window_kernel");
    cuda::dwte_spill_kernel<<<cuda::grid_for(windows * D), cuda::kThreads, 0, stream_>>>(
        dwte, head, tail, keys.Current(), L, D, windows);
    CUDA_CHECK_LAUNCH("dwte_spill_kernel");
  }
  if (dpos1 && d1 > 0) {
    const int64_t r_first = pos_offset / a2;
    const int64_t n_rows = (pos_offset + L - 1) / a2 - r_first + 1;
    cuda::embedding_dpos1_kernel<<<cuda::grid_for(n_rows * d1), cuda::kThreads, 0, stream_>>>(
        dpos1, dout, L, D, d1, a2, pos_offset, r_first, n_rows);
    CUDA_CHECK_LAUNCH("embedding_dpos1_kernel");
  }
  if (dpos2 && D - d1 > 0) {
    cuda::embedding_dpos2_kernel<<<cuda::grid_for(int64_t(a2) * (D - d1)), cuda::kThreads, 0,
                                   stream_>>>(dpos2, dout, L, D, d1, a2, pos_offset);
    CUDA_CHECK_LAUNCH("embedding_dpos2_kernel");
  }
}

}  // namespace reformer
