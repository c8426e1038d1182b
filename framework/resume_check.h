// Resuming under a changed configuration: the checkpoint stores the resolved
// configuration of the run that wrote it; a run that resumes from it is
// compared with it key by key, and each key that differs is treated by its
// class (one table, resume_check.cpp).
#pragma once

#include <string>
#include <vector>

#include "framework/config.h"

namespace reformer {

// What a changed key means for a resumed run.
enum class ResumeChange {
  silent,  // not reported: says how this run starts (checkpoint.resume, checkpoint.allow_changes)
  info,    // reported; the run continues as it would have (training.steps, logging.*,
           // checkpoint.every/keep/dir, parallel.*: a checkpoint resumes under any layout)
  warn,    // reported as a warning and allowed: a legitimate change that makes the rest of
           // the run differ from the uninterrupted one (learning rate, schedule, clipping)
  refuse,  // refused unless checkpoint.allow_changes: the run would not continue the
           // checkpoint's (seed, batch size, the sampled data stream, the model's function)
  shape,   // as refuse; with checkpoint.allow_changes the checkpoint still loads only when
           // every parameter and optimizer state keeps its shape (model widths, optimizer.name)
};

// The class of dotted `key` (every key of config_keys() has one).
ResumeChange resume_change_class(const std::string& key);

struct ResumeReport {
  // One line per reported key, "resume: optimizer.lr 0.001 -> 0.0005", with
  // a note for warnings; for the logger.
  std::vector<std::string> lines;
  // Keys of class shape that changed, "model.d_ff 64 -> 48": named when the
  // checkpoint then fails to load.
  std::vector<std::string> shape_changes;
};

// Compares the configuration stored in checkpoint `path` (`stored_text`, its
// YAML) with the resuming run's `now`. Throws ConfigError naming every key
// of class refuse or shape that changed, with both values, unless
// now.checkpoint.allow_changes. A stored text that does not parse (a
// checkpoint of another version) is reported in one line and not compared.
ResumeReport check_resume_config(const std::string& stored_text, const Config& now,
                                 const std::string& path);

}  // namespace reformer
