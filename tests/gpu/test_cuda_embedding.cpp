// The CUDA token-embedding backward sums dwte over the positions sorted by
// token, window by window (kernels/common/embedding_sums.h). Over millions
// of positions, with one token at a third of them (its slots span thousands
// of windows): the sums equal to the host's (every dout value a multiple of
// 2^-10 below 1, every partial sum below 2^13: fp32 adds them exactly, in
// any order, so a row missed or added twice shows) and a request within
// the memory plan's bound (dwte_workspace_bytes: the workspace reserved at
// that size does not grow).
// The small cases against the CPU op, each run twice for the same bits, are
// in test_conformance_dense.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "kernels/common/embedding_sums.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"

using namespace reformer;

namespace {

struct DwteRun {
  std::vector<float> dwte;
  int64_t peak_before = 0, peak_after = 0;
};

DwteRun dwte_of(const std::vector<int32_t>& tokens, const std::vector<float>& dout, int V, int D) {
  auto ops = make_cuda_ops();
  const int64_t L = int64_t(tokens.size());
  Buffer<float> d(*ops, L * D), w(*ops, int64_t(V) * D);
  IntBuffer<float> t(*ops, L);
  ops->from_host(d.data(), dout.data(), L * D);
  ops->from_host_i32(t.data(), tokens.data(), L);
  ops->fill(w.data(), 0.0f, int64_t(V) * D);
  ops->reserve_workspace(dwte_workspace_bytes(L, D));
  DwteRun r;
  r.peak_before = ops->peak_bytes();
  ops->embedding_backward(w.data(), nullptr, nullptr, d.data(), t.data(), L, D, 0, 1, 0);
  r.dwte.resize(size_t(V) * D);
  ops->to_host(r.dwte.data(), w.data(), int64_t(V) * D);
  r.peak_after = ops->peak_bytes();
  return r;
}

TEST(CudaEmbedding, DwteOverMillionsOfPositionsIsExactAndWithinThePlan) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const int64_t L : {int64_t(100), int64_t(50000), int64_t(3) << 20}) {
    const int V = 1000, D = 8;
    std::vector<int32_t> tokens(static_cast<size_t>(L));
    std::vector<float> dout(static_cast<size_t>(L * D));
    uint32_t s = 12345;
    for (int64_t i = 0; i < L; ++i) {
      s = s * 1664525u + 1013904223u;
      tokens[size_t(i)] = i % 3 == 0 ? 7 : int32_t((s >> 8) % uint32_t(V));
      for (int c = 0; c < D; ++c) {
        s = s * 1664525u + 1013904223u;
        dout[size_t(i * D + c)] = float(int32_t(s >> 8) % 2001 - 1000) / 1024.0f;
      }
    }
    std::vector<double> want(size_t(V) * D, 0.0);
    for (int64_t i = 0; i < L; ++i)
      for (int c = 0; c < D; ++c) want[size_t(tokens[size_t(i)]) * D + c] += dout[size_t(i * D + c)];
    const DwteRun a = dwte_of(tokens, dout, V, D);
    int64_t bad = 0;
    for (size_t k = 0; k < want.size(); ++k) bad += double(a.dwte[k]) != want[k] ? 1 : 0;
    EXPECT_EQ(bad, 0) << "L " << L << ": sums other than the exact ones";
    EXPECT_EQ(a.peak_after, a.peak_before)
        << "L " << L << ": the request exceeded dwte_workspace_bytes";
  }
}

}  // namespace
