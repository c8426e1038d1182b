#include "framework/memory_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <sstream>

#include "framework/attention.h"
#include "framework/model_tensors.h"
#include "framework/sequence_parallel.h"
#include "kernels/common/embedding_sums.h"
#include "kernels/common/gemm_staging.h"
#include "kernels/common/lsh_checks.h"
#include "kernels/errors.h"

namespace reformer {

const char* to_string(PlanGroup g) {
  switch (g) {
    case PlanGroup::parameters: return "parameters";
    case PlanGroup::optimizer: return "optimizer";
    case PlanGroup::activations: return "activations";
    case PlanGroup::chunks: return "chunks";
    case PlanGroup::workspace: return "workspace";
  }
  return "?";
}

int64_t MemoryPlan::count(const std::string& name) const {
  for (const PlannedBuffer& b : buffers)
    if (b.name == name) return b.count;
  throw ShapeError("memory plan: no buffer named '" + name + "'");
}

int64_t MemoryPlan::bytes(PlanGroup g) const {
  int64_t n = 0;
  for (const PlannedBuffer& b : buffers) n += b.group == g ? b.bytes() : 0;
  return n;
}

int64_t MemoryPlan::allocated_bytes() const { return total_bytes() - bytes(PlanGroup::workspace); }

int64_t MemoryPlan::total_bytes() const {
  int64_t n = 0;
  for (const PlannedBuffer& b : buffers) n += b.bytes();
  return n;
}

namespace {

// Builds the buffer list; `dims` name the shape, `sizes` give it.
struct Builder {
  MemoryPlan& plan;
  int real_bytes;
  void add(const std::string& name, PlanGroup g, const std::string& dims,
           std::vector<int64_t> sizes, bool is_int = false, int copies = 1) {
    if (copies <= 0) return;
    int64_t n = 1;
    std::string nums;
    for (int64_t s : sizes) {
      n *= s;
      nums += (nums.empty() ? "" : ", ") + std::to_string(s);
    }
    plan.buffers.push_back(PlannedBuffer{name, dims + " = [" + nums + "]", g, n,
                                         is_int ? 4 : real_bytes, copies});
  }
  // Device workspace: `bytes` bytes (on a CUDA device only).
  void add_bytes(const std::string& name, int64_t bytes) {
    plan.buffers.push_back(PlannedBuffer{name, "[bytes]", PlanGroup::workspace, bytes, 1, 1});
  }
};

int64_t round256(int64_t b) { return (b + 255) / 256 * 256; }

// Layers that run LSH attention at model.max_len (uses_lsh).
int lsh_layer_count(const Config& cfg) {
  int n = 0;
  for (int l = 0; l < cfg.model.n_layers; ++l) n += uses_lsh(cfg, l, cfg.model.max_len) ? 1 : 0;
  return n;
}

// The largest scratch request of one op of a step on a CUDA device
// (kernels/cuda: attention backward, LSH sort and hash, column sums, the
// token embedding's gradient): what
// the model reserves at construction (Ops::reserve_workspace), so that no
// growth margin (workspace_capacity, kernels/common/workspace_growth.h) is
// held unless a request exceeds it.
int64_t op_workspace_bytes(const Config& cfg, int64_t Lfull, int64_t L, int64_t chunk, bool lsh,
                           bool by_round, int64_t other = 0, int64_t sort_heads = 1) {
  // Rounds of one attention call (attention_by_round: one).
  const int64_t f = 4, dh = cfg.head_dim(), R = lsh && !by_round ? cfg.attention.n_hashes : 1;
  // Backward: k_hat, norm and row statistics, per-round dq, dk_hat, dv (fp32).
  // Forward: k_hat, norm. With bf16 attention both add the staged bf16
  // operands [L, dh padded to 32, 64 or 128], shared by the rounds: q, k_hat,
  // v (and dout) (kernels/cuda/attention_common.cuh, carve_scratch).
  const bool bf16 = cfg.attention.precision == AttentionPrecision::bf16;
  const int64_t dh_pad = dh <= 32 ? 32 : dh <= 64 ? 64 : 128;
  const int64_t staged = bf16 ? 2 * Lfull * dh_pad : 0;
  // With bf16 the tensor-core backward keeps no fp32 k_hat, and its
  // per-round gradients are bf16 [R, L, dh padded]; with one round per call
  // it adds into dqk and dv itself, without them (mma_backward_direct).
  const bool direct = bf16 && R == 1;
  const int64_t grads = bf16 ? 3 * round256(2 * R * Lfull * dh_pad)
                             : round256(f * Lfull * dh) + 3 * round256(f * R * Lfull * dh);
  const int64_t backward =
      (direct ? 0 : grads) + 4 * round256(f * Lfull) + round256(4 * staged);
  // The forward also keeps the rounds' outputs (bf16 [R, L, dh padded] on
  // tensor cores, else fp32; by round one round's, folded into the output
  // as they come; a local layer has one).
  const int64_t own = bf16 ? round256(2 * R * Lfull * dh_pad) : round256(f * R * Lfull * dh);
  const int64_t forward = (staged > 0 ? 0 : round256(f * Lfull * dh)) + round256(f * Lfull) +
                          round256(3 * staged) + own;
  const int64_t attention = std::max(backward, forward);
  int64_t sort = 0;
  if (lsh) {  // every round of sort_heads heads (hash_pass) in one sort
    const int64_t n = sort_heads * cfg.attention.n_hashes * Lfull;
    sort = 3 * round256(8 * n);  // keys in and out, radix-sort scratch of about the same size
  }
  int64_t hash = 0;
  if (lsh) {  // lsh.cu: the rotations and one chunk of products, at most kHashScratchBytes
    const int64_t ldy = (int64_t(cfg.attention.n_hashes) *
                             rotation_cols(cfg.buckets(), cfg.bucket_factor0()) + 3) / 4 * 4;
    hash = round256(f * dh * ldy) + round256(std::min(f * Lfull * ldy, int64_t(256) << 20));
  }
  const int64_t colsum = 8 * ((std::max(chunk, L) + 255) / 256) *
                         std::max<int64_t>({2 * cfg.model.d_model, cfg.model.d_ff,
                                            cfg.model.vocab_size});
  // The one-pass LayerNorm backward's partial sums (kernels/cuda/layernorm.cu:
  // two [512, d_model] double arrays at most).
  const int64_t ln_sums = round256(2 * 8 * 512 * int64_t(cfg.model.d_model));
  // The token embedding's gradient: the positions sorted by token and the
  // windows' partial sums (kernels/common/embedding_sums.h).
  const int64_t dwte = dwte_workspace_bytes(L, cfg.model.d_model);
  const int64_t largest = std::max({attention, sort, hash, colsum, ln_sums, dwte, other});
  return largest;
}

void add_optimizer(Builder& b, const Config& cfg, const ParamTable& table) {
  const OptimizerConfig& o = cfg.optimizer;
  const int64_t P = table.total();
  if (o.name == OptimizerKind::adamw) {
    b.add("adamw m", PlanGroup::optimizer, "[P]", {P});
    b.add("adamw v", PlanGroup::optimizer, "[P]", {P});
    return;
  }
  int64_t second = 0;
  for (const ParamInfo& p : table.params())
    second += p.rows() > 1 && p.cols() > 1 ? p.rows() + p.cols() : p.size;
  b.add("adafactor second moment", PlanGroup::optimizer, "[rows + cols per matrix]", {second});
  if (o.beta1 > 0) b.add("adafactor m", PlanGroup::optimizer, "[P]", {P});
}

// The heads one rank attends: all of them at sp 1 and in sort mode (every
// rank attends every head over its own positions), n_heads / sp in the heads
// mode, one in pairs mode.
int rank_heads(const Config& cfg, int sp) {
  const ModelConfig& m = cfg.model;
  const bool sort = sp > 1 && cfg.parallel.sp_mode == SpMode::sort;
  return sort ? m.n_heads : sp > m.n_heads ? 1 : m.n_heads / sp;
}

}  // namespace

int attention_heads_per_pass(const Config& cfg, int sp, int real_bytes) {
  const ModelConfig& m = cfg.model;
  const bool sort = sp > 1 && cfg.parallel.sp_mode == SpMode::sort;
  const int heads = rank_heads(cfg, sp);
  if (m.attn_heads_per_pass > 0) {
    if (heads % m.attn_heads_per_pass != 0)
      throw ConfigError("model.attn_heads_per_pass = " + std::to_string(m.attn_heads_per_pass) +
                        " must divide model.n_heads" +
                        (sp > 1 && !sort ? " / parallel.sp = " : " = ") + std::to_string(heads) +
                        (sp > 1 && !sort
                             ? " (the heads each rank of the sequence-parallel group attends)"
                             : ""));
    return m.attn_heads_per_pass;
  }
  // A pass keeps six [Lfull, dh] operands and the rounds' outputs and
  // log-sum-exps of each of its heads (sort mode: six [L / sp, dh] operands
  // and the rounds' log-sum-exps and weights).
  int64_t rounds = 1;
  for (int l = 0; l < m.n_layers; ++l)
    if (uses_lsh(cfg, l, m.max_len)) rounds = cfg.attention.n_hashes;
  const int64_t L = sort ? m.max_len / sp : m.max_len, dh = cfg.head_dim();
  const int64_t per_head = (sort ? 6 * L * dh + 2 * rounds * L
                                 : 6 * L * dh + rounds * L * (dh + 1)) * real_bytes;
  int best = 1;
  for (int g = 1; g <= heads; ++g)
    if (heads % g == 0 && g * per_head <= kAttentionPassBudget) best = g;
  return best;
}

namespace {

// Sort mode (framework/sorted_attention.h), one head at a time: the head's
// columns of Wqk, Wv and their gradients, its projections of the rank's
// positions and their gradients, the routing and exchange rows of one
// round, the slots it attends with their halo, and its rounds' states.
// Returns the rows of one attention call.
int64_t add_sorted_attention(Builder& b, const Config& cfg, int sp, int lsh_layers) {
  using G = PlanGroup;
  const ModelConfig& m = cfg.model;
  const int64_t L = m.max_len / sp, H = m.n_heads, dh = cfg.head_dim(), D = m.d_model;
  const int64_t R = lsh_layers > 0 ? cfg.attention.n_hashes : 1;
  const int64_t halo = int64_t(cfg.attention.chunks_before + cfg.attention.chunks_after) *
                       cfg.attention.bucket_size;
  const int64_t Nx = L + sp * halo, Nl = L + halo;
  const int64_t Hp = attention_heads_per_pass(cfg, sp, b.real_bytes);
  for (const char* n : {"qk", "v", "ao", "dqk", "dv", "dao"})
    b.add(n, G::activations, "[L, heads_per_pass*dh]", {L, Hp * dh});
  if (Hp < H)
    for (const char* n : {"wq_h", "wv_h", "gwq_h", "gwv_h"})
      b.add(n, G::activations, "[D, heads_per_pass*dh]", {D, Hp * dh});
  if (lsh_layers > 0) {
    b.add("rotations", G::activations, "[n_hashes, dh, cols]",
          {R, dh, rotation_cols(cfg.buckets(), cfg.bucket_factor0())});
    b.add("sort buckets", G::activations, "[n_heads, n_hashes, L] per LSH layer", {H, R, L}, true,
          lsh_layers);
  }
  for (const char* n : {"sort parts", "sort dparts"})
    b.add(n, G::activations, "[L, rounds*dh]", {L, R * dh});
  for (const char* n : {"sort lse", "sort weights"})  // per head of a pass
    b.add(n, G::activations, "[heads_per_pass, L, rounds]", {Hp, L, R});
  b.add("sort send", G::activations, "[2 (L + sp*halo), dh] + [L + sp*halo]", {Nx, 2 * dh + 1});
  const int64_t nb = lsh_layers > 0 ? cfg.buckets() : 1;
  // Per head of a pass: its sorted order and slot offsets, for its backward.
  if (lsh_layers > 0)
    b.add("sort order", G::activations, "[heads_per_pass, n_hashes, L]", {Hp, R, L}, true);
  b.add("sort deltas", G::activations, "[heads_per_pass, rounds, n_buckets]", {Hp, R, nb}, true);
  b.add("sort routing", G::activations, "[3 (L + sp*halo) + 2 L]", {3 * Nx + 2 * L}, true);
  b.add("sort slots recv", G::activations, "[L + sp*halo]", {Nx}, true);
  b.add("sort histograms", G::activations, "[sp + 1, rounds, n_buckets]", {sp + 1, R, nb}, true);
  for (const char* n : {"sort qk", "sort v", "sort dout", "sort out", "sort dqk", "sort dv"})
    b.add(n, G::activations, "[L + halo, dh]", {Nl, dh});
  b.add("sort slot lse", G::activations, "[L + halo]", {Nl});
  b.add("sort perm", G::activations, "[L + halo]", {Nl}, true);
  return Nl;
}

}  // namespace

bool attention_by_round(const Config& cfg, int sp, int real_bytes) {
  const bool any_lsh = lsh_layer_count(cfg) > 0;
  const int rounds = cfg.attention.n_hashes / sp_ranks_per_head(cfg, sp);
  const int set = cfg.model.attn_rounds_per_pass;
  if (set != 0 && set != 1 && set != cfg.attention.n_hashes)
    throw ConfigError("model.attn_rounds_per_pass = " + std::to_string(set) +
                      " must be auto (0), 1 (one hash round per attention call) or "
                      "attention.n_hashes = " + std::to_string(cfg.attention.n_hashes) +
                      " (all in one call)");
  if (!any_lsh || rounds < 2) return false;
  if (set != 0) return set == 1;
  if (attention_heads_per_pass(cfg, sp, real_bytes) != 1) return false;
  // What attending by round saves: the op workspace's round outputs and
  // per-round gradients (one head per pass).
  const int64_t Lfull = cfg.model.max_len, L = Lfull / sp;
  const int64_t saved = op_workspace_bytes(cfg, Lfull, L, 0, true, false) -
                        op_workspace_bytes(cfg, Lfull, L, 0, true, true);
  return saved > kRoundSavingThreshold;
}

bool lsh_saves_buckets(const Config& cfg, int sp, int real_bytes) {
  if (lsh_layer_count(cfg) == 0 || (sp > 1 && cfg.parallel.sp_mode == SpMode::sort)) return false;
  switch (cfg.model.lsh_saved) {
    case LshSaved::orders: return false;
    case LshSaved::buckets: return true;  // validate_config checks the bucket count
    case LshSaved::auto_: break;
  }
  return cfg.buckets() <= kMaxPackedBuckets && attention_by_round(cfg, sp, real_bytes);
}

MemoryPlan plan_memory(const Config& cfg, int sp, int real_bytes) {
  check_sequence_shard(cfg, sp, /*has_group*/ true);
  const ModelConfig& m = cfg.model;
  MemoryPlan plan;
  plan.length = m.max_len;
  plan.sp = sp;
  Builder b{plan, real_bytes};
  const int64_t Lfull = m.max_len, L = Lfull / sp, D = m.d_model, F = m.d_ff, V = m.vocab_size;
  const int g = sp_ranks_per_head(cfg, sp);  // > 1: pairs mode
  const int64_t Hloc = g > 1 ? 1 : m.n_heads / sp, dh = cfg.head_dim();
  const ParamTable table = model_param_table(cfg);
  const int64_t P = table.total();
  using G = PlanGroup;

  b.add("params", G::parameters, "[P]", {P});
  b.add("grads", G::parameters, "[P]", {P});
  add_optimizer(b, cfg, table);

  b.add("tokens", G::activations, "[L]", {L}, true);
  b.add("targets", G::activations, "[L]", {L}, true);
  for (const char* n : {"x1", "x2", "dx1", "dx2"}) b.add(n, G::activations, "[L, D]", {L, D});
  const bool sort = sp > 1 && cfg.parallel.sp_mode == SpMode::sort;
  const int lsh_layers = lsh_layer_count(cfg);
  bool by_round = false;
  int64_t attn_rows = Lfull;  // rows of one attention call
  int64_t proj_cols = 0;      // columns of one pass's qk and v projections
  int64_t sort_heads = 1;     // heads whose rounds one lsh_sort sorts
  if (sort) {
    attn_rows = add_sorted_attention(b, cfg, sp, lsh_layers);
    by_round = true;
    proj_cols = attention_heads_per_pass(cfg, sp, real_bytes) * dh;
  } else {
    // Attention runs in passes of Hp heads. At sp 1 a pass projects and
    // attends Hp heads over the rank's positions (all of them). Under sequence
    // parallelism every rank attends Hp of its heads over the whole sequence,
    // so a pass projects sp * Hp heads of the rank's positions (lqk, lv) and
    // exchanges them for [Lfull, Hp * dh].
    const int64_t Hp = attention_heads_per_pass(cfg, sp, real_bytes);
    proj_cols = sp * Hp * dh;
    for (const char* n : {"qk", "v"}) {
      if (attention_operands_bf16(cfg, sp, real_bytes))  // bf16 pairs
        b.add(n, G::activations, "[Lfull, heads_per_pass*dh/2]", {Lfull, Hp * dh / 2});
      else
        b.add(n, G::activations, "[Lfull, heads_per_pass*dh]", {Lfull, Hp * dh});
    }
    if (attention_output_bf16(cfg, sp, real_bytes))  // bf16 pairs
      b.add("ao", G::activations, "[Lfull, heads_per_pass*dh/2]", {Lfull, Hp * dh / 2});
    else
      b.add("ao", G::activations, "[Lfull, heads_per_pass*dh]", {Lfull, Hp * dh});
    if (attention_gradients_bf16(cfg, sp, real_bytes)) {  // dqk's rows, then dv's, in bf16
      b.add("dqk", G::activations, "[Lfull, heads_per_pass*dh] (dqk, dv in bf16)",
            {Lfull, Hp * dh});
      b.add("dao", G::activations, "[Lfull, heads_per_pass*dh]", {Lfull, Hp * dh});
    } else {
      for (const char* n : {"dqk", "dv", "dao"})
        b.add(n, G::activations, "[Lfull, heads_per_pass*dh]", {Lfull, Hp * dh});
    }
    // Pairs mode (g ranks per head) gathers every rank's head columns of Wqk,
    // Wv (duplicates included) and uses Wo in place.
    if (Hp < Hloc || g > 1) {  // a pass's columns of Wqk, Wv (rows of Wo) and their gradients
      for (const char* n : {"wq_h", "wv_h", "gwq_h", "gwv_h"})
        b.add(n, G::activations, "[D, sp*heads_per_pass*dh]", {D, sp * Hp * dh});
      if (sp > 1 && g == 1)
        for (const char* n : {"wo_h", "gwo_h"})
          b.add(n, G::activations, "[sp*heads_per_pass*dh, D]", {sp * Hp * dh, D});
    }
    // Hash rounds a rank attends per head (a part's log-sum-exps in pairs mode).
    const int64_t rounds = lsh_layers > 0 ? cfg.attention.n_hashes / g : 1;
    // The sequence side of the exchange ([L, sp * Hp * dh], as many
    // elements as an operand) and its staging, where they are not in the
    // memory of dqk, dv and an operand that holds nothing at the time
    // (exchange_in_operands; framework/model.cpp, Scratch::lqk).
    if (sp > 1 && !exchange_in_operands(cfg, sp, real_bytes)) {
      b.add("lqk", G::activations, "[L, sp*heads_per_pass*dh]", {L, sp * Hp * dh});
      b.add("lv", G::activations, "[L, sp*heads_per_pass*dh]", {L, sp * Hp * dh});
      b.add("exchange staging", G::activations, "[sp, L, max(heads_per_pass*dh, part rounds)]",
            {sp, L, std::max(Hp * dh, rounds)});
    }
    if (g > 1) {  // the parts' log-sum-exps both sides and the combined heads
      b.add("lse_h", G::activations, "[Lfull, part rounds]", {Lfull, rounds});
      b.add("lse_seq", G::activations, "[L, sp*part rounds]", {L, sp * rounds});
      b.add("comb", G::activations, "[L, n_heads*dh]", {L, m.n_heads * dh});
      b.add("comb_w", G::activations, "[n_heads, L, sp/n_heads]", {m.n_heads, L, g});
    }

    // One lse slot per head of a pass. The attention op keeps a call's
    // round outputs in its workspace (attended by round, a head's rounds
    // are folded into its output as they come: one round's output there
    // at a time).
    const int64_t slots = Hp;
    by_round = attention_by_round(cfg, sp, real_bytes);
    b.add("lse", G::activations, "[slots, rounds, Lfull]", {slots, rounds, Lfull});
    if (lsh_layers > 0) {
      const int64_t nh = cfg.attention.n_hashes;
      // Rotations and bucket ids until sorted: one head's, or with the
      // sorted orders kept every head of a pass's, hashed before the pass
      // attends and sorted by one lsh_sort (framework/attention_lsh.cpp,
      // hash_pass).
      const bool saves_buckets = lsh_saves_buckets(cfg, sp, real_bytes);
      if (!saves_buckets) sort_heads = Hp;
      b.add("rotations", G::activations,
            saves_buckets ? "[n_hashes, dh, cols]" : "[Hp, n_hashes, dh, cols]",
            {sort_heads, nh, dh, rotation_cols(cfg.buckets(), cfg.bucket_factor0())});
      b.add("perm", G::activations, saves_buckets ? "[rounds, Lfull]" : "[Hp, rounds, Lfull]",
            {saves_buckets ? 1 : Hp, rounds, Lfull}, true);
      if (saves_buckets) {
        // Each head's bucket ids, two to an int32, sorted again into one
        // head's orders where used.
        b.add("lsh order", G::activations, "[rounds, Lfull]", {rounds, Lfull}, true);
        b.add("lsh buckets", G::activations, "[Hloc, rounds*Lfull/2] per LSH layer",
              {Hloc, lsh_packed_elems(rounds * Lfull)}, true, lsh_layers);
      } else {
        b.add("lsh perms", G::activations, "[Hloc, rounds, Lfull] per LSH layer",
              {Hloc, rounds, Lfull}, true, lsh_layers);
      }
    }
    b.add("identity", G::activations, "[Lfull]", {Lfull}, true);
  }

  // Rows of one feed-forward call (fc) and of one projection call (pc); the
  // LayerNorm rows, branch outputs and their gradients serve both.
  const int64_t fc = m.ffn_chunk > 0 ? std::min<int64_t>(m.ffn_chunk, L) : L;
  const int64_t pc = m.proj_chunk > 0 ? std::min<int64_t>(m.proj_chunk, L) : fc;
  const int64_t rc = std::max(fc, pc);
  for (const char* n : {"fln", "fg", "dfln", "dfg"})
    b.add(n, G::chunks, "[max(fc, pc), D]", {rc, D});
  // The feed-forward block's hidden layer (ffn_forward / ffn_backward keep
  // their state and its gradient in these two).
  for (const char* n : {"fh", "fa"}) b.add(n, G::chunks, "[fc, d_ff]", {fc, F});
  b.add("fmean", G::chunks, "[max(fc, pc)]", {rc});
  b.add("frstd", G::chunks, "[max(fc, pc)]", {rc});
  // The kept layers' state, one copy per kept layer (model.kept_layers).
  const int kept = kept_layer_count(cfg);
  if (keeps_x1(cfg))
    b.add("kept x1", G::activations, "[L, D] per kept layer", {L, D}, false, kept);
  b.add("kept x2", G::activations, "[L, D] per kept layer", {L, D}, false, kept);
  if (keeps_ln(cfg)) {
    const int64_t ln_cols = kept_ln_cols(cfg, real_bytes);
    b.add("kept fln", G::activations,
          ln_cols == D ? "[L, D] per kept layer" : "[L, D/2] per kept layer", {L, ln_cols},
          false, kept);
    b.add("kept fmean", G::activations, "[L] per kept layer", {L}, false, kept);
    b.add("kept frstd", G::activations, "[L] per kept layer", {L}, false, kept);
  }
  // The hidden layer's state (Ops::ffn_state_cols): what the activation is
  // rebuilt from, and the activation unless the backward rebuilds it.
  const FfnStateCols ffn = kept_ffn_cols(cfg, real_bytes);
  for (auto [name, cols] : {std::pair{"kept fh", ffn.h}, std::pair{"kept fa", ffn.a}})
    if (cols > 0)
      b.add(name, G::activations,
            cols == F ? "[L, d_ff] per kept layer" : "[L, d_ff/2] per kept layer", {L, cols},
            false, kept);
  if (keeps_attention(cfg, sp, real_bytes)) {
    const int64_t HD = Hloc * dh;
    if (keeps_attention_operands(cfg, real_bytes))
      for (const char* n : {"kept qk", "kept v"})
        b.add(n, G::activations, "[Lfull, heads*dh] per kept layer", {Lfull, HD}, false, kept);
    if (attention_output_bf16(cfg, sp, real_bytes))
      b.add("kept ao", G::activations, "[Lfull, heads*dh/2] per kept layer", {Lfull, HD / 2},
            false, kept);
    else
      b.add("kept ao", G::activations, "[Lfull, heads*dh] per kept layer", {Lfull, HD}, false,
            kept);
    b.add("kept lse", G::activations, "lse per kept layer", {plan.count("lse")}, false, kept);
    // CUDA: each head's operands as the tensor-core forward staged them,
    // read by its backward instead of staging them again.
    b.add("kept attention staging", G::activations,
          "[heads, staged q, k_hat, v and norms] per kept layer",
          {Hloc, kept_attention_staged(cfg, real_bytes)}, false, kept);
  }
  // Every pass's outputs ao, stashed (Ops::stash: bf16 on CUDA), and
  // log-sum-exps: what the attention backward reads from the forward.
  auto add_stash = [&](const char* ao_name, const char* lse_name, const std::string& per,
                       int copies) {
    const int64_t Hp = attention_heads_per_pass(cfg, sp, real_bytes);
    const int64_t passes = Hloc / Hp;
    const int64_t n = Lfull * Hp * dh;
    const int64_t st = stash_elems(cfg, n, real_bytes);
    const std::string cols = st == n ? "dh" : "dh/2";
    b.add(ao_name, G::activations, "[passes, Lfull*heads_per_pass*" + cols + "] per " + per,
          {passes, st}, false, copies);
    b.add(lse_name, G::activations, "[passes, lse] per " + per, {passes, plan.count("lse")},
          false, copies);
  };
  if (keeps_attention_outputs(cfg, sp, real_bytes))
    add_stash("kept ao stash", "kept lse all", "kept layer", kept);
  if (const int stashed = stashed_layer_count(cfg, sp, real_bytes); stashed > 0)
    add_stash("stashed ao", "stashed lse", "stashed layer", stashed);

  const int64_t oc = m.loss_chunk > 0 ? std::min<int64_t>(m.loss_chunk, L) : L;
  for (const char* n : {"cat", "oln", "dcat", "doln"}) b.add(n, G::chunks, "[oc, 2D]", {oc, 2 * D});
  for (const char* n : {"omean", "orstd", "loss"}) b.add(n, G::chunks, "[oc]", {oc});
  b.add("logits", G::chunks, "[oc, V]", {oc, V});
  b.add("pred", G::chunks, "[oc]", {oc}, true);

  // Sort mode's sort_route (kernels/cuda/routing.cu): destinations [L] int4,
  // flags and entry indices [sp, L] int32, and the scan's scratch.
  const int64_t route = sort ? round256(16 * L) + 2 * round256(4 * sp * L) + (int64_t(1) << 20) : 0;
  // The linear layers' bf16 operands (kernels/common/gemm_staging.h): the
  // feed-forward over blocks of fc rows, the projections (Wqk, Wv; Wo from
  // the pass's output columns) of pc rows, the output head over oc rows.
  const int64_t wo_cols = g > 1 ? m.n_heads * dh : proj_cols;
  const int64_t gemm = std::max({ffn_workspace_bytes(fc, D, F),
                                 layernorm_project_bytes(pc, D, proj_cols),
                                 gemm_stage_bytes(pc, wo_cols, D), gemm_stage_bytes(oc, 2 * D, V)});
  b.add_bytes("op workspace (estimate)",
              op_workspace_bytes(cfg, attn_rows, L, std::max(rc, oc), lsh_layers > 0, by_round,
                                 std::max(route, gemm), sort_heads));
  b.add_bytes("cuBLASLt workspace", int64_t(32) << 20);  // kernels/cuda/cuda_ops.cu
  return plan;
}

namespace {

std::vector<int> derived_axial_shape(int64_t max_len) {
  int64_t a2 = 1;
  while (a2 * a2 < max_len) a2 *= 2;
  return {int((max_len + a2 - 1) / a2), int(a2)};
}

}  // namespace

Config with_length(const Config& cfg, int64_t length, const std::string& source) {
  if (length < 1 || length > kMaxLength)
    throw ConfigError(source + ": the length " + std::to_string(length) + " must be in [1, " +
                      std::to_string(kMaxLength) + "]");
  Config c = cfg;
  if (c.model.axial_shape == derived_axial_shape(cfg.model.max_len)) c.model.axial_shape.clear();
  c.model.max_len = int(length);
  validate_config(c, source);
  return c;
}

Config fit_heads_per_pass(const Config& cfg, int sp, int64_t device_bytes) {
  if (cfg.model.attn_heads_per_pass > 0 || device_bytes <= 0) return cfg;
  const int heads = rank_heads(cfg, sp);
  Config c = cfg;
  // Kept layers' forms left to fit_kept_layers are tried in their smallest.
  if (c.model.kept_attention == KeptAttention::auto_)
    c.model.kept_attention = KeptAttention::outputs;
  if (c.model.kept_ffn == KeptFfn::auto_) c.model.kept_ffn = KeptFfn::pre_activation;
  if (c.model.kept_x1 == KeptPart::auto_) c.model.kept_x1 = KeptPart::rebuilt;
  if (c.model.kept_ln == KeptPart::auto_) c.model.kept_ln = KeptPart::rebuilt;
  int best = 1;
  for (int g = heads; g > 1 && best == 1; --g) {
    if (heads % g != 0) continue;
    c.model.attn_heads_per_pass = g;
    if (double(plan_memory(c, sp).total_bytes()) <= kAutoPassFraction * double(device_bytes))
      best = g;
  }
  Config fitted = cfg;
  fitted.model.attn_heads_per_pass = best;
  return fitted;
}

int kept_layer_count(const Config& cfg) { return std::max(cfg.model.kept_layers, 0); }

bool keeps_attention(const Config& cfg, int sp, int real_bytes) {
  return sp == 1 && cfg.model.kept_attention != KeptAttention::outputs &&
         attention_heads_per_pass(cfg, 1, real_bytes) == cfg.model.n_heads &&
         !attention_by_round(cfg, 1, real_bytes);
}

bool keeps_attention_operands(const Config& cfg, int real_bytes) {
  // Full attention (every layer's at one chunk or less) stages nothing it keeps.
  if (kept_attention_staged(cfg, real_bytes) == 0 ||
      cfg.model.max_len <= cfg.attention.bucket_size)
    return true;
  for (int l = 0; l < cfg.model.n_layers; ++l)
    if (cfg.attention_kind(l) == AttentionKind::full) return true;
  return false;
}

bool stashes_attention(const Config& cfg, int sp, int real_bytes) {
  return sp == 1 && !attention_by_round(cfg, 1, real_bytes);
}

const char* kept_attention_text(const Config& cfg, int sp) {
  return keeps_attention(cfg, sp)           ? "state"
         : keeps_attention_outputs(cfg, sp) ? "outputs"
                                            : "rerun";
}

std::string memory_layout_text(const Config& cfg, int sp) {
  return std::to_string(attention_heads_per_pass(cfg, sp)) + " heads per pass; " +
         std::to_string(kept_layer_count(cfg)) + " of " + std::to_string(cfg.model.n_layers) +
         " layers kept (attention " + kept_attention_text(cfg, sp) + "; feed-forward " +
         kept_ffn_text(cfg) + "; x1 " + (keeps_x1(cfg) ? "kept" : "rebuilt") + "; LN rows " +
         (keeps_ln(cfg) ? "kept" : "rebuilt") + "), " +
         std::to_string(stashed_layer_count(cfg, sp)) + " stashed";
}

const char* kept_ffn_text(const Config& cfg) {
  return cfg.model.kept_ffn == KeptFfn::pre_activation ? "pre-activation" : "both";
}

bool keeps_x1(const Config& cfg) { return cfg.model.kept_x1 != KeptPart::rebuilt; }

bool keeps_ln(const Config& cfg) { return cfg.model.kept_ln != KeptPart::rebuilt; }

int stashed_layer_count(const Config& cfg, int sp, int real_bytes) {
  if (!stashes_attention(cfg, sp, real_bytes)) return 0;
  return std::clamp(cfg.model.stashed_layers, 0, cfg.model.n_layers - kept_layer_count(cfg));
}

bool exchange_in_operands(const Config& cfg, int sp, int real_bytes) {
  if (sp == 1 || cfg.parallel.sp_mode == SpMode::sort) return false;
  const int g = sp_ranks_per_head(cfg, sp);
  const int64_t part_rounds = lsh_layer_count(cfg) > 0 ? cfg.attention.n_hashes / g : 1;
  return g == 1 ||
         part_rounds <= int64_t(attention_heads_per_pass(cfg, sp, real_bytes)) * cfg.head_dim();
}

bool keeps_attention_outputs(const Config& cfg, int sp, int real_bytes) {
  return stashes_attention(cfg, sp, real_bytes) && !keeps_attention(cfg, sp, real_bytes);
}

namespace {
// Whether the plan is for the CUDA ops' layouts (training.device cuda,
// resolved; fp32, not the double-precision checks).
bool cuda_layouts(const Config& cfg, int real_bytes) {
  return real_bytes == 4 && cfg.training.device == DeviceKind::cuda;
}
}  // namespace

namespace {
// What every bf16 attention buffer (attention_output_bf16 and the two
// below) needs: a CUDA device attending in bf16 at sp 1, the hash rounds
// attended together, head widths a multiple of 8, every layer attending in
// chunks.
bool bf16_attention_buffers(const Config& cfg, int sp, int real_bytes) {
  if (!cuda_layouts(cfg, real_bytes) || cfg.attention.precision != AttentionPrecision::bf16 ||
      sp != 1 || cfg.head_dim() % 8 != 0 || cfg.model.max_len <= cfg.attention.bucket_size ||
      attention_by_round(cfg, sp, real_bytes))
    return false;
  for (int l = 0; l < cfg.model.n_layers; ++l)
    if (cfg.attention_kind(l) == AttentionKind::full) return false;
  return true;
}
}  // namespace

bool attention_output_bf16(const Config& cfg, int sp, int real_bytes) {
  const char* env = "REFORMER_BF16_ATTENTION_OUTPUT";
  return switch_from_env(env, std::getenv(env)) && bf16_attention_buffers(cfg, sp, real_bytes);
}

namespace {
// What attention_gradients_bf16 and attention_operands_bf16 both need: the
// above, every layer an LSH layer of two or more hash rounds, and the
// projections fused (d_model a multiple of 8 of at most kLayernormBf16MaxC).
bool bf16_lsh_buffers(const Config& cfg, int sp, int real_bytes) {
  return bf16_attention_buffers(cfg, sp, real_bytes) && cfg.attention.n_hashes >= 2 &&
         cfg.model.d_model % 8 == 0 && cfg.model.d_model <= kLayernormBf16MaxC &&
         lsh_layer_count(cfg) == cfg.model.n_layers;
}
}  // namespace

bool attention_gradients_bf16(const Config& cfg, int sp, int real_bytes) {
  const char* env = "REFORMER_BF16_ATTENTION_GRADIENTS";
  return switch_from_env(env, std::getenv(env)) && bf16_lsh_buffers(cfg, sp, real_bytes);
}

bool attention_operands_bf16(const Config& cfg, int sp, int real_bytes) {
  const char* env = "REFORMER_BF16_ATTENTION_OPERANDS";
  return switch_from_env(env, std::getenv(env)) && bf16_lsh_buffers(cfg, sp, real_bytes);
}

int64_t stash_elems(const Config& cfg, int64_t n, int real_bytes) {
  if (!cuda_layouts(cfg, real_bytes)) return n;
  return bf16_stash_elems(n);
}

int64_t kept_ln_cols(const Config& cfg, int real_bytes) {
  const int64_t D = cfg.model.d_model;
  if (!cuda_layouts(cfg, real_bytes)) return D;
  return layernorm_ffn_ln_cols(D, cfg.model.d_ff);
}

int64_t kept_attention_staged(const Config& cfg, int real_bytes) {
  if (!cuda_layouts(cfg, real_bytes) || cfg.attention.precision != AttentionPrecision::bf16)
    return 0;
  return (attention_kept_bytes(cfg.model.max_len, cfg.head_dim()) + 3) / 4;
}

FfnStateCols kept_ffn_cols(const Config& cfg, int real_bytes) {
  const int64_t F = cfg.model.d_ff;
  FfnStateCols c{F, F};
  if (cuda_layouts(cfg, real_bytes))
    c = cuda_ffn_state_cols(cfg.model.d_model, F, cfg.model.activation == Activation::relu);
  if (cfg.model.kept_ffn == KeptFfn::pre_activation) c.a = 0;
  return c;
}

Config fit_kept_layers(const Config& cfg, int sp, int64_t device_bytes) {
  const bool kept_auto = cfg.model.kept_layers == kKeptLayersAuto;
  const bool stashed_auto = cfg.model.stashed_layers == kStashedLayersAuto;
  const bool form_auto = cfg.model.kept_attention == KeptAttention::auto_;
  const bool ffn_auto = cfg.model.kept_ffn == KeptFfn::auto_;
  const bool x1_auto = cfg.model.kept_x1 == KeptPart::auto_;
  const bool ln_auto = cfg.model.kept_ln == KeptPart::auto_;
  if (!kept_auto && !stashed_auto && !form_auto && !ffn_auto && !x1_auto && !ln_auto) return cfg;
  Config c = cfg;
  if (kept_auto) c.model.kept_layers = 0;
  if (stashed_auto) c.model.stashed_layers = 0;
  if (device_bytes <= 0) return c;
  const int n = cfg.model.n_layers;
  const bool stashes = stashes_attention(cfg, sp);
  // The forms a kept layer's attention may take here: its whole state
  // where that layout allows it (weighing kKeptStateOverStashed), and its
  // outputs (kKeptOverStashed).
  std::vector<KeptAttention> forms{cfg.model.kept_attention};
  if (form_auto) {
    Config state = cfg;
    state.model.kept_attention = KeptAttention::state;
    forms = {KeptAttention::outputs};
    if (keeps_attention(state, sp)) forms.push_back(KeptAttention::state);
  }
  // And what it keeps of its feed-forward: both halves, or the
  // pre-activation alone (its weight less kActivationRebuildInStashed).
  std::vector<KeptFfn> ffn_forms{cfg.model.kept_ffn};
  if (ffn_auto) ffn_forms = {KeptFfn::both, KeptFfn::pre_activation};
  // And x1, or not (kX1RebuildInStashed less).
  std::vector<KeptPart> x1_forms{cfg.model.kept_x1};
  if (x1_auto) x1_forms = {KeptPart::kept, KeptPart::rebuilt};
  // And its LayerNorm rows, or not (kLnRebuildInStashed less).
  std::vector<KeptPart> ln_forms{cfg.model.kept_ln};
  if (ln_auto) ln_forms = {KeptPart::kept, KeptPart::rebuilt};
  auto fits = [&](int k, int st) {
    c.model.kept_layers = k;
    c.model.stashed_layers = st;
    return double(plan_memory(c, sp).total_bytes()) <= kAutoPassFraction * double(device_bytes);
  };
  // Each candidate count of kept layers with the most stashed layers that
  // fit beside it; the best by what their backward no longer reruns.
  int best_k = c.model.kept_layers, best_s = c.model.stashed_layers;
  KeptAttention best_form = cfg.model.kept_attention;
  KeptFfn best_ffn = cfg.model.kept_ffn;
  KeptPart best_x1 = cfg.model.kept_x1;
  KeptPart best_ln = cfg.model.kept_ln;
  double best = -1;
  const int k_hi = kept_auto ? n : cfg.model.kept_layers, k_lo = kept_auto ? 0 : k_hi;
  for (const KeptAttention form : forms)
    for (const KeptFfn ffn : ffn_forms)
    for (const KeptPart x1 : x1_forms)
    for (const KeptPart ln : ln_forms) {
      c.model.kept_attention = form;
      c.model.kept_ffn = ffn;
      c.model.kept_x1 = x1;
      c.model.kept_ln = ln;
      const double weight =
          (keeps_attention(c, sp) ? kKeptStateOverStashed : kKeptOverStashed) -
          (ffn == KeptFfn::pre_activation ? kActivationRebuildInStashed : 0) -
          (x1 == KeptPart::rebuilt ? kX1RebuildInStashed : 0) -
          (ln == KeptPart::rebuilt ? kLnRebuildInStashed : 0);
      for (int k = k_hi; k >= k_lo; --k) {
        const int s_hi = !stashes        ? 0
                         : stashed_auto ? n - k
                                        : std::min(cfg.model.stashed_layers, n - k);
        const int s_lo = stashed_auto ? 0 : s_hi;
        for (int st = s_hi; st >= s_lo; --st) {
          if (!fits(k, st)) continue;
          const double saved = weight * k + st;
          if (saved > best) {
            best = saved;
            best_k = k;
            best_s = st;
            best_form = form;
            best_ffn = ffn;
            best_x1 = x1;
            best_ln = ln;
          }
          break;
        }
      }
    }
  c.model.kept_layers = best_k;
  c.model.stashed_layers = stashed_auto ? best_s : cfg.model.stashed_layers;
  c.model.kept_attention = best_form;
  c.model.kept_ffn = best_ffn;
  c.model.kept_x1 = best_x1;
  c.model.kept_ln = best_ln;
  return c;
}

Config fit_to_device(const Config& cfg, int sp, int64_t device_bytes) {
  return fit_kept_layers(fit_heads_per_pass(cfg, sp, device_bytes), sp, device_bytes);
}

int64_t longest_length_that_fits(const Config& cfg, int sp, int64_t budget_bytes) {
  // Lengths in steps every rank shares alike (sort mode: whole chunks per rank).
  const int64_t unit = cfg.parallel.sp_mode == SpMode::sort && sp > 1
                           ? int64_t(cfg.attention.bucket_size) * sp
                           : std::lcm<int64_t>(cfg.attention.bucket_size, sp);
  const int64_t g = std::lcm<int64_t>(unit, 2);
  // The plan at k * g positions, or -1 when the configuration refuses it.
  auto total = [&](int64_t k) -> int64_t {
    try {
      return plan_memory(fit_heads_per_pass(with_length(cfg, k * g, "plan"), sp, budget_bytes), sp)
          .total_bytes();
    } catch (const ConfigError&) {
      return -1;
    }
  };
  // The shortest accepted length (short ones may leave a rank less than a chunk).
  int64_t lo = 1;
  while (lo * g <= kMaxLength && lo < 64 && total(lo) < 0) ++lo;
  if (lo * g > kMaxLength || total(lo) < 0 || total(lo) > budget_bytes) return 0;
  int64_t hi = kMaxLength / g;  // lo fits; find the last k that does
  if (total(hi) >= 0 && total(hi) <= budget_bytes) return hi * g;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t t = total(mid);
    (t >= 0 && t <= budget_bytes ? lo : hi) = mid;
  }
  return lo * g;
}

