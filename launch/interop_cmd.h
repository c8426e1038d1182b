// `reformer export` and `reformer import`: HuggingFace interop
// (framework/hf_interop.h, docs/hf-interop.md).
#pragma once

#include "launch/cli.h"

namespace reformer {

// Parse argv[2..] and run the command: print the help and return 0 for
// --help; otherwise write the output and print one line saying where.
// Throw UsageError for a bad command line, CheckpointError for an
// unreadable or damaged input or a failed write, ConfigError for a model the
// other side cannot express.
int cmd_export(int argc, char** argv);
int cmd_import(int argc, char** argv);

}  // namespace reformer
