// HuggingFace interop: our configuration and parameters as a transformers
// `ReformerModelWithLMHead` folder (config.json + model.safetensors), and back.
//
// What maps and what is refused (docs/hf-interop.md has the reasoning):
//  - LSH layers map to HF "lsh" layers with the same weights: HF also
//    normalises the shared query/key to unit length for the keys and does not
//    scale the logits, so no weight is rescaled and the round trip is exact.
//  - A model whose every layer runs exact attention at model.max_len (kind
//    `full`, or any kind when max_len <= attention.bucket_size) maps to HF
//    "lsh" layers whose chunk holds the whole sequence: HF then runs standard
//    attention with the same shared-QK scoring and masks.
//  - Otherwise `full` and `local` layers are refused (ConfigError naming
//    attention.kinds): HF's local attention scores separate query and key
//    projections, without key normalisation or self mask, which our kinds
//    cannot express; importing an HF "local" layer is refused likewise.
//  - GELU is the tanh approximation on both sides ("gelu_new"); HF's "gelu"
//    (exact erf) is refused on import.
// Parameter tensors keep their values bit for bit; torch Linear weights are
// stored [out, in], ours [in, out], so matrices are transposed.
#pragma once

#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/safetensors.h"

namespace reformer {

// The config.json text for a validated `cfg`. Throws ConfigError naming the
// key HF cannot express (attention.kinds, attention.causal, ...).
std::string hf_config_json(const Config& cfg);

// How export carries the head bias b [V]. transformers 4.x adds lm_head.bias
// to the logits; 5.x adds none (its lm_head.decoder has no bias and
// lm_head.bias is loaded but unused). Export therefore folds b into the final
// LayerNorm's bias beta [2D]: with W [V, 2D] the head weight (HF's
// lm_head.decoder.weight), it writes beta' = fl32(beta + delta), delta the
// minimum-norm solution of W delta = b (delta = W^T (W W^T)^-1 b, Cholesky of
// the V x V Gram matrix in double plus one refinement step), and lm_head.bias
// = 0; logits W (LN(x) g + beta') = W (LN(x) g + beta) + b then hold whether
// or not transformers adds the (zero) bias.
//
// Accepted when, with u = 2^-24 (fp32 unit roundoff):
//   residual = max_v |sum_j W_vj (beta'_j - beta_j) - b_v|   (double, over the
//              fp32 values written)
//            <= 2^-12 |b|_inf + 2 u max_v sum_j |W_vj| |beta'_j|
// (the second term bounds, with a factor 2, what rounding beta + delta to fp32
// moves a logit; the first leaves the solve 1/4096 of the bias), and
//   max_v sum_j |W_vj| |delta_j| <= 2^12 |b|_inf
// (so an fp32 forward pass loses at most u 2^12 |b|_inf = 2^-12 |b|_inf to
// the larger LayerNorm output). Otherwise (V > 2D, a singular or
// ill-conditioned Gram matrix) nothing is folded: beta is kept and b is
// written as lm_head.bias, which transformers versions that ignore it drop
// from the logits. An all-zero b needs no fold and is written as it is.
struct HeadBiasFold {
  std::vector<float> ln_bias;    // [2D] the final LayerNorm bias to write
  std::vector<float> head_bias;  // [V] lm_head.bias to write: zeros when folded, else b
  bool folded = false;           // b was nonzero and is folded into ln_bias
  double residual = 0;           // as above; 0 when nothing was folded
  double tolerance = 0;          // the residual accepted
  std::string not_folded;        // b nonzero and kept in lm_head.bias: why
};

// The fold for our head.weight [2D, V] (row-major, ours: [in, out]), head.bias
// [V] and ln_out.bias [2D]. Throws ShapeError when the sizes disagree.
HeadBiasFold fold_head_bias(const std::vector<float>& head_weight, const std::vector<float>& head_bias,
                            const std::vector<float>& ln_bias);

// The HF tensors (names, shapes, values) of `params`, laid out by
// model_param_table(cfg), with the head bias folded (fold_head_bias; the
// outcome in `*fold` when given). Throws ConfigError as hf_config_json.
std::vector<SafeTensor> hf_tensors(const Config& cfg, const std::vector<float>& params,
                                   HeadBiasFold* fold = nullptr);

// Our configuration for an HF config.json text (absent keys take HF's
// defaults), then `overrides` ("a.b=value") applied and validated. `source`
// names the file in messages. Throws ConfigError naming the HF key (e.g.
// "config.json: attn_layers: ...") for what our model cannot run, or the
// overridden key.
Config config_from_hf(const std::string& json, const std::string& source,
                      const std::vector<std::string>& overrides = {});

// Our flat parameters (model_param_table(cfg) layout) from HF tensors; the
// head bias from lm_head.bias or lm_head.decoder.bias (either name; a folder
// our export folded holds zeros there and the bias inside the final
// LayerNorm's: the same function as the exported model, not the same
// parameters). Throws CheckpointError naming `source` and the tensor for a
// missing, extra or mis-shaped tensor, or lm_head.bias and
// lm_head.decoder.bias that differ.
std::vector<float> params_from_hf(const Config& cfg, const std::vector<SafeTensor>& tensors,
                                  const std::string& source);

// `reformer export --format hf`: reads the checkpoint (its stored config),
// creates `dir` if needed and writes dir/config.json and dir/model.safetensors
// (each atomically), the head bias folded as hf_tensors does; a bias that
// cannot be folded is written as lm_head.bias and log_info says why and that
// transformers versions which ignore it give other logits. Throws
// CheckpointError, ConfigError.
void export_hf(const std::string& checkpoint, const std::string& dir);

// `reformer import`: reads dir/config.json and dir/model.safetensors and
// writes a checkpoint at `out` (step 0, no tokens seen, the fresh optimizer
// state of the configured optimizer, dp = sp = 1). Throws CheckpointError,
// ConfigError.
void import_hf(const std::string& dir, const std::string& out,
               const std::vector<std::string>& overrides = {});

}  // namespace reformer
