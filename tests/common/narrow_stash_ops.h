// A host Ops<float> that stashes as the CUDA backend does: bf16 values
// (rounded to nearest even), two in each float element (stash_elems(n) =
// (n + 1) / 2), element k's value in bytes 2k .. 2k + 1. Every other op is
// CpuOps<float>'s. So the CPU suites run the code that moves stashes
// narrower than T (the sequence-parallel exchanges' bf16 wire,
// framework/sequence_parallel.h), which plain CpuOps never takes.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cpu/cpu_ops.h"
#include "tests/common/wire_checks.h"

namespace reformer::test {

// Every op forwarded to a CpuOps<float>, for a test backend to override some.
class CpuForwardingOps : public Ops<float> {
 public:
  using T = float;  // the op list's element type
  const char* name() const override { return cpu_.name(); }
  int64_t peak_bytes() const override { return cpu_.peak_bytes(); }
  bool supports(OpId id) const override { return cpu_.supports(id); }
  FfnStateCols ffn_state_cols(int C, int F, Activation act) const override {
    return cpu_.ffn_state_cols(C, F, act);
  }
  int64_t layernorm_ffn_ln_cols(int C, int F) const override {
    return cpu_.layernorm_ffn_ln_cols(C, F);
  }
  int64_t stash_elems(int64_t n) const override { return cpu_.stash_elems(n); }
#define REFORMER_CPU_FORWARD(ret, name, params, args) \
  ret name params override { return cpu_.name args; }
  REFORMER_OPS(REFORMER_CPU_FORWARD)
#undef REFORMER_CPU_FORWARD

 private:
  CpuOps<float> cpu_;
};

class NarrowStashOps final : public CpuForwardingOps {
 public:
  const char* name() const override { return "cpu (bf16 stash)"; }
  int64_t stash_elems(int64_t n) const override { return (n + 1) / 2; }
  void stash(float* dst, const float* src, int64_t n) override { stash_2d(dst, src, n, 1, n); }
  void unstash(float* dst, const float* src, int64_t n) override {
    unstash_2d(dst, n, src, 1, n);
  }
  void stash_2d(float* dst, const float* src, int64_t ld_src, int64_t rows,
                int64_t cols) override {
    auto* d = reinterpret_cast<unsigned char*>(dst);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const uint16_t h = bf16_bits(src[r * ld_src + c]);
        std::memcpy(d + 2 * (r * cols + c), &h, sizeof h);
      }
  }
  void unstash_2d(float* dst, int64_t ld_dst, const float* src, int64_t rows,
                  int64_t cols) override {
    const auto* s = reinterpret_cast<const unsigned char*>(src);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        uint16_t h;
        std::memcpy(&h, s + 2 * (r * cols + c), sizeof h);
        dst[r * ld_dst + c] = bf16_float(h);
      }
  }
};

}  // namespace reformer::test
