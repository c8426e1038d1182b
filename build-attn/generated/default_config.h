#pragma once
inline constexpr const char* kDefaultConfigYaml = R"REFORMER_YAML(# The paper's duplication task (sequences 0 w 0 w), CPU-sized: meant to reach
# >= 95% accuracy on the second copy within a few minutes on 2 cores, with
# LSH attention and several hash rounds. Starting values; tune as needed.
model:
  vocab_size: 32
  d_model: 64
  n_heads: 4
  d_ff: 128
  n_layers: 2
  max_len: 64          # w has 31 symbols
attention:
  kinds: [lsh]
  bucket_size: 8       # 16 buckets per round
  n_hashes: 4
optimizer:
  name: adamw
  lr: 1.0e-3
  schedule: rsqrt
  warmup_steps: 100
training:
  steps: 1500
  batch_size: 8
  device: cpu
  log_every: 50
  eval_every: 250
  eval_batches: 4
data:
  kind: duplication
  dup_symbols: 32      # w uniform over 1..31
checkpoint:
  dir: checkpoints/duplication-cpu
  every: 500
)REFORMER_YAML";
