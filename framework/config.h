// The one validated configuration of a run.
//
// Loaded from YAML, overridden by `--set a.b=value`, validated as a whole,
// printed once at start. Every key is declared once (config.cpp's key table),
// which drives parsing, overrides, validation and printing.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "distributed/backend.h"     // CommBackend
#include "kernels/common/params.h"  // Activation

namespace reformer {

// ---------------------------------------------------------------- enumerated values
//
// Every key with a fixed set of values is an enum, parsed once when the
// configuration is read; the names are the YAML spellings.

enum class AttentionKind { lsh, full, local };
enum class OptimizerKind { adamw, adafactor };
// rsqrt: linear warm-up then rsqrt decay; cosine: warm-up then cosine to the
// floor; constant: warm-up then lr.
enum class Schedule { rsqrt, cosine, constant };
enum class DeviceKind { cpu, cuda, auto_ };  // auto_: CUDA when available, else CPU
enum class DataKind { duplication, bytes };
// How a byte file is cut: fractions (data.valid_fraction, data.test_fraction)
// or enwik8 (90M / 5M / 5M bytes).
enum class ByteSplit { fractions, enwik8 };
// Sequence parallelism: heads (each rank all positions of some heads) or
// sort (each rank a range of sorted positions).
enum class SpMode { heads, sort };
// What an LSH layer keeps from its forward for its backward: the sorted
// orders (int32 per position and round), or the bucket ids (16 bits each,
// sorted again where used); auto: bucket ids where the rounds are attended
// one call at a time (framework/memory_plan.h, lsh_saves_buckets).
enum class LshSaved { auto_, orders, buckets };
// What a kept layer keeps of its attention where every head is attended in
// one pass at sp 1 (framework/memory_plan.h, keeps_attention): its whole
// state (the pass's qk, v, ao, log-sum-exps and staged operands), or only
// its outputs and log-sum-exps (a stash, as with fewer heads per pass);
// auto: fitted with the kept layers to the device.
enum class KeptAttention { auto_, state, outputs };
// What a kept layer keeps of its feed-forward hidden layer: both the
// activation and what its gradient is taken at (the pre-activation), or
// only the pre-activation, the backward rebuilding the activation from it
// (Ops::ffn_rebuild); auto: fitted with the kept layers to the device.
enum class KeptFfn { auto_, both, pre_activation };
// Whether a kept layer keeps a part of its state or its backward rebuilds
// it; auto: fitted with the kept layers to the device. model.kept_x1: its
// input x1, rebuilt as a layer that keeps nothing does (x1 = y1 -
// Attn(x2)) from the attention outputs it keeps; model.kept_ln: its
// feed-forward LayerNorm rows and statistics, its input normalised again
// (Ops::layernorm_ffn_rows).
enum class KeptPart { auto_, kept, rebuilt };
// A step whose loss or gradient is not finite: stop the run, or skip the update.
enum class OnNonFinite { stop, skip };

// The YAML names of an enum's values, indexed by the value.
template <class E>
struct EnumNames;
template <> struct EnumNames<AttentionKind> { static constexpr std::array names{"lsh", "full", "local"}; };
template <> struct EnumNames<OptimizerKind> { static constexpr std::array names{"adamw", "adafactor"}; };
template <> struct EnumNames<Schedule> { static constexpr std::array names{"rsqrt", "cosine", "constant"}; };
template <> struct EnumNames<DeviceKind> { static constexpr std::array names{"cpu", "cuda", "auto"}; };
template <> struct EnumNames<DataKind> { static constexpr std::array names{"duplication", "bytes"}; };
template <> struct EnumNames<ByteSplit> { static constexpr std::array names{"fractions", "enwik8"}; };
template <> struct EnumNames<SpMode> { static constexpr std::array names{"heads", "sort"}; };
template <> struct EnumNames<AttentionPrecision> { static constexpr std::array names{"fp32", "bf16"}; };
template <> struct EnumNames<LshSaved> { static constexpr std::array names{"auto", "orders", "buckets"}; };
template <> struct EnumNames<KeptAttention> { static constexpr std::array names{"auto", "state", "outputs"}; };
template <> struct EnumNames<KeptFfn> { static constexpr std::array names{"auto", "both", "pre_activation"}; };
template <> struct EnumNames<KeptPart> { static constexpr std::array names{"auto", "kept", "rebuilt"}; };
template <> struct EnumNames<OnNonFinite> { static constexpr std::array names{"stop", "skip"}; };
template <> struct EnumNames<Activation> { static constexpr std::array names{"gelu", "relu"}; };
template <> struct EnumNames<CommBackend> { static constexpr std::array names{"local", "mpi", "nccl"}; };

template <class E>
concept ConfigEnum = std::is_enum_v<E> && requires { EnumNames<E>::names; };

// The YAML name of `e` (CommBackend has its own, equal, in distributed/backend.h).
template <ConfigEnum E>
const char* to_string(E e) {
  const size_t i = size_t(e);
  return i < EnumNames<E>::names.size() ? EnumNames<E>::names[i] : "?";
}

// The value named `s`, or nullopt: parse_enum<Schedule>("cosine").
template <ConfigEnum E>
std::optional<E> parse_enum(std::string_view s) {
  for (size_t i = 0; i < EnumNames<E>::names.size(); ++i)
    if (s == EnumNames<E>::names[i]) return E(i);
  return std::nullopt;
}

// model.kept_layers: `auto`.
constexpr int kKeptLayersAuto = -1;
// model.stashed_layers: `auto`.
constexpr int kStashedLayersAuto = -1;

struct ModelConfig {
  int vocab_size = 256;               // token ids are in [0, vocab_size)
  int d_model = 128;                  // D: width of each residual stream
  int n_heads = 4;                    // attention heads
  int d_head = 0;                     // head width; 0 means d_model / n_heads
  int d_ff = 256;                     // feed-forward hidden width
  int n_layers = 2;                   // reversible layers
  int max_len = 256;                  // L: sequence length trained and evaluated
  std::vector<int> axial_shape;       // (a1, a2), a1 * a2 >= max_len; empty: chosen from max_len
  std::vector<int> axial_dims;        // (d1, d2), d1 + d2 = d_model; empty: (D/2, D - D/2)
  Activation activation = Activation::gelu;  // gelu | relu
  double layernorm_eps = 1e-6;        // added to the variance, > 0
  double dropout = 0.0;               // residual-branch dropout probability, [0, 1)
  int ffn_chunk = 0;                  // positions per feed-forward chunk; 0: whole sequence
  // Positions per call of the attention's projections (LN_a with Wqk, Wv;
  // Wo and their backward); 0: ffn_chunk. Their products are narrow (one
  // pass's heads), so small chunks cost more per row than the FFN's.
  int proj_chunk = 0;
  int attn_heads_per_pass = 0;        // heads a rank attends together (divides n_heads / sp); 0: auto
  int attn_rounds_per_pass = 0;       // LSH rounds per attention call: 1 or n_hashes; 0: auto
  // Layers (the top ones) whose forward activations are kept for the
  // backward instead of rebuilt from their outputs (framework/memory_plan.h,
  // fit_kept_layers): 0 .. n_layers, or kKeptLayersAuto (`auto`): as many
  // as fit the device (none on the CPU).
  int kept_layers = kKeptLayersAuto;
  // Layers below the kept ones that keep their attention outputs (stashed)
  // and log-sum-exps for the backward, so that it reruns their projections
  // but not their attention (framework/memory_plan.h, stashed_layer_count):
  // 0 .. n_layers - kept_layers, or kStashedLayersAuto (`auto`): fitted with
  // kept_layers to the device (none on the CPU).
  int stashed_layers = kStashedLayersAuto;
  KeptAttention kept_attention = KeptAttention::auto_;  // state | outputs | auto
  KeptFfn kept_ffn = KeptFfn::auto_;  // both | pre_activation | auto
  KeptPart kept_x1 = KeptPart::auto_;  // kept | rebuilt | auto
  KeptPart kept_ln = KeptPart::auto_;  // kept | rebuilt | auto
  LshSaved lsh_saved = LshSaved::auto_;  // LSH state kept for the backward: orders | buckets | auto
  int loss_chunk = 0;                 // positions per output/loss chunk; 0: whole sequence
  double init_std = 0.02;             // normal init of matrices and token embeddings
  double axial_init_std = 1.0;        // normal init of the axial position tables (docs/defaults.md)

