// Training checkpoints in HDF5: one self-describing file per checkpoint.
//
// Layout (docs/checkpoint-format.md has the full description):
//   /                      attributes: format, format_version, step, tokens_seen,
//                          samples_drawn, seed, dp, sp, config, optimizer, build_version
//   /model/<name>          one fp32 dataset per parameter
//   /optimizer/<state>/<name>   one fp32 dataset per parameter and optimizer state
//   then a 32-byte footer holding a CRC-64 of every byte before it.
// The footer proves a file whole before libhdf5 reads any of it; every dataset
// also carries HDF5's Fletcher-32 filter. Files are written atomically
// (temporary file, fsync, rename, fsync of the directory); resume picks the
// newest file that validates. Values are finite: NaN and Inf are refused on
// write and on read.
//
// All functions report failure by throwing CheckpointError whose message names
// the file and the problem; none prints (except inspect_checkpoint, into the
// stream it is given) and none exits. Every entry point turns HDF5's own
// error printing off for the process. Not thread-safe (serial HDF5): call
// from one thread, and, in a distributed run, from one rank.
//
// Code: checkpoint_write.cpp (writer), checkpoint_read.cpp (validating
// reader, check_matches), checkpoint_store.cpp (directory: names, save and
// prune, resume choice, writability, lock), checkpoint_inspect.cpp,
// checkpoint_seal.{h,cpp} (footer), checkpoint_hdf5.{h,cpp} (HDF5 handles
// and errors). Optimizer-state shape rules: framework/optimizer.h.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace reformer {

// One named tensor of a checkpoint.
struct CheckpointTensor {
  std::string name;            // parameter name, e.g. "layers.0.attn.wqk"; no '/', not "." or ".."
  std::vector<int64_t> shape;  // row-major, rank >= 1, every dim >= 0
  std::vector<float> data;     // product(shape) values
};

// Everything a run needs to continue exactly where it stopped.
struct CheckpointState {
  int64_t step = 0;                     // optimizer steps completed
  int64_t tokens_seen = 0;              // training tokens consumed over all ranks
  int64_t samples_drawn = 0;            // data sampler position (sequences drawn over all ranks)
  uint64_t seed = 0;                    // run seed (all random streams are counter-based on it)
  int dp = 1, sp = 1;                   // world layout the file was written under
  std::string config_text;              // resolved YAML config
  std::string optimizer_name;           // "adamw" | "adafactor"
  std::vector<CheckpointTensor> model;  // -> /model/<name>, order preserved
  // Optimizer state name ("m", "v", "vr", "vc") -> tensors named like the
  // parameters they belong to; -> /optimizer/<state>/<name>, order preserved.
  std::vector<std::pair<std::string, std::vector<CheckpointTensor>>> optimizer;
};

// Writes `state` to `path` atomically: the HDF5 file is built in memory, then
// written with its checksum footer to `path + ".tmp"`, fsynced, renamed onto
// `path`, and the directory fsynced. On failure (a full disk included) the
// temporary file is removed and `path` is untouched. Refuses (before creating
// anything) a state with an empty, duplicate or '/'-containing tensor name, a
// rank-0 shape, a negative dim, data.size() != product(shape), a NaN or Inf
// value ("tensor /model/x holds a non-finite value (NaN at index 3)"), a
// negative counter, or dp/sp < 1.
void write_checkpoint(const std::string& path, const CheckpointState& state);

// Reads and fully validates a file: first proves it whole by its checksum
// footer (without HDF5), then opens it as HDF5, checks the format and
// format_version attributes and the presence and type of every required
// attribute, and reads every dataset through its Fletcher-32 filter (a dataset
// without the filter, or not fp32, or holding NaN/Inf, is refused). Throws
// CheckpointError naming the file and the problem, e.g. "<path>: fails its
// whole-file checksum (...)", "<path>: dataset /model/x fails its checksum",
// "<path>: not an HDF5 file", "<path>: truncated or unreadable (...)".
// A missing parameter can only be detected against expectations: see check_matches.
CheckpointState read_checkpoint(const std::string& path);

