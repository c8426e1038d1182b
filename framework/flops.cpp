#include "framework/flops.h"

#include "framework/attention.h"
#include "kernels/common/op_flops.h"

namespace reformer {

ModelFlops train_flops(const Config& cfg) {
  const ModelConfig& m = cfg.model;
  const AttentionConfig& ac = cfg.attention;
  const int64_t L = m.max_len;
  const int D = m.d_model, F = m.d_ff, V = m.vocab_size, dh = cfg.head_dim();
  const int HD = m.n_heads * dh;
  double total = 0, attention = 0;
  for (int l = 0; l < m.n_layers; ++l) {
    const double products = 2 * matmul_forward_flops(L, D, HD) +  // qk, v
                            matmul_forward_flops(L, HD, D) +      // output projection
                            matmul_forward_flops(L, D, F) + matmul_forward_flops(L, F, D);
    total += 4 * products;
    // The kind make_attention builds for this layer, with its rounds and wrap.
    AttentionParams ap = attention_params(cfg, AttentionShape{l, L, m.n_heads, 0, dh, dh});
    const AttentionKind kind = cfg.attention_kind(l);
    double pairs = 0;
    if (L <= ac.bucket_size || kind == AttentionKind::full) {
      pairs = full_attention_pairs(ap);
    } else {
      ap.n_rounds = uses_lsh(cfg, l, L) ? ac.n_hashes : 1;
      ap.wrap = kind == AttentionKind::lsh;
      pairs = chunked_attention_pairs(ap);
    }
    pairs *= m.n_heads;
    const double a = 2 * attention_forward_flops(pairs, dh) + attention_backward_flops(pairs, dh);
    attention += a;
    total += a;
  }
  total += 3 * matmul_forward_flops(L, 2 * D, V);
  return ModelFlops{total / double(L), attention / double(L)};
}

}  // namespace reformer
