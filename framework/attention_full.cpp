// Full (exact causal) attention over the whole sequence, with the same
// scoring and masks as the chunked kinds.
#include "framework/attention.h"

namespace reformer {

namespace {

template <class T>
class FullAttention final : public AttentionKindImpl<T> {
 public:
  FullAttention(const Config& cfg, const AttentionShape& shape, Ops<T>& ops,
                AttentionScratch<T>& scratch)
      : ops_(ops), s_(scratch), ap_(attention_params(cfg, shape)) {}
  const char* name() const override { return "full"; }

  void forward(int h, const T* qk, const T* v, T* ao, uint64_t, bool) override {
    ops_.full_attention_forward(ao, s_.lse_of(h), qk, v, ap_);
  }

  void backward(int h, const T* qk, const T* v, T* ao, const T* dao, T* dqk, T* dv,
                bool accumulate) override {
    AttentionParams ap = ap_;
    ap.accumulate = accumulate;
    ops_.full_attention_backward(dqk, dv, dao, ao, qk, v, s_.lse_of(h), ap);
  }

 private:
  Ops<T>& ops_;
  AttentionScratch<T>& s_;
  AttentionParams ap_;
};

}  // namespace

template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_full_attention(const Config& cfg,
                                                          const AttentionShape& shape, Ops<T>& ops,
                                                          AttentionScratch<T>& scratch) {
  return std::make_unique<FullAttention<T>>(cfg, shape, ops, scratch);
}

template std::unique_ptr<AttentionKindImpl<float>> make_full_attention(
    const Config&, const AttentionShape&, Ops<float>&, AttentionScratch<float>&);
template std::unique_ptr<AttentionKindImpl<double>> make_full_attention(
    const Config&, const AttentionShape&, Ops<double>&, AttentionScratch<double>&);

}  // namespace reformer
