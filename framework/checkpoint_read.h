// Internal to the checkpoint module: the validating reader's scan of one file,
// shared by read_checkpoint (strict: the first problem is thrown) and
// inspect_checkpoint (collecting: every problem is recorded).
#pragma once

#include <string>
#include <vector>

#include "framework/checkpoint.h"

namespace reformer::ckpt {

// One dataset as seen by a scan.
struct DatasetInfo {
  std::string full;            // "/model/<name>" or "/optimizer/<state>/<name>"
  std::vector<int64_t> shape;  // empty when unknown
  std::string dtype = "?";     // e.g. "float32"
  bool ok = false;             // read through its checksum and passed every check
  std::string problem;         // why not ok
};

// Everything a scan of one file found. `problems` empty means the file is valid.
struct Scan {
  CheckpointState state;
  int64_t format_version = -1;
  std::string format;
  std::string build_version;
  std::vector<DatasetInfo> datasets;
  std::vector<std::string> problems;
  bool opened = false;
};


// Checks and reads the file at `path` into `scan`. First proves the file whole
// (checkpoint_seal.h); HDF5 opens only a file that passes. Strict: the first
// problem is thrown as a Problem. Collecting: every problem found is recorded
// and the scan goes on where it can (never into HDF5 for a file not proven whole).
void scan_file(const std::string& path, bool strict, Scan& scan);

}  // namespace reformer::ckpt
