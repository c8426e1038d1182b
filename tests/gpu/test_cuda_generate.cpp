// Decoding (framework/generator.h) on the CUDA ops against the same decode
// on CpuOps<float>: same parameters, same tokens. The CUDA GEMMs round their
// inputs to bf16, so logits are compared within 2e-2 of their largest
// magnitude (as tests/gpu/test_cuda_model.cpp compares the forward pass).
// Full and local layers only for the elementwise check: LSH hashes of
// bf16-rounded keys may flip near-ties and change a query's key set; the LSH
// decode is checked for agreement of the greedy tokens on most positions
// (a random model's top logits are close, so bf16 rounding flips some).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/generator.h"
#include "framework/model.h"
#include "kernels/common/philox.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"

using namespace reformer;

namespace {

Config decode_config(const std::string& kinds) {
  const std::string yaml =
      "model: {vocab_size: 256, d_model: 64, n_heads: 4, d_ff: 128, n_layers: 3, max_len: 128,\n"
      "        init_std: 0.05, axial_init_std: 0.05}\n"
      "attention: {kinds: " + kinds + ", bucket_size: 16, n_hashes: 2}\n"
      "training: {seed: 5}\n";
  return parse_config(yaml, "test_cuda_generate");
}

// Feeds the same tokens on both devices; returns the worst logit difference
// relative to the largest logit, and the share of positions whose argmax agrees.
void compare(const Config& cfg, double* worst_rel, double* argmax_agree) {
  std::unique_ptr<Ops<float>> gpu = make_cuda_ops();
  CpuOps<float> cpu;
  ReformerModel<float> mg(cfg, *gpu), mc(cfg, cpu);
  mg.init_params(cfg.training.seed);
  mc.init_params(cfg.training.seed);
  const int64_t L = cfg.model.max_len;
  Generator<float> gg(cfg, *gpu, mg.params(), L, 3), gc(cfg, cpu, mc.params(), L, 3);
  const RngKey key = make_key(8, RngPurpose::test, 2);
  double worst = 0, scale = 0;
  int64_t agree = 0;
  for (int64_t t = 0; t < L; ++t) {
    const int32_t token = int32_t(rng_u32(key, uint64_t(t)) % 256u);
    const std::vector<float> a = gg.feed(token);
    const std::vector<float>& b = gc.feed(token);
    for (size_t v = 0; v < b.size(); ++v) {
      worst = std::max(worst, double(std::abs(a[v] - b[v])));
      scale = std::max(scale, double(std::abs(b[v])));
    }
    agree += std::max_element(a.begin(), a.end()) - a.begin() ==
             std::max_element(b.begin(), b.end()) - b.begin();
  }
  *worst_rel = worst / scale;
  *argmax_agree = double(agree) / double(L);
}

TEST(CudaGenerate, FullAndLocalLogitsMatchCpu) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  double worst = 0, agree = 0;
  compare(decode_config("[full, local]"), &worst, &agree);
  EXPECT_LE(worst, 2e-2);
}

TEST(CudaGenerate, LshGreedyTokensMostlyMatchCpu) {
  if (reformer::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  double worst = 0, agree = 0;
  compare(decode_config("[lsh, full, lsh]"), &worst, &agree);
  EXPECT_GE(agree, 0.75);  // near-tie flips of a bucket or of a random model's top logit
}

}  // namespace
