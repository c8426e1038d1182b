// The model's floating-point work per trained token, the numerator of its
// model FLOP/s and MFU (`reformer bench`, the training progress line).
//
// Counted: the matrix products (attention projections, feed-forward, output
// head) and the attention products (kernels/common/op_flops.h). A training
// step runs each layer's products four times (forward, the reversible
// backward's recompute, and the backward's two products per matrix), the
// attention forward twice and its backward once, and the head's product
// three times. A kept layer (model.kept_layers, framework/memory_plan.h)
// runs its products three times, and where its attention state is kept
// (keeps_attention) its attention forward once, as does a kept or stashed
// layer (model.stashed_layers) whose attention outputs are stashed. Not counted: elementwise
// passes, normalisation, hashing, sorting, the optimizer.
#pragma once

#include "framework/config.h"

namespace reformer {

struct ModelFlops {
  double per_token = 0;            // one training step's FLOPs / tokens
  double attention_per_token = 0;  // the attention products' share of per_token
};

// For cfg.model.max_len (the whole sequence, whatever the layout), on
// sequence-parallel groups of `sp` ranks (which decides whether kept
// layers keep their attention state; model.kept_layers and model.stashed_layers
// as resolved).
ModelFlops train_flops(const Config& cfg, int sp = 1);

// The FLOPs per token a sequence-parallel group of sp ranks executes, at
// least train_flops' per_token. In pairs mode (sp = n_heads * g, g > 1;
// docs/sequence-parallel.md) each head's qk, v projection runs g times and
// local and full attention layers run on each of a head's g ranks; heads
// mode computes nothing twice. MFU counts train_flops, so the difference
// shows as lower MFU.
double sp_executed_flops_per_token(const Config& cfg, int sp);

}  // namespace reformer
