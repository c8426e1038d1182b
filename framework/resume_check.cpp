#include "framework/resume_check.h"

#include <utility>

#include "kernels/errors.h"

namespace reformer {

namespace {

// The class of every key: the first entry that is the key itself or its
// section ("model.") decides. Keys that reach no entry are refused.
const std::vector<std::pair<std::string, ResumeChange>>& resume_classes() {
  using C = ResumeChange;
  static const std::vector<std::pair<std::string, ResumeChange>> table = {
      // Parameter shapes: the checkpoint loads only into a model of its shapes.
      {"model.vocab_size", C::shape}, {"model.d_model", C::shape}, {"model.n_heads", C::shape},
      {"model.d_head", C::shape}, {"model.d_ff", C::shape}, {"model.n_layers", C::shape},
      {"model.axial_shape", C::shape}, {"model.axial_dims", C::shape},
      // Its optimizer state: AdamW's m, v or Adafactor's factored rows and columns.
      {"optimizer.name", C::shape},
      // Used only to initialise parameters, which the checkpoint replaces.
      {"model.init_std", C::info}, {"model.axial_init_std", C::info},
      // Memory knobs: the same function, possibly rounded otherwise.
      {"model.ffn_chunk", C::warn}, {"model.proj_chunk", C::warn}, {"model.loss_chunk", C::warn},
      {"model.attn_heads_per_pass", C::warn}, {"model.attn_rounds_per_pass", C::warn},
      {"model.kept_layers", C::warn},
      {"model.stashed_layers", C::warn},
      {"model.kept_attention", C::warn},
      {"model.kept_ffn", C::warn},
      {"model.kept_x1", C::warn},
      {"model.kept_ln", C::warn},
      // The same function to bf16 rounding of the attention products.
      {"attention.precision", C::warn},
      // The rest of the model (max_len, dropout, activation, ...) and attention
      // (kinds, n_hashes, bucket sizes, ...): another function.
      {"model.", C::refuse}, {"attention.", C::refuse},
      // The update rule: a legitimate change for the rest of the run.
      {"optimizer.", C::warn},
      // The random streams and the batch: every later step would differ.
      {"training.seed", C::refuse}, {"training.batch_size", C::refuse},
      // Another device rounds otherwise (GPU runs resume to within rounding).
      {"training.device", C::warn},
      {"training.", C::info},  // steps, log_every, eval_every, eval_batches, on_nonfinite
      // The same bytes at another path give the same stream.
      {"data.path", C::warn},
      {"data.", C::refuse},  // kind, split, fractions, dup_symbols: another sampled stream
      {"parallel.", C::info},
      {"checkpoint.resume", C::silent}, {"checkpoint.allow_changes", C::silent},
      {"checkpoint.", C::info},
      {"logging.plot", C::info},  // only whether the curves are drawn: the run is the same
      {"logging.", C::info},
  };
  return table;
}

}  // namespace

ResumeChange resume_change_class(const std::string& key) {
  for (const auto& [name, cls] : resume_classes())
    if (key == name || (name.back() == '.' && key.rfind(name, 0) == 0)) return cls;
  return ResumeChange::refuse;
}

ResumeReport check_resume_config(const std::string& stored_text, const Config& now,
                                 const std::string& path) {
  ResumeReport report;
  Config stored;
  try {
    stored = parse_config(stored_text, path + " (stored config)");
  } catch (const ConfigError& e) {
    report.lines.push_back(std::string("resume: the configuration stored in the checkpoint is not "
                                       "compared with this run's: ") + e.what());
    return report;
  }
  const bool allow = now.checkpoint.allow_changes;
  std::vector<std::string> refused;
  for (const ConfigChange& c : config_changes(stored, now)) {
    const ResumeChange cls = resume_change_class(c.key);
    if (cls == ResumeChange::silent) continue;
    const std::string change = c.key + " " + c.before + " -> " + c.after;
    std::string line = "resume: " + change;
    if (cls == ResumeChange::warn)
      line += " (warning: the run goes on differently from the checkpoint's)";
    if (cls == ResumeChange::refuse || cls == ResumeChange::shape) {
      refused.push_back(change);
      if (cls == ResumeChange::shape) report.shape_changes.push_back(change);
      line += cls == ResumeChange::shape
                  ? " (warning: allowed by checkpoint.allow_changes; loads only if no "
                    "parameter or optimizer state changes shape)"
                  : " (warning: not a continuation of the checkpoint's run; allowed by "
                    "checkpoint.allow_changes)";
    }
    report.lines.push_back(line);
  }
  if (!refused.empty() && !allow) {
    std::string keys;
    for (const std::string& r : refused) keys += (keys.empty() ? "" : ", ") + r;
    throw ConfigError("resuming from " + path + " with a changed configuration: " + keys +
                      ": the run would not continue the checkpoint's; set "
                      "checkpoint.allow_changes=true to resume anyway (parameter shapes must "
                      "still match), or start afresh with --resume none");
  }
  return report;
}

}  // namespace reformer
