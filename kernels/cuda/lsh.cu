// LSH hashing by random rotations and the per-round sort (CUDA twin of
// kernels/cpu/lsh.cpp).
//
//  - Rotations: element i of R is rng_normal(make_key(seed, step, layer,
//    head, 1), i), the CPU's stream; device logf/cosf may differ from the
//    host's by an ulp, so hashes agree with the CPU except at near-ties.
//  - Hash: one thread per (position, round), the position's vector and a
//    32-column tile of the rotation staged in shared memory; argmax over
//    concat(y, -y) with the lowest index on ties.
//  - Sort: one CUB radix sort of the keys (round, bucket, position) packed in
//    32 or 64 bits; the position bits make it stable by position. A bucket
//    id outside [0, n_buckets) throws ShapeError (checked on the host after
//    the sort, which costs one synchronisation).
// All three are bitwise reproducible.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <string>

#include "framework/errors.h"
#include "kernels/common/philox.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

constexpr uint64_t kRotationPurpose = 1;  // as in kernels/cpu/lsh.cpp
constexpr int kHashThreads = 64;          // positions per block of the hash kernel
constexpr int kHashCols = 32;             // rotation columns per shared-memory tile

void check_buckets(int n_buckets) {
  if (n_buckets < 2 || n_buckets % 2 != 0)
    throw ShapeError("lsh: n_buckets must be even and >= 2, got " + std::to_string(n_buckets));
}

int bits_for(int64_t n) {  // bits to hold values 0..n-1 (at least 1)
  int b = 1;
  while ((int64_t(1) << b) < n) ++b;
  return b;
}

__global__ void rotations_kernel(float* R, RngKey key, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    R[i] = rng_normal(key, uint64_t(i));
}

// buckets[r, i] for i in this block's positions, r = blockIdx.y. The
// rotation is staged kHashCols columns at a time in shared memory; each
// thread keeps its kHashCols projections in registers (y summed over d in
// increasing order, as on the CPU).
__global__ void __launch_bounds__(kHashThreads) hash_kernel(int32_t* buckets, const float* qk,
                                                            int64_t ld, const float* R, int64_t L,
                                                            int dh, int half) {
  extern __shared__ float smem[];
  float* xs = smem;                                // [kHashThreads][dh + 1]
  float4* rs = reinterpret_cast<float4*>(smem + ((kHashThreads * (dh + 1) + 3) / 4) * 4);
                                                   // [dh][kHashCols / 4]
  const int64_t i0 = int64_t(blockIdx.x) * kHashThreads;
  const int r = blockIdx.y;
  for (int e = threadIdx.x; e < kHashThreads * dh; e += blockDim.x) {
    const int t = e / dh, d = e % dh;
    xs[t * (dh + 1) + d] = i0 + t < L ? qk[(i0 + t) * ld + d] : 0.0f;
  }
  const int64_t i = i0 + threadIdx.x;
  const float* x = xs + threadIdx.x * (dh + 1);
  const float* Rr = R + int64_t(r) * dh * half;
  float best_pos = 0.0f, best_neg = 0.0f;
  int arg_pos = 0, arg_neg = 0;
  for (int k0 = 0; k0 < half; k0 += kHashCols) {
    __syncthreads();  // xs written / the previous rotation tile consumed
    float* rsf = reinterpret_cast<float*>(rs);
    for (int e = threadIdx.x; e < dh * kHashCols; e += blockDim.x) {
      const int d = e / kHashCols, j = e % kHashCols;
      rsf[e] = k0 + j < half ? Rr[int64_t(d) * half + k0 + j] : 0.0f;
    }
    __syncthreads();
    float y[kHashCols];
#pragma unroll
    for (int j = 0; j < kHashCols; ++j) y[j] = 0.0f;
    for (int d = 0; d < dh; ++d) {
      const float xd = x[d];
#pragma unroll
      for (int j4 = 0; j4 < kHashCols / 4; ++j4) {
        const float4 rv = rs[d * (kHashCols / 4) + j4];
        y[4 * j4 + 0] += xd * rv.x;
        y[4 * j4 + 1] += xd * rv.y;
        y[4 * j4 + 2] += xd * rv.z;
        y[4 * j4 + 3] += xd * rv.w;
      }
    }
#pragma unroll
    for (int j = 0; j < kHashCols; ++j) {
      const int k = k0 + j;
      if (k >= half) break;
      if (k == 0 || y[j] > best_pos) {
        best_pos = y[j];
        arg_pos = k;
      }
      if (k == 0 || -y[j] > best_neg) {
        best_neg = -y[j];
        arg_neg = k;
      }
    }
  }
  if (i < L) buckets[int64_t(r) * L + i] = best_neg > best_pos ? half + arg_neg : arg_pos;
}