// Refuses (CheckpointError) a state whose model tensors do not match `expected`
// (parameter name -> shape): a shape mismatch names the parameter and both
// shapes ("parameter a has shape [64, 32] in the checkpoint but [64, 64] in the
// model"); a missing or extra parameter is named. Optimizer states must
// follow optimizer_state_shape_problems (framework/optimizer.h).
void check_matches(const CheckpointState& state,
                   const std::vector<std::pair<std::string, std::vector<int64_t>>>& expected);

// "<dir>/ckpt-<step zero-padded to 8 digits>.h5" (more digits when needed, up
// to the 19 of INT64_MAX; find_resumable reads every width). Throws for a
// negative step.
std::string checkpoint_path(const std::string& dir, int64_t step);

// Creates `dir` if needed and writes checkpoint_path(dir, state.step)
// atomically (write_checkpoint); throws CheckpointError when that fails. Only
// after the new file is complete: deletes the ckpt-*.h5 files with a smaller
// step beyond the newest `keep` files (the new one counts; files with a larger
// step are left alone; keep < 1 keeps everything), and removes leftover
// ckpt-*.h5.tmp files of crashed writes. Entries that are not regular files
// are never touched. Cleanup never fails the save: each problem is returned
// as one warning line ("could not remove <path>: <why>") for the caller to log.
std::vector<std::string> save_checkpoint(const std::string& dir, const CheckpointState& state,
                                         int keep);

// The newest ckpt-<step>.h5 in `dir` (by the step in its name) that
// read_checkpoint accepts and whose step attribute equals the step in its name.
// When `notes` is non-null it gets one line per file passed over, "<path>: <why>"
// (e.g. "<dir>/ckpt-00000300.h5: dataset /model/x fails its checksum").
// std::nullopt when there is none, or `dir` does not exist; throws
// CheckpointError only when `dir` exists but cannot be listed. Reads every
// candidate in full (that is the validation), newest first, until one passes.
std::optional<std::string> find_resumable(const std::string& dir, std::vector<std::string>* notes);

// Human-readable report for `reformer inspect`: format version, build, step,
// tokens, samples, seed, dp x sp, optimizer, the first lines of the config,
// parameter count and a table of datasets (name, shape, dtype, checksum
// ok/FAILED). Returns true iff read_checkpoint would accept the file. Never
// throws for a damaged or missing file: reports what it can and returns false.
bool inspect_checkpoint(const std::string& path, std::ostream& out);

// Creates `dir` if needed and proves a file can be created and written there
// (then removed). Throws CheckpointError "checkpoint directory <dir> is not
// writable: <why>" (or "cannot be created", "is not a directory"). Call before
// training so a run does not fail at its first checkpoint.
void check_checkpoint_dir_writable(const std::string& dir);

// Holds an exclusive flock on "<dir>/.lock" (creating `dir` and the file if
// needed) for its lifetime, with this process's pid written in the file, so
// two runs never write the same directory. Throws CheckpointError "checkpoint
// directory <dir> is in use by another run (pid <P>)" when another process
// (or another lock object) holds it. On a file system without flock it holds
// nothing (held() is false). The lock file is left in place.
class CheckpointDirLock {
 public:
  explicit CheckpointDirLock(const std::string& dir);
  ~CheckpointDirLock();
  CheckpointDirLock(const CheckpointDirLock&) = delete;
  CheckpointDirLock& operator=(const CheckpointDirLock&) = delete;
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// Test hook: when set, called with a stage name during write_checkpoint
// ("created", "model_written", "optimizer_written", "closed", "fsynced",
// "renamed") and save_checkpoint ("pruned"); a test may SIGKILL the process there.
extern void (*checkpoint_stage_hook)(const char* stage);

}  // namespace reformer
