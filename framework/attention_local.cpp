// Local attention: chunks of consecutive positions, each attending to itself
// and its look-back (no wrap), in one round.
#include "framework/attention.h"

namespace reformer {

namespace {

template <class T>
class LocalAttention final : public AttentionKindImpl<T> {
 public:
  LocalAttention(const Config& cfg, const AttentionShape& shape, Ops<T>& ops,
                 AttentionScratch<T>& scratch)
      : ops_(ops), s_(scratch), shape_(shape) {
    ap_ = attention_params(cfg, shape);
    ap_.n_rounds = 1;
    ap_.wrap = false;
  }
  const char* name() const override { return "local"; }

  void forward(int h, const T* qk, const T* v, T* ao, uint64_t, bool) override {
    AttentionParams ap = ap_;
    ap.kept = s_.kept_of(h);
    ops_.chunked_attention_forward(ao, nullptr, s_.lse_of(h), qk, v, s_.identity.data(), ap);
  }

  void backward(int h, const T* qk, const T* v, T* ao, const T* dao, T* dqk, T* dv,
                bool accumulate) override {
    AttentionParams ap = ap_;
    ap.accumulate = accumulate;
    ap.kept = s_.kept_of(h);
    ops_.chunked_attention_backward(dqk, dv, dao, qk, v, s_.identity.data(), ao, shape_.ld,
                                    s_.lse_of(h), ap);
  }

 private:
  Ops<T>& ops_;
  AttentionScratch<T>& s_;
  AttentionShape shape_;
  AttentionParams ap_;
};

}  // namespace

template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_local_attention(const Config& cfg,
                                                           const AttentionShape& shape,
                                                           Ops<T>& ops,
                                                           AttentionScratch<T>& scratch) {
  return std::make_unique<LocalAttention<T>>(cfg, shape, ops, scratch);
}

template std::unique_ptr<AttentionKindImpl<float>> make_local_attention(
    const Config&, const AttentionShape&, Ops<float>&, AttentionScratch<float>&);
template std::unique_ptr<AttentionKindImpl<double>> make_local_attention(
    const Config&, const AttentionShape&, Ops<double>&, AttentionScratch<double>&);

}  // namespace reformer
