// The checkpoint module's reliability promises (docs/reliability.md): files
// proven whole before HDF5 reads them, a full disk leaving older checkpoints
// and a clean error, no NaN/Inf in files, a directory named like a
// checkpoint or a huge step not breaking saves and resume, and the
// writability check and lock of a checkpoint directory.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <sstream>

#include "framework/checkpoint.h"
#include "framework/checkpoint_seal.h"
#include "kernels/errors.h"
#include "tests/common/checkpoint_testing.h"

namespace fs = std::filesystem;
using namespace reformer;
using namespace reformer::testing_ckpt;

namespace {

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Writes `value` at element 0 of dataset `name` of a checkpoint and seals the
// file again: a checkpoint whose bytes are whole but whose values are not.
void poke(const std::string& path, const char* name, float value) {
  ckpt::unseal_file(path);
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  ASSERT_GE(d, 0) << name;
  hid_t space = H5Dget_space(d);
  const hsize_t at[1][2] = {{0, 0}};
  H5Sselect_elements(space, H5S_SELECT_SET, 1, &at[0][0]);
  hsize_t one = 1;
  hid_t mem = H5Screate_simple(1, &one, nullptr);
  ASSERT_GE(H5Dwrite(d, H5T_NATIVE_FLOAT, mem, space, H5P_DEFAULT, &value), 0);
  H5Sclose(mem);
  H5Sclose(space);
  H5Dclose(d);
  H5Fclose(f);
  ckpt::seal_file(path);
}

}  // namespace

TEST(CheckpointSeal, Crc64IsCrc64XzAndChains) {
  EXPECT_EQ(ckpt::crc64(0, "123456789", 9), 0x995dc9bbdf1939faull);
  const std::string text = "the quick brown fox jumps over the lazy dog, twice over";
  const uint64_t whole = ckpt::crc64(0, text.data(), text.size());
  EXPECT_EQ(ckpt::crc64(ckpt::crc64(0, text.data(), 13), text.data() + 13, text.size() - 13),
            whole);
}

// One corrupt byte in a link record (in a fractal heap, which has no checksum
// of its own) used to crash libhdf5 while it walked the file.
TEST(CheckpointSeal, DamagedLinkRecordIsRefusedBeforeHdf5ReadsIt) {
  TempDir dir;
  save_checkpoint(dir.path(), small_state(1), 5);
  const std::string path = checkpoint_path(dir.path(), 2);
  save_checkpoint(dir.path(), small_state(2), 5);
  std::string bytes = read_bytes(path);
  const size_t at = bytes.find(std::string("\x05" "embed", 6));
  ASSERT_NE(at, std::string::npos);
  bytes[at + 20] = static_cast<char>(bytes[at + 20] ^ 0x30);
  write_bytes(path, bytes);
  EXPECT_TRUE(has(error_of([&] { read_checkpoint(path); }), path + ": fails its whole-file checksum"));
  std::ostringstream report;
  EXPECT_FALSE(inspect_checkpoint(path, report));
  EXPECT_TRUE(has(report.str(), "fails its whole-file checksum")) << report.str();
  std::vector<std::string> notes;
  EXPECT_EQ(find_resumable(dir.path(), &notes), checkpoint_path(dir.path(), 1));
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_TRUE(has(notes[0], "ckpt-00000002.h5: fails its whole-file checksum")) << notes[0];
}

TEST(CheckpointSeal, FooterDamageAndFormatOneFilesAreRefused) {
  TempDir dir;
  const std::string path = dir / "a.h5";
  write_checkpoint(path, small_state(3));
  const std::string bytes = read_bytes(path);
  // The footer's own fields: a damaged length, version or CRC byte.
  for (size_t back : {size_t(16), size_t(24), size_t(1)}) {
    std::string b = bytes;
    b[b.size() - back] = static_cast<char>(b[b.size() - back] ^ 0x01);
    write_bytes(path, b);
    EXPECT_NE(error_of([&] { read_checkpoint(path); }), "") << back;
  }
  // Without its footer the file is what format 1 wrote: refused with a reason.
  write_bytes(path, bytes.substr(0, bytes.size() - ckpt::kFooterSize));
  EXPECT_TRUE(has(error_of([&] { read_checkpoint(path); }), "format version 1"));
  // Bytes appended after the footer move it away from the end.
  write_bytes(path, bytes + "extra");
  EXPECT_TRUE(has(error_of([&] { read_checkpoint(path); }), "no checksum footer"));
}

