// LSH hashing by random rotations and the per-round sort (CPU reference).
//
// Contracts (kernels/ops.h):
//  - R [n_hashes, dh, cols], cols = rotation_cols(n_buckets, factor0)
//    (kernels/common/params.h): element i is lsh_round(rng_normal(key, i))
//    (bf16-valued) with key = make_key(seed, RngPurpose::rotations, step,
//    layer, head); round r's block starts at r * dh * cols.
//  - buckets [n_hashes, L]: with y = x_i R_r, x_i = lsh_round of each of
//    qk[i * ld .. i * ld + dh) and R_r = lsh_round of each of R's entries
//    (through fp32; a no-op on lsh_rotations' R; params.h says why),
//    argmax over concat(y, -y) (factor0 == 0), or b0 + factor0 * b1 with b0,
//    b1 the argmaxes over concat(y0, -y0) and concat(y1, -y1) for y's first
//    factor0/2 columns y0 and the rest y1; lowest index on ties.
//  - perm [n_hashes, L]: the positions of round r stably sorted by
//    (bucket, position); every bucket id must lie in [0, n_buckets).
#include "kernels/cpu/lsh.h"

#include <string>
#include <vector>

#include "kernels/errors.h"
#include "kernels/common/lsh_checks.h"
#include "kernels/common/params.h"
#include "kernels/common/philox.h"

namespace reformer::cpu {

namespace {

// Below this many operations a call runs on one thread: thread start-up would
// cost more than it saves. Results do not depend on it.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// argmax over concat(y[0, n), -y[0, n)); strict '>' keeps the lowest index on ties.
template <class T>
int signed_argmax(const T* y, int n) {
  int best = 0;
  T best_val = y[0];
  for (int k = 1; k < n; ++k)
    if (y[k] > best_val) { best_val = y[k]; best = k; }
  for (int k = 0; k < n; ++k)
    if (-y[k] > best_val) { best_val = -y[k]; best = n + k; }
  return best;
}

}  // namespace

template <class T>
void lsh_rotations(T* R, uint64_t seed, uint64_t step, int layer, int head, int n_hashes, int dh,
                   int n_buckets, int factor0) {
  check_lsh_factor(n_buckets, factor0);
  const RngKey key = make_key(seed, RngPurpose::rotations, step, uint64_t(layer), uint64_t(head));
  const int64_t n = int64_t(n_hashes) * dh * rotation_cols(n_buckets, factor0);
  const bool par = n * 64 >= kMinParallelWork;  // a normal costs ~64 multiply-adds
#pragma omp parallel for schedule(static) if (par)
  for (int64_t i = 0; i < n; ++i) R[i] = T(lsh_round(rng_normal(key, uint64_t(i))));
}

template <class T>
void lsh_hash(int32_t* buckets, const T* qk, int64_t ld, const T* R, int64_t L, int dh,
              int n_hashes, int n_buckets, int factor0, int heads) {
  check_lsh_factor(n_buckets, factor0);
  if (heads > 1) {  // head by head (kernels/ops.h)
    const int64_t nR = int64_t(n_hashes) * dh * rotation_cols(n_buckets, factor0);
    for (int j = 0; j < heads; ++j)
      lsh_hash(buckets + int64_t(j) * n_hashes * L, qk + int64_t(j) * dh, ld, R + j * nR, L, dh,
               n_hashes, n_buckets, factor0, 1);
    return;
  }
  const int cols = rotation_cols(n_buckets, factor0);
  const int h0 = factor0 == 0 ? cols : factor0 / 2;  // columns of the first block
  const bool par = L * n_hashes * dh * cols >= kMinParallelWork;
  std::vector<T> Rb(size_t(n_hashes) * size_t(dh) * size_t(cols));  // R as hashed
  for (size_t e = 0; e < Rb.size(); ++e) Rb[e] = T(lsh_round(float(R[e])));
#pragma omp parallel if (par)
  {
    std::vector<T> y(size_t(cols), T(0)), x(static_cast<size_t>(dh));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < L; ++i) {
      for (int d = 0; d < dh; ++d) x[size_t(d)] = T(lsh_round(float(qk[i * ld + d])));
      for (int r = 0; r < n_hashes; ++r) {
        const T* Rr = Rb.data() + int64_t(r) * dh * cols;
        for (int k = 0; k < cols; ++k) y[size_t(k)] = T(0);
        for (int d = 0; d < dh; ++d) {
          const T xd = x[size_t(d)];
          const T* row = Rr + int64_t(d) * cols;
          for (int k = 0; k < cols; ++k) y[size_t(k)] += xd * row[k];
        }
        int b = signed_argmax(y.data(), h0);
        if (factor0 != 0) b += factor0 * signed_argmax(y.data() + h0, cols - h0);
        buckets[int64_t(r) * L + i] = int32_t(b);
      }
    }
  }
}

void lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes, int n_buckets) {
  check_lsh_buckets(n_buckets);
  for (int64_t k = 0; k < int64_t(n_hashes) * L; ++k)
    if (buckets[k] < 0 || buckets[k] >= n_buckets)
      throw ShapeError("lsh_sort: bucket id " + std::to_string(buckets[k]) + " outside [0, " +
                       std::to_string(n_buckets) + ")");
  const bool par = int64_t(n_hashes) * (L + n_buckets) >= kMinParallelWork;
  // Counting sort per round: visiting positions in increasing order makes it
  // stable, so ties in bucket are ordered by position.
#pragma omp parallel for schedule(static) if (par)
  for (int r = 0; r < n_hashes; ++r) {
    const int32_t* b = buckets + int64_t(r) * L;
    int32_t* out = perm + int64_t(r) * L;
    std::vector<int64_t> start(size_t(n_buckets) + 1, 0);
    for (int64_t i = 0; i < L; ++i) ++start[size_t(b[i]) + 1];
    for (int k = 0; k < n_buckets; ++k) start[size_t(k) + 1] += start[size_t(k)];
    for (int64_t i = 0; i < L; ++i) out[start[size_t(b[i])]++] = int32_t(i);
  }
}

void lsh_pack_buckets(int32_t* packed, const int32_t* buckets, int64_t n, int n_buckets) {
  check_lsh_pack(n_buckets, n);
  for (int64_t k = 0; k < n; ++k)
    if (buckets[k] < 0 || buckets[k] >= n_buckets)
      throw ShapeError("lsh_pack_buckets: bucket id " + std::to_string(buckets[k]) +
                       " outside [0, " + std::to_string(n_buckets) + ")");
  for (int64_t k = 0; k < n; k += 2) {
    const uint32_t lo = uint32_t(buckets[k]), hi = k + 1 < n ? uint32_t(buckets[k + 1]) : 0u;
    packed[k / 2] = int32_t(lo | (hi << 16));
  }
}

void lsh_unpack_buckets(int32_t* buckets, const int32_t* packed, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    buckets[k] = int32_t((uint32_t(packed[k / 2]) >> (16 * (k % 2))) & 0xffffu);
}

void lsh_decode_keys(int32_t* keys, int32_t* sets, int32_t* history, const int32_t* buckets,
                     int64_t bucket_stride, int units, int64_t capacity, int64_t pos) {
  check_lsh_decode(units, capacity, pos);
  for (int u = 0; u < units; ++u) {
    int32_t* h = history + int64_t(u) * capacity;
    int32_t* k = keys + int64_t(u) * capacity;
    const int32_t b = buckets[u * bucket_stride];
    h[pos] = b;
    int32_t n = 0;
    for (int64_t j = 0; j <= pos; ++j)
      if (h[j] == b) k[n++] = int32_t(j);
    sets[2 * u] = int32_t(int64_t(u) * capacity);
    sets[2 * u + 1] = n;
  }
}

template void lsh_rotations<float>(float*, uint64_t, uint64_t, int, int, int, int, int, int);
template void lsh_rotations<double>(double*, uint64_t, uint64_t, int, int, int, int, int, int);
template void lsh_hash<float>(int32_t*, const float*, int64_t, const float*, int64_t, int, int,
                              int, int, int);
template void lsh_hash<double>(int32_t*, const double*, int64_t, const double*, int64_t, int, int,
                               int, int, int);

}  // namespace reformer::cpu
