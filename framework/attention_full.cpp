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
      : shape_(shape), ops_(ops), s_(scratch), ap_(attention_params(cfg, shape)) {}
  const char* name() const override { return "full"; }

  void forward(const T* qk, const T* v, T* ao, uint64_t, bool) override {
    for (int h = 0; h < shape_.heads; ++h) {
      const int64_t c = int64_t(h) * shape_.dh;
      ops_.full_attention_forward(ao + c, s_.lse_of(h, shape_), qk + c, v + c, ap_);
    }
  }

  void backward(const T* qk, const T* v, const T* ao, const T* dao, T* dqk, T* dv) override {
    for (int h = 0; h < shape_.heads; ++h) {
      const int64_t c = int64_t(h) * shape_.dh;
      ops_.full_attention_backward(dqk + c, dv + c, dao + c, ao + c, qk + c, v + c, s_.lse_of(h, shape_), ap_);
    }
  }

 private:
  AttentionShape shape_;
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