TEST(CheckpointDiskFull, SaveFailsCleanlyAndOlderCheckpointsSurvive) {
  TempDir dir;
  fs::create_directories(dir / "t");
  TmpfsMount tmpfs(dir / "t", "600k");
  if (!tmpfs.ok()) GTEST_SKIP() << "cannot mount a tmpfs here (needs root)";
  CheckpointState s = small_state(1);
  s.model.push_back({"big", {200, 256}, std::vector<float>(51200, 0.5f)});  // ~200 KiB a file
  const std::string ck = dir / "t/ck";
  std::string error;
  int64_t step = 1;
  for (; step <= 6 && error.empty(); ++step) {
    s.step = step;
    try {
      save_checkpoint(ck, s, 0);
    } catch (const CheckpointError& e) {
      error = e.what();
    }
  }
  ASSERT_FALSE(error.empty()) << "the tmpfs never filled up";
  EXPECT_TRUE(has(error, "No space left on device")) << error;
  EXPECT_FALSE(fs::exists(checkpoint_path(ck, step - 1) + ".tmp"));
  EXPECT_EQ(find_resumable(ck, nullptr), checkpoint_path(ck, step - 2));
  EXPECT_EQ(read_checkpoint(checkpoint_path(ck, 1)).step, 1);
}

TEST(CheckpointNonFinite, WriterRefusesNamingTheTensorAndKeepsTheGoodFiles) {
  TempDir dir;
  save_checkpoint(dir.path(), small_state(1), 1);
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    CheckpointState s = small_state(2);
    s.optimizer[1].second[1].data[3] = bad;  // /optimizer/v/w
    const std::string msg = error_of([&] { save_checkpoint(dir.path(), s, 1); });
    EXPECT_TRUE(has(msg, "refusing to write: tensor /optimizer/v/w holds a non-finite value (")) << msg;
    EXPECT_TRUE(has(msg, "at index 3)")) << msg;
  }
  CheckpointState s = small_state(2);
  s.model[0].data[0] = std::nanf("");
  EXPECT_TRUE(has(error_of([&] { write_checkpoint(dir / "x.h5", s); }), "/model/embed"));
  EXPECT_EQ(find_resumable(dir.path(), nullptr), checkpoint_path(dir.path(), 1));
  EXPECT_FALSE(fs::exists(checkpoint_path(dir.path(), 2)));
  EXPECT_FALSE(fs::exists(dir / "x.h5"));
}

TEST(CheckpointNonFinite, ReaderInspectAndResumeRefuseAFileHoldingNaNOrInf) {
  TempDir dir;
  save_checkpoint(dir.path(), small_state(1), 5);
  save_checkpoint(dir.path(), small_state(2), 5);
  save_checkpoint(dir.path(), small_state(3), 5);
  poke(checkpoint_path(dir.path(), 3), "/optimizer/m/g", std::nanf(""));
  poke(checkpoint_path(dir.path(), 2), "/model/w", -std::numeric_limits<float>::infinity());
  const std::string msg = error_of([&] { read_checkpoint(checkpoint_path(dir.path(), 3)); });
  EXPECT_TRUE(has(msg, "dataset /optimizer/m/g holds a non-finite value (NaN at index 0)")) << msg;
  std::ostringstream report;
  EXPECT_FALSE(inspect_checkpoint(checkpoint_path(dir.path(), 2), report));
  EXPECT_TRUE(has(report.str(), "FAILED (dataset /model/w holds a non-finite value (-Inf at index 0))"))
      << report.str();
  std::vector<std::string> notes;
  EXPECT_EQ(find_resumable(dir.path(), &notes), checkpoint_path(dir.path(), 1));
  EXPECT_EQ(notes.size(), 2u);
}