template <class Key>
__global__ void make_keys_kernel(Key* keys, int32_t* bad, const int32_t* buckets, int64_t L,
                                 int64_t n, int n_buckets, int bits_l, int bits_b) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / L, i = idx % L;
    int32_t b = buckets[idx];
    if (b < 0 || b >= n_buckets) {
      *bad = 1;
      b = 0;
    }
    keys[idx] = (Key(r) << (bits_b + bits_l)) | (Key(b) << bits_l) | Key(i);
  }
}

template <class Key>
__global__ void keys_to_perm_kernel(int32_t* perm, const Key* keys, int64_t n, Key mask) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x)
    perm[idx] = int32_t(keys[idx] & mask);
}

template <class Key>
void sort_rounds(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes, int n_buckets,
                 int bits_l, int bits_b, int total_bits, Workspace& ws, int32_t* host_flag,
                 cudaStream_t stream) {
  const int64_t n = int64_t(n_hashes) * L;
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, temp_bytes, static_cast<const Key*>(nullptr),
                                            static_cast<Key*>(nullptr), n, 0, total_bits, stream));
  Carve carve;
  const size_t off_flag = carve.reserve(sizeof(int32_t));
  const size_t off_in = carve.reserve(sizeof(Key) * size_t(n));
  const size_t off_out = carve.reserve(sizeof(Key) * size_t(n));
  const size_t off_temp = carve.reserve(temp_bytes);
  void* base = ws.get(carve.total());
  int32_t* flag = Carve::at<int32_t>(base, off_flag);
  Key* keys_in = Carve::at<Key>(base, off_in);
  Key* keys_out = Carve::at<Key>(base, off_out);
  void* temp = Carve::at<char>(base, off_temp);

  CUDA_CHECK(cudaMemsetAsync(flag, 0, sizeof(int32_t), stream));
  make_keys_kernel<Key><<<grid_for(n), kThreads, 0, stream>>>(keys_in, flag, buckets, L, n,
                                                              n_buckets, bits_l, bits_b);
  CUDA_CHECK_LAUNCH("make_keys_kernel");
  CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp, temp_bytes, keys_in, keys_out, n, 0, total_bits,
                                            stream));
  keys_to_perm_kernel<Key><<<grid_for(n), kThreads, 0, stream>>>(
      perm, keys_out, n, Key((Key(1) << bits_l) - 1));
  CUDA_CHECK_LAUNCH("keys_to_perm_kernel");
  CUDA_CHECK(cudaMemcpyAsync(host_flag, flag, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  if (*host_flag != 0)
    throw ShapeError("lsh_sort: a bucket id lies outside [0, " + std::to_string(n_buckets) + ")");
}

}  // namespace
}  // namespace cuda

void CudaOps::lsh_rotations(float* R, uint64_t seed, uint64_t step, int layer, int head,
                            int n_hashes, int dh, int n_buckets) {
  cuda::check_buckets(n_buckets);
  const RngKey key =
      make_key(seed, step, uint64_t(layer), uint64_t(head), cuda::kRotationPurpose);
  const int64_t n = int64_t(n_hashes) * dh * (n_buckets / 2);
  if (n <= 0) return;
  cuda::rotations_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(R, key, n);
  CUDA_CHECK_LAUNCH("rotations_kernel");
}

void CudaOps::lsh_hash(int32_t* buckets, const float* qk, int64_t ld, const float* R, int64_t L,
                       int dh, int n_hashes, int n_buckets) {
  cuda::check_buckets(n_buckets);
  if (L <= 0 || n_hashes <= 0) return;
  if (dh <= 0 || ld < dh) throw ShapeError("lsh_hash: need dh > 0 and ld >= dh");
  const size_t smem =
      sizeof(float) * (size_t((cuda::kHashThreads * (dh + 1) + 3) / 4) * 4 +
                       size_t(dh) * cuda::kHashCols);
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(cuda::hash_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)));
  const dim3 grid(unsigned((L + cuda::kHashThreads - 1) / cuda::kHashThreads), unsigned(n_hashes));
  cuda::hash_kernel<<<grid, cuda::kHashThreads, smem, stream_>>>(buckets, qk, ld, R, L, dh,
                                                                 n_buckets / 2);
  CUDA_CHECK_LAUNCH("hash_kernel");
}

void CudaOps::lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes,
                       int n_buckets) {
  cuda::check_buckets(n_buckets);
  if (L <= 0 || n_hashes <= 0) return;
  const int bits_l = cuda::bits_for(L), bits_b = cuda::bits_for(n_buckets),
            bits_r = cuda::bits_for(n_hashes);
  const int total = bits_l + bits_b + bits_r;
  if (total > 64) throw ShapeError("lsh_sort: (round, bucket, position) does not fit 64 bits");
  if (total <= 32)
    cuda::sort_rounds<uint32_t>(perm, buckets, L, n_hashes, n_buckets, bits_l, bits_b, total, ws_,
                                host_flag_, stream_);
  else
    cuda::sort_rounds<uint64_t>(perm, buckets, L, n_hashes, n_buckets, bits_l, bits_b, total, ws_,
                                host_flag_, stream_);
}

}  // namespace reformer
