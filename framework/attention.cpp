#include "framework/attention.h"

#include "kernels/errors.h"

namespace reformer {

AttentionParams attention_params(const Config& cfg, const AttentionShape& shape) {
  const AttentionConfig& ac = cfg.attention;
  AttentionParams ap;
  ap.L = shape.L;
  ap.dh = shape.dh;
  ap.ld = shape.ld;
  ap.chunk = ac.bucket_size;
  ap.chunks_before = ac.chunks_before;
  ap.chunks_after = ac.chunks_after;
  ap.causal = ac.causal;
  ap.precision = ac.precision;
  ap.out_bf16 = shape.out_bf16;
  ap.grad_bf16 = shape.grad_bf16;
  ap.ld_grad = shape.grad_bf16 ? 2 * shape.ld : 0;
  ap.in_bf16 = shape.in_bf16;
  return ap;
}

bool uses_lsh(const Config& cfg, int layer, int64_t L) {
  return L > cfg.attention.bucket_size && cfg.attention_kind(layer) == AttentionKind::lsh;
}

template <class T>
std::unique_ptr<AttentionKindImpl<T>> make_attention(const Config& cfg, const AttentionShape& shape,
                                                     Ops<T>& ops, AttentionScratch<T>& scratch) {
  if (shape.L <= cfg.attention.bucket_size) return make_full_attention(cfg, shape, ops, scratch);
  switch (cfg.attention_kind(shape.layer)) {
    case AttentionKind::lsh: return make_lsh_attention(cfg, shape, ops, scratch);
    case AttentionKind::local: return make_local_attention(cfg, shape, ops, scratch);
    case AttentionKind::full: return make_full_attention(cfg, shape, ops, scratch);
  }
  throw ConfigError("attention kind of layer " + std::to_string(shape.layer) + " is not known");
}

template std::unique_ptr<AttentionKindImpl<float>> make_attention(const Config&,
                                                                  const AttentionShape&,
                                                                  Ops<float>&,
                                                                  AttentionScratch<float>&);
template std::unique_ptr<AttentionKindImpl<double>> make_attention(const Config&,
                                                                   const AttentionShape&,
                                                                   Ops<double>&,
                                                                   AttentionScratch<double>&);

}  // namespace reformer