TEST(CheckpointStore, DirectoryNamedLikeACheckpointBreaksNothing) {
  TempDir dir;
  fs::create_directories(dir / "ckpt-00000001.h5/inside");
  fs::create_directories(dir / "ckpt-00000002.h5.tmp/inside");
  for (int64_t step = 3; step <= 5; ++step)
    EXPECT_EQ(save_checkpoint(dir.path(), small_state(step), 1), std::vector<std::string>{});
  EXPECT_TRUE(fs::is_directory(dir / "ckpt-00000001.h5/inside"));
  EXPECT_FALSE(fs::exists(checkpoint_path(dir.path(), 4)));
  std::vector<std::string> notes;
  EXPECT_EQ(find_resumable(dir.path(), &notes), checkpoint_path(dir.path(), 5));
}

TEST(CheckpointStore, StepsUpToInt64MaxGetNamesResumeFinds) {
  TempDir dir;
  const int64_t huge = std::numeric_limits<int64_t>::max();
  CheckpointState s = small_state(1);
  save_checkpoint(dir.path(), s, 0);
  s.step = huge - 1;
  save_checkpoint(dir.path(), s, 0);
  s.step = huge;
  save_checkpoint(dir.path(), s, 0);
  EXPECT_EQ(checkpoint_path("d", huge), "d/ckpt-9223372036854775807.h5");
  write_bytes(dir / "ckpt-99999999999999999999.h5", "beyond int64: not a checkpoint name");
  EXPECT_EQ(find_resumable(dir.path(), nullptr), checkpoint_path(dir.path(), huge));
  EXPECT_EQ(read_checkpoint(checkpoint_path(dir.path(), huge)).step, huge);
}

TEST(CheckpointStore, WritableCheckCreatesOrExplains) {
  TempDir dir;
  EXPECT_NO_THROW(check_checkpoint_dir_writable(dir / "new/deeper"));
  EXPECT_TRUE(fs::is_directory(dir / "new/deeper"));
  EXPECT_TRUE(fs::is_empty(dir / "new/deeper"));  // the probe is removed
  write_bytes(dir / "file", "x");
  EXPECT_TRUE(has(error_of([&] { check_checkpoint_dir_writable(dir / "file"); }),
                  "checkpoint directory " + dir / "file"));
  EXPECT_TRUE(has(error_of([&] { check_checkpoint_dir_writable(dir / "file/sub"); }),
                  "cannot be created"));
  fs::create_directories(dir / "ro");
  TmpfsMount ro(dir / "ro", "64k", /*read_only*/ true);
  if (!ro.ok()) GTEST_SKIP() << "cannot mount a tmpfs here (needs root)";
  EXPECT_TRUE(has(error_of([&] { check_checkpoint_dir_writable(dir / "ro"); }),
                  "checkpoint directory " + dir / "ro" + " is not writable: Read-only file system"));
}

TEST(CheckpointStore, DirLockExcludesASecondRunNamingThePid) {
  TempDir dir;
  const std::string ck = dir / "ck";
  {
    CheckpointDirLock lock(ck);
    EXPECT_TRUE(lock.held());
    EXPECT_EQ(error_of([&] { CheckpointDirLock again(ck); }),
              "checkpoint directory " + ck + " is in use by another run (pid " +
                  std::to_string(getpid()) + ")");
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      try {
        CheckpointDirLock other(ck);
      } catch (const CheckpointError&) {
        _exit(7);
      }
      _exit(0);
    }
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 7) << "another process took the lock";
  }
  EXPECT_NO_THROW(CheckpointDirLock after(ck));  // released with its owner
}
