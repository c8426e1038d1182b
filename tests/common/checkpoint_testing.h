// Helpers shared by the checkpoint suites: a scratch directory, whole-file
// byte access, the message of an expected CheckpointError, and a small
// checkpoint state.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mount.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

#include "framework/checkpoint.h"
#include "kernels/errors.h"

namespace reformer::testing_ckpt {

// A fresh directory under /tmp, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/reformer-ckpt-test-XXXXXX";
    const char* p = mkdtemp(tmpl);
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// The CheckpointError message of `fn`, or "" (and a test failure) when it does not throw one.
template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a CheckpointError";
  return "";
}

// A tmpfs of `size` (e.g. "600k") mounted on the existing directory `path`
// for the object's lifetime; ok() is false where mounting is not permitted
// (not root, no CAP_SYS_ADMIN), and the test should skip.
class TmpfsMount {
 public:
  TmpfsMount(const std::string& path, const std::string& size, bool read_only = false)
      : path_(path) {
    const std::string opts = "size=" + size;
    ok_ = ::mount("tmpfs", path.c_str(), "tmpfs", read_only ? MS_RDONLY : 0, opts.c_str()) == 0;
  }
  ~TmpfsMount() {
    if (ok_) ::umount2(path_.c_str(), MNT_DETACH);
  }
  TmpfsMount(const TmpfsMount&) = delete;
  TmpfsMount& operator=(const TmpfsMount&) = delete;
  bool ok() const { return ok_; }

 private:
  std::string path_;
  bool ok_ = false;
};

// A small valid AdamW state: three parameters, their m and v, values i * 0.25 + salt.
inline CheckpointState small_state(int64_t step) {
  CheckpointState s;
  s.step = step;
  s.tokens_seen = 64 * step;
  s.samples_drawn = 4 * step;
  s.seed = 7;
  s.config_text = "model:\n  d_model: 8\n";
  s.optimizer_name = "adamw";
  auto t = [](const char* name, std::vector<int64_t> shape, float salt) {
    CheckpointTensor x{name, shape, {}};
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    for (int64_t i = 0; i < n; ++i) x.data.push_back(0.25f * static_cast<float>(i) + salt);
    return x;
  };
  s.model = {t("embed", {16, 8}, 1), t("w", {8, 8}, 2), t("g", {8}, 3)};
  s.optimizer = {{"m", {t("embed", {16, 8}, 4), t("w", {8, 8}, 5), t("g", {8}, 6)}},
                 {"v", {t("embed", {16, 8}, 7), t("w", {8, 8}, 8), t("g", {8}, 9)}}};
  return s;
}

}  // namespace reformer::testing_ckpt
