#include "framework/flops.h"

#include "framework/attention.h"
#include "framework/memory_plan.h"
#include "kernels/common/op_flops.h"

namespace reformer {

namespace {

// A training step's attention FLOPs of layer l over the whole sequence, the
// forward run `forwards` times.
double layer_attention_flops(const Config& cfg, int l, int forwards = 2) {
  const ModelConfig& m = cfg.model;
  const AttentionConfig& ac = cfg.attention;
  const int64_t L = m.max_len;
  const int dh = cfg.head_dim();
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
  return forwards * attention_forward_flops(pairs, dh) + attention_backward_flops(pairs, dh);
}

}  // namespace

ModelFlops train_flops(const Config& cfg, int sp) {
  const ModelConfig& m = cfg.model;
  const int64_t L = m.max_len;
  const int D = m.d_model, F = m.d_ff, V = m.vocab_size, dh = cfg.head_dim();
  const int HD = m.n_heads * dh;
  const int first_kept = m.n_layers - kept_layer_count(cfg);
  const bool attention_kept = keeps_attention(cfg, sp);
  const bool outputs_kept = keeps_attention_outputs(cfg, sp);
  const int first_stashed = first_kept - stashed_layer_count(cfg, sp);
  double total = 0, attention = 0;
  for (int l = 0; l < m.n_layers; ++l) {
    // A kept layer's backward reruns no product but, where its attention
    // state is not kept, the qk, v projections and (where its attention
    // outputs are not kept either) the attention forward; a stashed layer's
    // reruns every product but not the attention forward.
    const bool kept = l >= first_kept, reproject = !kept || !attention_kept,
               stashed = l >= first_stashed && !kept,
               reattend = reproject && !(kept && outputs_kept) && !stashed;
    total += (reproject ? 4 : 3) * 2 * matmul_forward_flops(L, D, HD);  // qk, v
    total += (kept ? 3 : 4) * (matmul_forward_flops(L, HD, D) +        // output projection
                               matmul_forward_flops(L, D, F) + matmul_forward_flops(L, F, D));
    const double a = layer_attention_flops(cfg, l, reattend ? 2 : 1);
    attention += a;
    total += a;
  }
  total += 3 * matmul_forward_flops(L, 2 * D, V);
  return ModelFlops{total / double(L), attention / double(L)};
}

double sp_executed_flops_per_token(const Config& cfg, int sp) {
  const ModelConfig& m = cfg.model;
  const double model = train_flops(cfg, sp).per_token;
  if (sp <= m.n_heads) return model;
  const int g = sp / m.n_heads;  // pairs mode: ranks per head
  const int64_t L = m.max_len;
  const int HD = m.n_heads * cfg.head_dim();
  double extra = 0;
  for (int l = 0; l < m.n_layers; ++l) {
    extra += 4 * 2 * matmul_forward_flops(L, m.d_model, HD);  // the qk, v columns, g times
    if (!uses_lsh(cfg, l, L)) extra += layer_attention_flops(cfg, l);  // replicas
  }
  return model + double(g - 1) * extra / double(L);
}

}  // namespace reformer