  bool operator==(const ModelConfig&) const = default;
};

struct AttentionConfig {
  // Per layer, repeated cyclically: local and LSH alternating (docs/defaults.md).
  std::vector<AttentionKind> kinds{AttentionKind::local, AttentionKind::lsh};
  int bucket_size = 32;                   // positions per chunk after sorting (LSH), per local chunk
  int n_hashes = 2;                       // hash rounds
  int n_buckets = 0;                      // per round, even; 0: 2 * max_len / bucket_size rounded to a power of two
  bool factorize_buckets = false;         // hash n_buckets = f0 * f1 (>= 4, a power of two) as HF: bucket_factor0()
  int chunks_before = 1;                  // previous chunks each chunk attends to
  int chunks_after = 0;                   // following chunks (must be 0 for causal models)
  bool causal = true;                     // language modelling mask
  AttentionPrecision precision = AttentionPrecision::bf16;  // CUDA attention arithmetic (CPU: ignored)

  bool operator==(const AttentionConfig&) const = default;
};

struct OptimizerConfig {
  OptimizerKind name = OptimizerKind::adamw;  // the YAML key is optimizer.name
  double lr = 1e-3;               // peak learning rate
  double beta1 = 0.9;             // first-moment decay (adafactor: 0 disables momentum)
  double beta2 = 0.98;            // AdamW second-moment decay
  double eps = 1e-9;              // AdamW epsilon, > 0 with adamw
  double weight_decay = 0.0;      // decoupled, multiplies lr
  double decay_rate = 0.8;        // Adafactor: beta2_t = 1 - t^-decay_rate
  double clip_threshold = 1.0;    // Adafactor update RMS clip
  double grad_clip = 1.0;         // clip by global norm; 0 disables
  Schedule schedule = Schedule::rsqrt;
  int64_t warmup_steps = 100;     // linear warm-up steps
  double min_lr_ratio = 0.1;      // cosine floor as a fraction of lr

