// The checkpoint directory: file names, save with pruning, choosing the file
// to resume from, the writability check and the lock of a run.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "framework/checkpoint.h"
#include "kernels/errors.h"

namespace reformer {
namespace {

namespace fs = std::filesystem;

constexpr const char* kLockName = ".lock";

// Step in a name "ckpt-<digits><suffix>" (up to 19 digits, at most
// INT64_MAX), or -1.
int64_t parse_step(const std::string& filename, const std::string& suffix) {
  const std::string prefix = "ckpt-";
  if (filename.size() <= prefix.size() + suffix.size()) return -1;
  if (filename.compare(0, prefix.size(), prefix) != 0) return -1;
  if (filename.compare(filename.size() - suffix.size(), suffix.size(), suffix) != 0) return -1;
  const std::string digits =
      filename.substr(prefix.size(), filename.size() - prefix.size() - suffix.size());
  if (digits.empty() || digits.size() > 19) return -1;
  int64_t step = 0;
  for (char ch : digits) {
    if (ch < '0' || ch > '9') return -1;
    if (__builtin_mul_overflow(step, 10, &step) || __builtin_add_overflow(step, ch - '0', &step))
      return -1;
  }
  return step;
}

struct Listed {
  int64_t step;
  std::string path;
  bool regular;  // a regular file (a directory or other object may carry the name too)
};

// The entries of `dir` named ckpt-<step><suffix>, newest (largest step) first.
std::vector<Listed> list_dir(const std::string& dir, const std::string& suffix) {
  std::vector<Listed> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const int64_t step = parse_step(name, suffix);
    std::error_code type_ec;
    if (step >= 0) out.push_back({step, it->path().string(), it->is_regular_file(type_ec)});
  }
  if (ec) throw CheckpointError(dir + ": cannot list the directory: " + ec.message());
  std::sort(out.begin(), out.end(), [](const Listed& a, const Listed& b) {
    return a.step != b.step ? a.step > b.step : a.path > b.path;
  });
  return out;
}

// Removes the regular files among `files`; one warning per failure.
void remove_files(const std::vector<Listed>& files, std::vector<std::string>& warnings) {
  for (const auto& f : files) {
    std::error_code ec;
    if (f.regular && !fs::remove(f.path, ec) && ec)
      warnings.push_back("could not remove " + f.path + ": " + ec.message());
  }
}

}  // namespace

std::string checkpoint_path(const std::string& dir, int64_t step) {
  if (step < 0) throw CheckpointError("checkpoint step " + std::to_string(step) + " is negative");
  std::string digits = std::to_string(step);
  if (digits.size() < 8) digits.insert(0, 8 - digits.size(), '0');
  return (fs::path(dir) / ("ckpt-" + digits + ".h5")).string();
}

std::vector<std::string> save_checkpoint(const std::string& dir, const CheckpointState& state,
                                         int keep) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw CheckpointError(dir + ": cannot create the checkpoint directory: " + ec.message());
  const std::string path = checkpoint_path(dir, state.step);
  write_checkpoint(path, state);

  // The new file is complete and durable; now prune. Nothing here fails the save.
  std::vector<std::string> warnings;
  try {
    if (keep >= 1) {
      std::vector<Listed> older;
      int kept = 1;  // the file just written
      for (auto& f : list_dir(dir, ".h5")) {
        if (f.step >= state.step || !f.regular) continue;
        if (kept < keep)
          ++kept;
        else
          older.push_back(std::move(f));
      }
      remove_files(older, warnings);
    }
    remove_files(list_dir(dir, ".h5.tmp"), warnings);
  } catch (const CheckpointError& e) {
    warnings.push_back(e.what());
  }
  if (checkpoint_stage_hook) checkpoint_stage_hook("pruned");
  return warnings;
}

std::optional<std::string> find_resumable(const std::string& dir, std::vector<std::string>* notes) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return std::nullopt;
  for (const auto& f : list_dir(dir, ".h5")) {
    try {
      const CheckpointState s = read_checkpoint(f.path);
      if (s.step == f.step) return f.path;
      if (notes)
        notes->push_back(f.path + ": its step attribute is " + std::to_string(s.step) +
                         ", not the " + std::to_string(f.step) + " in its name");
    } catch (const CheckpointError& e) {
      if (notes) notes->push_back(e.what());
    }
  }
  return std::nullopt;
}

void check_checkpoint_dir_writable(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    throw CheckpointError("checkpoint directory " + dir + " cannot be created: " + ec.message());
  if (!fs::is_directory(dir, ec))
    throw CheckpointError("checkpoint directory " + dir + " is not a directory");
  const std::string probe = (fs::path(dir) / (".write-test-" + std::to_string(::getpid()))).string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    throw CheckpointError("checkpoint directory " + dir + " is not writable: " +
                          std::strerror(errno));
  const bool wrote = ::write(fd, "x", 1) == 1;
  const int err = errno;
  ::close(fd);
  ::unlink(probe.c_str());
  if (!wrote)
    throw CheckpointError("checkpoint directory " + dir + " is not writable: " +
                          std::strerror(err));
}

CheckpointDirLock::CheckpointDirLock(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  const std::string path = (fs::path(dir) / kLockName).string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw CheckpointError("checkpoint directory " + dir + ": cannot create the lock file " +
                          path + ": " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EWOULDBLOCK) {
      char buf[32] = {};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
      pid.erase(std::remove(pid.begin(), pid.end(), '\n'), pid.end());
      ::close(fd_);
      fd_ = -1;
      throw CheckpointError("checkpoint directory " + dir + " is in use by another run (pid " +
                            (pid.empty() ? "unknown" : pid) + ")");
    }
    // File systems without flock (some cluster mounts): run unlocked.
    ::close(fd_);
    fd_ = -1;
    return;
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
    // The lock is held; only the pid shown to a second run is missing.
  }
}

CheckpointDirLock::~CheckpointDirLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace reformer
