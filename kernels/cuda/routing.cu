// Routing of the distributed bucket sort (CUDA twin of kernels/cpu/routing.cpp).
//
//  - bucket_histogram: one warp-aggregated atomicAdd per distinct (round,
//    bucket) in a warp (__match_any_sync), so a skewed hash that puts most
//    positions in a few buckets does not serialise on one address.
//  - sort_route: a kernel over the sorted slots j gives each position its
//    destinations (owner, and at most one neighbour) and marks them in a
//    destination-major flag array [sp, L]; one CUB exclusive scan over it
//    gives every entry's index directly (the entries before it: all of
//    lower ranks', then this rank's at lower positions), and a second kernel
//    writes the entries. Order and values are the CPU's, bit for bit.
//  - invert_index: dst filled with -1, then dst[src[k]] = k by atomicExch;
//    an old value other than -1 is a repeated index.
// Invalid input raises CudaOps' device error word (kernels/cuda/check.h);
// the host does not wait for these ops.
#include <cuda_runtime.h>

#include <cub/device/device_scan.cuh>

#include "kernels/common/routing_checks.h"
#include "kernels/cuda/cuda_ops_impl.h"
#include "kernels/cuda/device_utils.cuh"

namespace reformer {
namespace cuda {
namespace {

__global__ void histogram_kernel(int32_t* hist, int32_t* bad, const int32_t* buckets, int64_t L,
                                 int64_t n, int n_buckets) {
  const unsigned lane = threadIdx.x & 31;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < n;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t idx = base + threadIdx.x;
    const bool in = idx < n;
    int64_t key = -1;
    if (in) {
      const int32_t b = buckets[idx];
      if (b < 0 || b >= n_buckets)
        *bad = kBucketOutOfRange;
      else
        key = (idx / L) * n_buckets + b;
    }
    // Lanes with the same key: the lowest adds their count.
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    if (key >= 0 && (peers & ((1u << lane) - 1)) == 0)
      atomicAdd(&hist[key], int32_t(__popc(peers)));
  }
}

// Destinations of the position at sorted slot j: rank and local slot of the
// owner (d[0], d[1]) and of the halo copy (d[2], d[3]; -1 for none); a 1 in
// flags[rank * L + position] for each.
__global__ void route_dest_kernel(int4* dest, int32_t* flags, int32_t* bad, const int32_t* order,
                                  const int32_t* buckets, const int32_t* delta,
                                  SortRouteParams p) {
  const int64_t L = p.L, total = L * p.sp;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < L;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = order ? order[j] : j;
    if (i < 0 || i >= L) {
      *bad = kRouteOutOfRange;
      continue;
    }
    const int64_t g = int64_t(delta[buckets ? buckets[i] : 0]) + j;
    if (g < 0 || g >= total) {
      *bad = kRouteOutOfRange;
      continue;
    }
    const int o = int(g / L);
    const int64_t q = g % L;
    int4 d = make_int4(o, int(p.left(o) + q), -1, -1);
    if (q < p.right_rows && (p.wrap || o > 0)) {
      const int k = (o + p.sp - 1) % p.sp;
      d.z = k;
      d.w = int(p.left(k) + L + q);
    } else if (q >= L - p.left_rows && (p.wrap || o < p.sp - 1)) {
      d.z = (o + 1) % p.sp;
      d.w = int(q - (L - p.left_rows));
    }
    dest[i] = d;
    flags[int64_t(d.x) * L + i] = 1;
    if (d.z >= 0) flags[int64_t(d.z) * L + i] = 1;
  }
}

// Entry e = at[rank * L + i] of each destination of position i.
__global__ void route_fill_kernel(int32_t* send, int32_t* back, int32_t* bad, const int4* dest,
                                  const int32_t* at, int64_t L, int64_t cap) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < L;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int4 d = dest[i];
    back[L + i] = -1;
    for (int h = 0; h < 2; ++h) {
      const int k = h == 0 ? d.x : d.z, slot = h == 0 ? d.y : d.w;
      if (k < 0) continue;
      const int64_t e = at[int64_t(k) * L + i];
      if (e >= cap) {
        *bad = kRouteOutOfRange;
        continue;
      }
      send[e] = int32_t(i);
      send[cap + e] = slot;
      send[2 * cap + e] = h == 0 ? int32_t(i) : -1;
      back[h * L + i] = int32_t(e);
    }
  }
}

__global__ void invert_kernel(int32_t* dst, int32_t* bad, const int32_t* src, int64_t n) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int32_t s = src[k];
    if (s < 0 || s >= n || atomicExch(&dst[s], int32_t(k)) != -1) *bad = kNotPermutation;
  }
}

}  // namespace
}  // namespace cuda

void CudaOps::bucket_histogram(int32_t* hist, const int32_t* buckets, int64_t L, int n_hashes,
                               int n_buckets) {
  check_bucket_histogram(L, n_hashes, n_buckets);
  if (n_hashes == 0) return;
  CUDA_CHECK(cudaMemsetAsync(hist, 0, sizeof(int32_t) * size_t(n_hashes) * size_t(n_buckets),
                             stream_));
  const int64_t n = int64_t(n_hashes) * L;
  if (n == 0) return;
  cuda::histogram_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(
      hist, device_error_dev_, buckets, L, n, n_buckets);
  CUDA_CHECK_LAUNCH("histogram_kernel");
}

void CudaOps::sort_route(int32_t* send, int32_t* back, const int32_t* order,
                         const int32_t* buckets, const int32_t* delta, const SortRouteParams& p) {
  check_sort_route(p);
  const int64_t L = p.L, nf = L * p.sp;
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, static_cast<const int32_t*>(nullptr),
                                           static_cast<int32_t*>(nullptr), nf, stream_));
  cuda::Carve carve;
  const size_t off_dest = carve.reserve(sizeof(int4) * size_t(L));
  const size_t off_flags = carve.reserve(sizeof(int32_t) * size_t(nf));
  const size_t off_at = carve.reserve(sizeof(int32_t) * size_t(nf));
  const size_t off_temp = carve.reserve(temp_bytes);
  void* base = ws_.get(carve.total());
  int4* dest = cuda::Carve::at<int4>(base, off_dest);
  int32_t* flags = cuda::Carve::at<int32_t>(base, off_flags);
  int32_t* at = cuda::Carve::at<int32_t>(base, off_at);
  void* temp = cuda::Carve::at<char>(base, off_temp);

  CUDA_CHECK(cudaMemsetAsync(flags, 0, sizeof(int32_t) * size_t(nf), stream_));
  cuda::route_dest_kernel<<<cuda::grid_for(L), cuda::kThreads, 0, stream_>>>(
      dest, flags, device_error_dev_, order, buckets, delta, p);
  CUDA_CHECK_LAUNCH("route_dest_kernel");
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, temp_bytes, flags, at, nf, stream_));
  cuda::route_fill_kernel<<<cuda::grid_for(L), cuda::kThreads, 0, stream_>>>(
      send, back, device_error_dev_, dest, at, L, p.capacity);
  CUDA_CHECK_LAUNCH("route_fill_kernel");
}

void CudaOps::invert_index(int32_t* dst, const int32_t* src, int64_t n) {
  check_invert_index(n);
  if (n == 0) return;
  CUDA_CHECK(cudaMemsetAsync(dst, 0xff, sizeof(int32_t) * size_t(n), stream_));
  cuda::invert_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(dst, device_error_dev_,
                                                                          src, n);
  CUDA_CHECK_LAUNCH("invert_kernel");
}

}  // namespace reformer