  bool operator==(const OptimizerConfig&) const = default;
};

struct TrainingConfig {
  int64_t steps = 1000;       // optimizer steps
  int batch_size = 8;         // sequences per step, over all data-parallel ranks
  uint64_t seed = 1;          // keys every random stream of the run
  DeviceKind device = DeviceKind::cpu;
  int log_every = 10;         // steps between progress lines
  int eval_every = 0;         // steps between evaluations; 0: only at the end
  int eval_batches = 4;       // batches per evaluation
  OnNonFinite on_nonfinite = OnNonFinite::stop;  // a step with a non-finite loss or gradient

  bool operator==(const TrainingConfig&) const = default;
};

struct DataConfig {
  DataKind kind = DataKind::duplication;
  std::string path;                  // bytes: file of bytes (e.g. enwik8)
  ByteSplit split = ByteSplit::fractions;  // bytes: how the file is cut
  double valid_fraction = 0.05;      // bytes + fractions: share for validation
  double test_fraction = 0.05;       // bytes + fractions: share for test
  int dup_symbols = 0;               // duplication: w uniform over 1..dup_symbols-1; 0: vocab_size

  bool operator==(const DataConfig&) const = default;
};

struct ParallelConfig {
  int dp = 1;                           // data-parallel groups; 0 (YAML `auto`): world size / sp
  int sp = 1;                           // sequence-parallel ranks per group
  CommBackend backend = CommBackend::local;
  SpMode sp_mode = SpMode::heads;       // how a group splits attention over its sp ranks
  double timeout_s = 600;               // a collective that takes longer ends the job; > 0
  double bucket_mb = 25;                // gradient all-reduce bucket size in MiB; > 0
  int bucket_lag = 0;                   // parts of the backward a full bucket waits before its sum starts