std::string format_bytes(int64_t bytes) {
  char buf[64];
  const double b = double(bytes);
  if (b >= double(int64_t(1) << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", b / double(int64_t(1) << 30));
  else std::snprintf(buf, sizeof buf, "%.1f MiB", b / double(1 << 20));
  return buf;
}

std::string format_plan(const MemoryPlan& plan) {
  std::ostringstream o;
  o << "| buffer | shape | group | copies | MiB |\n| --- | --- | --- | --- | --- |\n";
  char buf[64];
  for (const PlannedBuffer& b : plan.buffers) {
    std::snprintf(buf, sizeof buf, "%.1f", double(b.bytes()) / double(1 << 20));
    o << "| " << b.name << " | " << b.shape << " | " << to_string(b.group) << " | " << b.copies
      << " | " << buf << " |\n";
  }
  o << "\n";
  for (PlanGroup g : {PlanGroup::parameters, PlanGroup::optimizer, PlanGroup::activations,
                      PlanGroup::chunks, PlanGroup::workspace})
    o << to_string(g) << ": " << format_bytes(plan.bytes(g)) << "\n";
  o << "peak of a training step (one rank): " << format_bytes(plan.total_bytes()) << "\n";
  return o.str();
}

int64_t parse_bytes(const std::string& text, const std::string& what) {
  const auto bad = [&]() {
    return ConfigError(what + ": '" + text + "' is not a size (e.g. 141GiB, 80G, 512MiB)");
  };
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    throw bad();
  }
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) throw bad();
  std::string unit = text.substr(used);
  int shift = 0;
  if (!unit.empty()) {
    const std::string units = "KMGT";
    const size_t at = units.find(char(std::toupper(static_cast<unsigned char>(unit[0]))));
    if (at == std::string::npos) throw bad();
    shift = 10 * int(at + 1);
    const std::string rest = unit.substr(1);
    if (!rest.empty() && rest != "iB" && rest != "B" && rest != "ib" && rest != "b") throw bad();
  }
  const double bytes = v * std::ldexp(1.0, shift);
  if (!std::isfinite(bytes) || bytes < 1 || bytes > 9.0e18) throw bad();
  return int64_t(bytes);
}

