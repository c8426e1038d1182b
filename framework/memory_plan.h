// The memory plan of one training step: every buffer the model, the
// optimizer and the device ops hold, by name, with its element count and
// bytes. ReformerModel sizes its allocations from plan_memory() (so the plan
// and the allocations cannot drift apart), `reformer plan` prints it, and an
// out-of-memory error quotes it.
//
// Everything the model and the optimizer allocate is allocated once, at
// construction, and held for the whole run; the op workspaces grow during
// the first step to their largest request. So the step's peak is the plan's
// total.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "framework/config.h"
#include "kernels/errors.h"

namespace reformer {

// Who holds a buffer.
enum class PlanGroup {
  parameters,   // parameters and their gradients (flat buffers)
  optimizer,    // optimizer state
  activations,  // the model's buffers sized by the sequence (residual streams, attention)
  chunks,       // the model's buffers sized by a position chunk (feed-forward, output, loss)
  workspace,    // device op scratch (estimate; none on the CPU)
};
const char* to_string(PlanGroup g);

struct PlannedBuffer {
  std::string name;    // what the model looks it up by, e.g. "x1"
  std::string shape;   // e.g. "[L, D] = [65536, 1024]"
  PlanGroup group = PlanGroup::activations;
  int64_t count = 0;   // elements of one copy
  int elem_bytes = 4;  // bytes per element
  int copies = 1;      // allocations of this size (e.g. one per LSH layer)
  int64_t bytes() const { return count * elem_bytes * copies; }
};

struct MemoryPlan {
  int64_t length = 0;  // model.max_len the plan is for
  int sp = 1;          // sequence-parallel ranks sharing it (the plan is one rank's)
  std::vector<PlannedBuffer> buffers;