  bool operator==(const ParallelConfig&) const = default;
};

struct CheckpointConfig {
  std::string dir = "checkpoints";  // where checkpoints are written
  int64_t every = 0;                // steps between checkpoints; 0: only at the end
  int keep = 3;                     // newest checkpoints kept
  std::string resume = "auto";      // auto | none | PATH
  bool allow_changes = false;       // resume although keys that break continuation changed
                                    // (training.seed, data.*, ...: framework/resume_check.h);
                                    // keys that change parameter shapes are refused regardless

  bool operator==(const CheckpointConfig&) const = default;
};

struct LoggingConfig {
  std::string metrics;   // JSON-lines metrics file; empty: none
  bool plot = true;      // with a metrics file, rank 0 redraws its curves as an SVG beside it
                         // (METRICS.svg, framework/plot.h) after every evaluation
  bool per_rank = false;  // a log file per rank
  double peak_tflops = 0;  // MFU's ceiling; 0: a bf16 GEMM timed at start (CUDA), none on CPU

  bool operator==(const LoggingConfig&) const = default;
};

struct Config {
  ModelConfig model;
  AttentionConfig attention;
  OptimizerConfig optimizer;
  TrainingConfig training;
  DataConfig data;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  LoggingConfig logging;

  // Derived by validate(): never read from YAML.
  int head_dim() const { return model.d_head > 0 ? model.d_head : model.d_model / model.n_heads; }
  AttentionKind attention_kind(int layer) const {
    return attention.kinds[size_t(layer) % attention.kinds.size()];
  }
  int buckets() const;  // n_buckets, resolved
  // Factorized hashing (attention.factorize_buckets, buckets() = 2^k >= 4):
  // f0 = 2^floor(k/2), so that buckets() = f0 * f1 with f1 = 2^(k - floor(k/2));
  // 0 when the buckets are not factorized (flag off or buckets() < 4).
  int bucket_factor0() const;

  bool operator==(const Config&) const = default;
};

// Loads `path`, applies `overrides` ("a.b=value", in order) and validates.
// Throws ConfigError naming the key, the file (or "--set") and the line.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// Same, from YAML text; `source_name` stands for the file name in messages.
Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides = {});

// The resolved configuration as YAML (every key, defaults filled in); parsing
// it again gives the same Config.
std::string to_yaml(const Config& c);

// Cross-field checks and derived defaults (axial_shape, axial_dims when
// empty) for a Config built in code; load_config and parse_config already
// call it. Messages start with `source_name`. Throws ConfigError.
void validate_config(Config& c, const std::string& source_name = "config");

// Every dotted key ("model.d_model", ...) in the order to_yaml prints them.
std::vector<std::string> config_keys();

// The first dotted key (in config_keys() order) whose value, as to_yaml
// prints it, differs between `a` and `b`; "" when they print the same.
std::string first_difference(const Config& a, const Config& b);

// One key whose value differs between two configurations, as to_yaml prints it.
struct ConfigChange {
  std::string key;     // dotted: "optimizer.lr"
  std::string before;  // the value in the first configuration
  std::string after;   // the value in the second
};

// Every key (in config_keys() order) whose value differs from `before` to `after`.
std::vector<ConfigChange> config_changes(const Config& before, const Config& after);

// A stable 64-bit hash (FNV-1a) of to_yaml(c): equal on every rank, build and
// run for equal configurations.
uint64_t config_digest(const Config& c);

// Fills parallel.dp = 0 (`auto`) from the number of processes of the job and
// checks dp * sp == world_size and the batch split. Throws ConfigError.
void resolve_world_size(Config& c, int world_size);

// Largest model.max_len (and sequence length of `reformer bench`).
constexpr int kMaxLength = 1 << 30;

// The most bytes of YAML load_config reads; a larger file is refused.
constexpr int64_t kMaxConfigBytes = int64_t(16) << 20;

}  // namespace reformer
