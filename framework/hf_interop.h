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

// The HF tensors (names, shapes, values) of `params`, laid out by
// model_param_table(cfg). Throws ConfigError as hf_config_json.
std::vector<SafeTensor> hf_tensors(const Config& cfg, const std::vector<float>& params);

// Our configuration for an HF config.json text (absent keys take HF's
// defaults), then `overrides` ("a.b=value") applied and validated. `source`
// names the file in messages. Throws ConfigError naming the HF key (e.g.
// "config.json: attn_layers: ...") for what our model cannot run, or the
// overridden key.
Config config_from_hf(const std::string& json, const std::string& source,
                      const std::vector<std::string>& overrides = {});

// Our flat parameters (model_param_table(cfg) layout) from HF tensors. Throws
// CheckpointError naming `source` and the tensor for a missing, extra or
// mis-shaped tensor, or lm_head.bias and lm_head.decoder.bias that differ.
std::vector<float> params_from_hf(const Config& cfg, const std::vector<SafeTensor>& tensors,
                                  const std::string& source);

// `reformer export --format hf`: reads the checkpoint (its stored config),
// creates `dir` if needed and writes dir/config.json and dir/model.safetensors
// (each atomically). Throws CheckpointError, ConfigError.
void export_hf(const std::string& checkpoint, const std::string& dir);

// `reformer import`: reads dir/config.json and dir/model.safetensors and
// writes a checkpoint at `out` (step 0, no tokens seen, the fresh optimizer
// state of the configured optimizer, dp = sp = 1). Throws CheckpointError,
// ConfigError.
void import_hf(const std::string& dir, const std::string& out,
               const std::vector<std::string>& overrides = {});

}  // namespace reformer