std::string plan_advice(const Config& cfg, int sp, int64_t device_bytes, int sharers) {
  const MemoryPlan plan = plan_memory(cfg, sp);
  sharers = std::max(sharers, 1);
  std::string s = "the memory plan (reformer plan) says a step at model.max_len = " +
                  std::to_string(cfg.model.max_len) +
                  (sp > 1 ? " with parallel.sp = " + std::to_string(sp) : "") + " needs " +
                  format_bytes(plan.total_bytes()) + (sharers > 1 ? " per rank" : " per GPU");
  if (device_bytes > 0) {
    const int64_t share = device_bytes / sharers;
    const int64_t fits = longest_length_that_fits(cfg, sp, share);
    s += "; the longest max_len that fits in " + format_bytes(share) +
         (sharers > 1 ? " (the GPU's " + format_bytes(device_bytes) + " shared by " +
                            std::to_string(sharers) + " ranks)"
                      : std::string()) +
         " is " +
         (fits > 0 ? std::to_string(fits) : std::string("none (the model alone does not fit)"));
  }
  return s;
}

void rethrow_with_plan(const OutOfMemoryError& e, const Config& cfg, int sp, int sharers) {
  throw OutOfMemoryError(
      std::string(e.what()) + "\n" + plan_advice(cfg, sp, e.total_bytes, sharers), e.requested,
      e.free_bytes, e.total_bytes);
}

}  // namespace reformer