  // Elements of one copy of buffer `name`; throws ShapeError when the plan
  // has no such buffer (a model/plan mismatch).
  int64_t count(const std::string& name) const;
  int64_t bytes(PlanGroup g) const;
  // What the model and the optimizer allocate (every group but workspace).
  int64_t allocated_bytes() const;
  // The step's peak on a device: allocated_bytes() plus the workspaces.
  int64_t total_bytes() const;
};

// Heads each rank attends in one attention pass: model.attn_heads_per_pass,
// or when it is 0 the most heads (a divisor of n_heads / sp, the heads a rank
// attends; 1 when sp > n_heads, pairs mode) whose six [Lfull, heads * dh] operand buffers and per-head round
// outputs take at most kAttentionPassBudget bytes (one head at least): the
// choice where no device is known (the CPU); on a device fit_heads_per_pass
// chooses by the device's memory. Fewer heads per pass hold less memory;
// more make wider products and recompute LayerNorm less often. Under sp > 1
// a pass projects sp times as many heads (every rank's pass heads) over the
// rank's L / sp positions. Throws ConfigError when the key does not divide
// n_heads / sp.
constexpr int64_t kAttentionPassBudget = int64_t(24) << 30;
int attention_heads_per_pass(const Config& cfg, int sp, int real_bytes = 4);

// Whether LSH layers attend a head's hash rounds one at a time:
// model.attn_rounds_per_pass 1, or when it is 0 (auto) a pass of one head
// with more than one round per rank where that saves more than
// kRoundSavingThreshold. The attention calls then hold one round's output
// instead of all and no per-round gradients in the op workspace (bf16: the
// backward adds into dqk, dv directly; fp32: one round's): the rounds are
// folded into the output and differentiated one by one
// (AttentionParams::fold_rounds, kernels/ops.h). The same function either way, but a slower step (the
// per-call passes over [L, dh] add up; bench/RESULTS.md), hence only where
// the memory matters: from about 2.8M tokens per rank with bench-peer.yaml.
// Throws ConfigError for a value other than 0, 1 and attention.n_hashes.
constexpr int64_t kRoundSavingThreshold = int64_t(8) << 30;
bool attention_by_round(const Config& cfg, int sp, int real_bytes = 4);

// Whether LSH layers (sp 1 or the heads mode) keep each head's bucket ids
// from the forward to the backward instead of its sorted orders: 16 bits a
// position and round instead of 32 (lsh_pack_buckets, kernels/ops.h), at
// the cost of sorting again (lsh_sort) in each call that attends with them:
// the rebuild's forward and the backward. model.lsh_saved `buckets` or
// `orders`; `auto`: buckets where the rounds are attended one at a time
// (attention_by_round, the layout for memory over speed) and n_buckets <=
// kMaxPackedBuckets (kernels/common/lsh_checks.h). A sort is about 0.2 ms
// per head at 1M on an H200 (bench/RESULTS.md).
bool lsh_saves_buckets(const Config& cfg, int sp, int real_bytes = 4);

// Whether the exchanges under sp > 1 (heads and pairs modes, not sort mode)
// keep no buffers of their own: the sequence side (lqk, lv) lives in dqk and dv and every exchange
// stages through an operand buffer that holds nothing at the time
// (ReformerModel's Scratch::lqk). True unless pairs mode's log-sum-exp rows
// (n_hashes / g per part) are wider than an operand's (heads per pass * dh).
bool exchange_in_operands(const Config& cfg, int sp, int real_bytes = 4);

// One rank's plan for a validated `cfg` under sequence parallelism over `sp`
// ranks (cfg.parallel.sp is not read), with floating-point elements of
// `real_bytes` bytes (4: fp32 training; 8: the double-precision checks);
// int32 buffers are 4 bytes either way. Throws ConfigError when sp cannot
// shard the model.
MemoryPlan plan_memory(const Config& cfg, int sp, int real_bytes = 4);

// The longest model.max_len for which plan_memory(cfg at that length, sp)
// totals at most `budget_bytes`, among the lengths the configuration accepts
// (heads per pass, when auto, fitted to budget_bytes: fit_heads_per_pass)
// (a multiple of the attention chunk and of sp, axial shape and buckets
// re-derived when the config derived them); 0 when none does.
int64_t longest_length_that_fits(const Config& cfg, int sp, int64_t budget_bytes);

// `cfg` with model.attn_heads_per_pass chosen for a device of `device_bytes`
// when it is 0 (auto) and device_bytes > 0: the most heads per pass (a
// divisor of the rank's heads; kAttentionPassBudget does not bound it)
// whose whole plan takes at most kAutoPassFraction of the device, else the
// fewest (1); unchanged otherwise. The plan counts the kept and stashed
// layers as set (none where auto), in their smallest forms where the forms
// are auto (their attention outputs, their feed-forward pre-activation, x1
// and the LayerNorm rows rebuilt).
// Kept and stashed layers and their forms are fitted after it
// (fit_to_device): a pass of more heads saves more than the layers its
// memory would keep (bench/RESULTS.md, 2026-12-02 (eighteenth): at 2M
// tokens 8 heads a pass run 20% faster than 2, at 4M 2 heads 38% faster
// than 1). Every rank of a run must see the same device_bytes.
constexpr double kAutoPassFraction = 0.9;
Config fit_heads_per_pass(const Config& cfg, int sp, int64_t device_bytes);

// Kept layers (model.kept_layers). The backward of a reversible layer
// normally rebuilds its inputs from its outputs, which reruns its forward:
// about a quarter of a step's arithmetic. A kept layer instead holds, from
// its forward to its backward, its inputs x1, x2 [L, D] and its feed-forward
// state over all L positions (LayerNorm output and statistics, hidden layer:
// [L, D] + 2 [L] + 1 or 2 [L, d_ff]), and where keeps_attention() its
// attention state too (the pass's outputs [Lfull, H dh], each head's
// log-sum-exps and staged operands, and qk, v where
// keeps_attention_operands()). The top kept_layer_count() layers
// are kept. The same function (exact inputs instead of rebuilt ones), faster
// where the memory allows it.
//
// model.kept_layers as given; 0 while it is auto (fit_kept_layers resolves it).
int kept_layer_count(const Config& cfg);
// Whether kept layers keep their attention state too: at sp 1 with every
// head in one pass and the hash rounds attended together, unless
// model.kept_attention is outputs (the other layouts rerun a kept layer's
// attention forward, but not its residual update).
bool keeps_attention(const Config& cfg, int sp, int real_bytes = 4);
// Where they do: whether they keep the pass's qk and v too ("kept qk",
// "kept v"). Not where the backend keeps each head's staged operands
// (kept_attention_staged > 0) and every layer attends in chunks (LSH or
// local attention over more than one chunk): the backward given those
// reads neither (AttentionParams::kept, kernels/common/params.h), so a
// kept layer's qk and v go through the pass's buffers as any layer's (at
// 1M tokens 8 GiB less per kept layer). Full attention keeps nothing
// staged.
bool keeps_attention_operands(const Config& cfg, int real_bytes = 4);
// Whether the attention outputs ("ao", "kept ao") are kept in bf16, half
// their fp32 size (AttentionParams::out_bf16, Operand in kernels/): on a
// CUDA device attending in bf16, which rounds them to bf16 wherever it
// reads them (the products, the stash, the backward's row statistics), so
// training computes the same bits, at sp 1 outside sort mode, with the
// hash rounds attended together and every layer attending in chunks (LSH
// or local attention over more than one chunk; head widths a multiple of
// 8). REFORMER_BF16_ATTENTION_OUTPUT=off keeps them in fp32.
bool attention_output_bf16(const Config& cfg, int sp, int real_bytes = 4);
// Whether the attention backward's gradients dqk and dv are kept in bf16,
// side by side in "dqk" (a row's dqk values, then its dv values; no "dv":
// half their fp32 size), as the projections' backward reads them
// (AttentionParams::grad_bf16, Operand with a row stride): the same bits,
// as that product rounds them to bf16. Where attention_output_bf16's
// conditions hold (its switch aside), every layer is an LSH layer of two
// or more hash rounds (whose round sum writes them) and d_model is a
// multiple of 8 of at most kLayernormBf16MaxC (the fused projections).
// REFORMER_BF16_ATTENTION_GRADIENTS=off keeps them in fp32.
bool attention_gradients_bf16(const Config& cfg, int sp, int real_bytes = 4);
// Whether the attention's operands qk and v are kept in bf16, half their
// fp32 size, as the projections write them (layernorm_project_forward's
// out_bf16, cuBLASLt rounding its fp32 sums to nearest even) and the hash
// and the attention read them (Operand, AttentionParams::in_bf16): where
// attention_gradients_bf16's conditions hold (its switch aside). Both
// round them to bf16 before any arithmetic, so the values read are those
// of fp32 operands rounded, from products that may sum in another order
// (cuBLASLt may pick another kernel for bf16 outputs).
// REFORMER_BF16_ATTENTION_OPERANDS=off keeps them in fp32.
bool attention_operands_bf16(const Config& cfg, int sp, int real_bytes = 4);
// Where they do not: whether kept layers keep what the attention backward
// reads from the forward instead, every pass's outputs ao (stashed: bf16
// on CUDA) and log-sum-exps, so that their backward reruns the projections
// but not the attention: at sp 1 with the hash rounds attended together.
bool keeps_attention_outputs(const Config& cfg, int sp, int real_bytes = 4);
// Stashed layers (model.stashed_layers): the layers just below the kept
// ones that keep every pass's attention outputs ao (stashed: bf16 on CUDA)
// and log-sum-exps, as kept layers do where keeps_attention_outputs(), and
// nothing else. Their backward rebuilds x2 and x1 as for any layer, but
// x1 from the stashed outputs: it reruns their projections, not their
// attention (at 1M tokens 17.9 ms a step against a kept layer's 59.5, in a
// thirteenth of its memory; bench/RESULTS.md). Where the hash rounds are
// attended together at sp 1 (stashes_attention); elsewhere none.
bool stashes_attention(const Config& cfg, int sp, int real_bytes = 4);
// model.stashed_layers as given, at most the layers below the kept ones; 0
// while it is auto and where !stashes_attention().
int stashed_layer_count(const Config& cfg, int sp, int real_bytes = 4);
// What a kept layer keeps of its attention, in words: "state"
// (keeps_attention), "outputs" (keeps_attention_outputs) or "rerun".
const char* kept_attention_text(const Config& cfg, int sp);
// The memory layout `cfg` runs, in words: heads per pass, kept layers and
// what they keep (attention; feed-forward; x1; LayerNorm rows), stashed
// layers, e.g. "8 heads per pass; 5 of 6 layers kept (attention outputs;
// feed-forward pre-activation; x1 rebuilt; LN rows rebuilt), 1 stashed".
std::string memory_layout_text(const Config& cfg, int sp);
// What a kept layer keeps of its feed-forward hidden layer, in words:
// "pre-activation" (model.kept_ffn: pre_activation) or "both".
const char* kept_ffn_text(const Config& cfg);
// Whether a kept layer keeps its input x1 ("kept x1"): unless model.kept_x1
// is rebuilt (auto reads as kept).
bool keeps_x1(const Config& cfg);
// Whether a kept layer keeps its feed-forward LayerNorm rows and statistics
// ("kept fln", "kept fmean", "kept frstd"): unless model.kept_ln is rebuilt
// (auto reads as kept).
bool keeps_ln(const Config& cfg);
// Elements Ops::stash of n values takes on the config's device
// (kernels/common/gemm_staging.h, bf16_stash_elems, where training.device
// is cuda and real_bytes 4; else n).
int64_t stash_elems(const Config& cfg, int64_t n, int real_bytes = 4);
// Floats per row of a kept layer's feed-forward state in h ("kept fh") and
// a ("kept fa"; 0: none kept, the backward rebuilds the activation into
// the chunk's fa, Ops::ffn_rebuild): Ops::ffn_state_cols of the config's
// device (kernels/common/gemm_staging.h, cuda_ffn_state_cols, where
// training.device is cuda, resolved, and real_bytes 4; else d_ff each),
// with a = 0 under model.kept_ffn: pre_activation (auto reads as both).
FfnStateCols kept_ffn_cols(const Config& cfg, int real_bytes = 4);
// Floats per row of a kept layer's feed-forward LayerNorm state ("kept
// fln"): layernorm_ffn_ln_cols (kernels/common/gemm_staging.h) where
// training.device is cuda (resolved) and real_bytes 4 (D / 2: bf16 rows),
// else d_model.
int64_t kept_ln_cols(const Config& cfg, int real_bytes = 4);
// Floats per head of a kept layer's staged attention operands ("kept
// attention staging", AttentionParams::kept: attention_kept_bytes,
// kernels/common/params.h) where training.device is cuda, real_bytes 4 and
// attention.precision bf16; else 0 (nothing kept).
int64_t kept_attention_staged(const Config& cfg, int real_bytes = 4);
// `cfg` with model.kept_layers, model.stashed_layers, model.kept_attention,
// model.kept_ffn, model.kept_x1 and model.kept_ln, those that are auto,
// chosen for a device of
// `device_bytes`: among the counts (and forms) whose whole plan takes at
// most kAutoPassFraction of the device, those that save the backward most,
// a kept layer counted as kKeptStateOverStashed stashed ones where it keeps
// its attention state and kKeptOverStashed where it keeps its outputs, less
// kActivationRebuildInStashed where it keeps only its feed-forward
// pre-activation, kX1RebuildInStashed where it rebuilds x1 and
// kLnRebuildInStashed where it rebuilds its LayerNorm rows; 0 kept and
// stashed when device_bytes <= 0 (the CPU), the forms left auto
// (keeps_attention reads it as state, kept_ffn_cols as both, keeps_x1 and
// keeps_ln as kept). Unchanged when none is auto.
// The ratio is measured: at 1M tokens (configs/bench-peer.yaml, one H200) a
// kept layer saved a step 59.5 ms, a stashed one 17.9 ms (bench/RESULTS.md).
constexpr double kKeptOverStashed = 3.3;
// A kept layer with its whole attention state also skips the projections'
// rerun and the staging of q, k_hat and v in the backward. Measured at 8
// heads a pass: at 1M, 1 such layer and 5 stashed ran 1.1% slower than 2
// kept with their outputs and 4 stashed (a weight below 4.5); at 512K, 4
// and 2 stashed 0.4% slower than 6 with their outputs (below 4.45), and 6
// with their state, pre-activations and x1 rebuilt 2.7% faster than 6
// with their outputs and everything else (above 4.03 with the two weights
// below; bench/RESULTS.md, 2026-12-02 (nineteenth)); since such a layer
// keeps no fp32 qk and v on CUDA (keeps_attention_operands), at 1M 3 with
// their state and 3 stashed 0.2% slower than 5 with their outputs and 1
// stashed, every part rebuilt in both (below 4.17; twentieth).
constexpr double kKeptStateOverStashed = 4.1;
// A kept layer that keeps only its feed-forward pre-activation
// (model.kept_ffn: pre_activation) rebuilds the activation in its backward:
// one pass over [L, d_ff] in bf16 on CUDA, read and written (counted: 16 GiB
// at 1M for d_ff 4096, about 4.5 ms at the H200's bandwidth). Measured at
// 1M, 2 kept and 4 stashed layers: 6.6 ms a kept layer, 0.37 of a stashed
// layer's 17.9 ms. Its weight is the form's less this.
constexpr double kActivationRebuildInStashed = 0.37;
// A kept layer without its input x1 (model.kept_x1: rebuilt) rebuilds it
// from its attention outputs: the output projection, a product of [L, D]
// and [D, D] (counted: 2.2 TFLOP at 1M for d_model 1024, about 4 ms with its
// operand's rounding). Measured as above: 6.5 ms a kept layer, 0.36.
constexpr double kX1RebuildInStashed = 0.36;
// A kept layer without its LayerNorm rows (model.kept_ln: rebuilt)
// normalises its feed-forward input again in the backward: a pass reading
// [L, D] in fp32 and writing it in bf16 (counted: 6 GiB at 1M for d_model
// 1024, about 1.7 ms). Measured as above: 4.7 ms a kept layer, 0.26.
constexpr double kLnRebuildInStashed = 0.26;
Config fit_kept_layers(const Config& cfg, int sp, int64_t device_bytes);
// fit_heads_per_pass, then fit_kept_layers: every auto memory knob fitted to
// a device.
Config fit_to_device(const Config& cfg, int sp, int64_t device_bytes);

// `cfg` with model.max_len = length (axial shape and n_buckets re-derived
// where they follow the length), validated. Throws ConfigError when the
// configuration does not accept the length.
Config with_length(const Config& cfg, int64_t length, const std::string& source);

// A Markdown table of the plan (buffer, shape, group, copies, MiB) and its
// totals per group.
std::string format_plan(const MemoryPlan& plan);

// Bytes as "12.34 GiB" (or MiB below 1 GiB).
std::string format_bytes(int64_t bytes);

// Parses a size such as "141GiB", "80G", "512MiB", "1.5TiB" or "1000000"
// (bytes); binary units (K, M, G, T with optional "iB" / "B"). Throws
// ConfigError naming `what` for anything else.
int64_t parse_bytes(const std::string& text, const std::string& what);

// One paragraph for an out-of-memory report: what the plan says a step of
// `cfg` needs on one rank of `sp`, and the longest max_len that fits in
// `device_bytes`, or in its share when `sharers` ranks share the GPU (a
// staged MPI job, Communicator::ranks_on_device).
std::string plan_advice(const Config& cfg, int sp, int64_t device_bytes, int sharers = 1);

// Rethrows `e` with plan_advice(cfg, sp, e.total_bytes, sharers) appended,
// for the places that know the configuration (trainer, bench).
[[noreturn]] void rethrow_with_plan(const OutOfMemoryError& e, const Config& cfg, int sp,
                                    int sharers = 1);

}  // namespace reformer
