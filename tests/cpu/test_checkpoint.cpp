// HDF5 checkpoints: bitwise round trip, atomic save and pruning, refusal of
// damaged files with a message naming the problem, resume selection, inspection,
// and a SIGKILL at every stage of a save leaving a resumable directory.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
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

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Distinct values per tensor, including the finite bit patterns a lossy path
// would disturb: -0, subnormals, the largest and smallest floats. (NaN and
// Inf are refused: test_checkpoint_reliability.cpp.)
CheckpointTensor tensor(const std::string& name, std::vector<int64_t> shape, uint32_t salt) {
  CheckpointTensor t{name, std::move(shape), {}};
  const int64_t n = numel(t.shape);
  t.data.resize(n);
  for (int64_t i = 0; i < n; ++i) t.data[i] = static_cast<float>(salt) * 1000.0f + 0.5f * i - 7.25f;
  const float specials[] = {-0.0f, std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::lowest(),
                            std::numeric_limits<float>::max(), 1e-38f,
                            -std::numeric_limits<float>::denorm_min()};
  for (int64_t i = 0; i < n && i < 6; ++i) t.data[i] = specials[i];
  return t;
}

CheckpointState make_state(int64_t step = 100) {
  CheckpointState s;
  s.step = step;
  s.tokens_seen = 123456789012LL + step;
  s.samples_drawn = 987654321LL + step;
  s.seed = 0xFEDCBA9876543210ULL;  // above INT64_MAX: must survive as unsigned
  s.dp = 2;
  s.sp = 4;
  s.config_text = "model:\n  d_model: 64\n  n_layers: 2\noptimizer:\n  name: adamw   # é ü\n";
  s.optimizer_name = "adamw";
  s.model = {tensor("embed", {7, 3}, 1), tensor("layers.0.attn.wqk", {3, 5, 7}, 2),
             tensor("ln.bias", {11}, 3)};
  for (const char* st : {"m", "v"}) {
    std::vector<CheckpointTensor> ts;
    uint32_t salt = st[0] == 'm' ? 10 : 20;
    for (const auto& t : s.model) ts.push_back(tensor(t.name, t.shape, salt++));
    s.optimizer.emplace_back(st, std::move(ts));
  }
  return s;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> expected_of(const CheckpointState& s) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> e;
  for (const auto& t : s.model) e.emplace_back(t.name, t.shape);
  return e;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

void expect_same_tensors(const std::vector<CheckpointTensor>& a,
                         const std::vector<CheckpointTensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].shape, b[i].shape) << a[i].name;
    EXPECT_TRUE(bitwise_equal(a[i].data, b[i].data)) << a[i].name << " differs bitwise";
  }
}

void expect_same_state(const CheckpointState& a, const CheckpointState& b) {
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.tokens_seen, b.tokens_seen);
  EXPECT_EQ(a.samples_drawn, b.samples_drawn);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.dp, b.dp);
  EXPECT_EQ(a.sp, b.sp);
  EXPECT_EQ(a.config_text, b.config_text);
  EXPECT_EQ(a.optimizer_name, b.optimizer_name);
  expect_same_tensors(a.model, b.model);
  ASSERT_EQ(a.optimizer.size(), b.optimizer.size());
  for (size_t i = 0; i < a.optimizer.size(); ++i) {
    EXPECT_EQ(a.optimizer[i].first, b.optimizer[i].first);
    expect_same_tensors(a.optimizer[i].second, b.optimizer[i].second);
  }
}

// A checkpoint with one large tensor "big" of known values; flips one byte in
// the middle of that tensor's raw data, found by searching the file bytes, and
// seals the file again, so that the damage passes the whole-file checksum and
// reaches HDF5's per-chunk Fletcher-32 (the second line of defence).
void write_and_flip(const std::string& path, CheckpointState* state_out = nullptr) {
  CheckpointState s = make_state(5);
  CheckpointTensor big{"big", {300, 1000}, std::vector<float>(300000)};
  for (size_t i = 0; i < big.data.size(); ++i) big.data[i] = 1.0f + static_cast<float>(i);
  s.model.push_back(big);
  write_checkpoint(path, s);
  std::string bytes = read_bytes(path);
  const size_t at = 150000;  // element index in the middle of the tensor
  std::string needle(reinterpret_cast<const char*>(&big.data[at]), 64);
  const size_t pos = bytes.find(needle);
  ASSERT_NE(pos, std::string::npos) << "raw tensor data not found in the file";
  bytes[pos + 6] = static_cast<char>(bytes[pos + 6] ^ 0x5a);
  write_bytes(path, bytes.substr(0, bytes.size() - ckpt::kFooterSize));
  ckpt::seal_file(path);
  if (state_out) *state_out = s;
}

std::vector<std::string> ckpt_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST(Checkpoint, PathIsZeroPaddedStep) {
  EXPECT_EQ(checkpoint_path("/a/b", 100), "/a/b/ckpt-00000100.h5");
  EXPECT_EQ(checkpoint_path("runs", 0), "runs/ckpt-00000000.h5");
  EXPECT_EQ(checkpoint_path("d", 123456789), "d/ckpt-123456789.h5");
  EXPECT_THROW(checkpoint_path("d", -1), CheckpointError);
}

TEST(Checkpoint, RoundTripIsBitwise) {
  TempDir dir;
  const CheckpointState s = make_state();
  const std::string path = dir / "ckpt.h5";
  write_checkpoint(path, s);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const CheckpointState r = read_checkpoint(path);
  expect_same_state(s, r);
  EXPECT_NO_THROW(check_matches(r, expected_of(s)));
  // No timestamps in the file: the same state always gives the same bytes.
  write_checkpoint(dir / "again.h5", s);
  EXPECT_EQ(read_bytes(path), read_bytes(dir / "again.h5"));
}

TEST(Checkpoint, RoundTripLargeTensorsAcrossChunks) {
  TempDir dir;
  CheckpointState s = make_state(7);
  s.model.push_back(tensor("big2d", {1100, 1000}, 4));     // 1.1M: two chunks along dim 0
  s.model.push_back(tensor("big1d", {(1 << 20) + 7}, 5));  // partial last chunk
  s.model.push_back(tensor("wide_row", {2, 1200000}, 6));  // one row exceeds the cap
  s.optimizer[0].second.push_back(tensor("big2d", {1100, 1000}, 7));
  const std::string path = dir / "big.h5";
  write_checkpoint(path, s);
  expect_same_state(s, read_checkpoint(path));
}

TEST(Checkpoint, DatasetsAreChunkedLittleEndianFp32WithFletcher32) {
  TempDir dir;
  CheckpointState s = make_state();
  s.model.push_back(tensor("big2d", {1100, 1000}, 4));
  const std::string path = dir / "layout.h5";
  write_checkpoint(path, s);
  hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  for (const char* name : {"/model/embed", "/model/big2d", "/optimizer/v/layers.0.attn.wqk"}) {
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT);
    ASSERT_GE(d, 0) << name;
    hid_t dcpl = H5Dget_create_plist(d);
    EXPECT_EQ(H5Pget_layout(dcpl), H5D_CHUNKED) << name;
    hsize_t chunk[8] = {};
    const int rank = H5Pget_chunk(dcpl, 8, chunk);
    hsize_t elems = 1;
    for (int i = 0; i < rank; ++i) elems *= chunk[i];
    EXPECT_LE(elems, hsize_t(1) << 20) << name;
    unsigned flags = 0;
    size_t ncd = 0;
    EXPECT_GE(H5Pget_filter_by_id2(dcpl, H5Z_FILTER_FLETCHER32, &flags, &ncd, nullptr, 0, nullptr,
                                   nullptr),
              0)
        << name;
    hid_t type = H5Dget_type(d);
    EXPECT_GT(H5Tequal(type, H5T_IEEE_F32LE), 0) << name;
    H5Tclose(type);
    H5Pclose(dcpl);
    H5Dclose(d);
  }
  hid_t attr = H5Aopen(file, "format_version", H5P_DEFAULT);
  ASSERT_GE(attr, 0);
  int64_t version = 0;
  H5Aread(attr, H5T_NATIVE_INT64, &version);
  EXPECT_EQ(version, 2);
  H5Aclose(attr);
  H5Fclose(file);
}

TEST(Checkpoint, RoundTripEdgeCases) {
  TempDir dir;
  CheckpointState s;  // defaults: empty strings, no optimizer state
  s.model = {tensor("empty", {0, 5}, 1), tensor("one", {1}, 2)};
  std::string path = dir / "edge.h5";
  write_checkpoint(path, s);
  expect_same_state(s, read_checkpoint(path));

  // Adafactor state and a config text larger than an object-header message (64 KiB).
  CheckpointState a = make_state(9);
  a.optimizer_name = "adafactor";
  a.config_text.clear();
  for (int i = 0; i < 5000; ++i) a.config_text += "key_" + std::to_string(i) + ": some value\n";
  a.optimizer = {
      {"vr",
       {tensor("embed", {7}, 1), tensor("layers.0.attn.wqk", {15}, 2), tensor("ln.bias", {11}, 3)}},
      {"vc", {tensor("embed", {3}, 4), tensor("layers.0.attn.wqk", {7}, 5)}}};
  path = dir / "adafactor.h5";
  write_checkpoint(path, a);
  const CheckpointState r = read_checkpoint(path);
  expect_same_state(a, r);
  EXPECT_NO_THROW(check_matches(r, expected_of(a)));
}

TEST(Checkpoint, WriteRefusesInvalidStateAndLeavesNothing) {
  TempDir dir;
  const std::string path = dir / "bad.h5";
  auto with = [](auto edit) {
    CheckpointState s = make_state();
    edit(s);
    return s;
  };
  EXPECT_NE(error_of([&] {
              write_checkpoint(path, with([](auto& s) { s.model[0].data.pop_back(); }));
            }).find("embed has shape [7, 3] (21 values) but 20 values"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              write_checkpoint(path, with([](auto& s) { s.model[1].name = "embed"; }));
            }).find("duplicate tensor /model/embed"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              write_checkpoint(path, with([](auto& s) { s.model[0].name = "a/b"; }));
            }).find("invalid tensor name"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              write_checkpoint(path, with([](auto& s) { s.model[0] = {"scalar", {}, {1.0f}}; }));
            }).find("rank 0"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { write_checkpoint(dir / "no/such/dir/x.h5", make_state()); }).find("x.h5"),
      std::string::npos);
  EXPECT_TRUE(ckpt_files(dir.path()).empty());
}

TEST(Checkpoint, SaveKeepsNewestAndRemovesLeftoverTmp) {
  TempDir dir;
  const std::string ckdir = dir / "run/checkpoints";  // created by save_checkpoint
  for (int64_t step = 1; step <= 4; ++step) {
    if (step == 3) {
      fs::create_directories(ckdir);
      write_bytes(ckdir + "/ckpt-00000002.h5.tmp", "half-written by a crashed save");
      write_bytes(ckdir + "/notes.txt", "not ours");
    }
    save_checkpoint(ckdir, make_state(step), 2);
  }
  EXPECT_EQ(ckpt_files(ckdir),
            (std::vector<std::string>{"ckpt-00000003.h5", "ckpt-00000004.h5", "notes.txt"}));
  EXPECT_EQ(read_checkpoint(ckdir + "/ckpt-00000003.h5").step, 3);
  EXPECT_EQ(read_checkpoint(ckdir + "/ckpt-00000004.h5").step, 4);
  // A file from a later step (an abandoned longer run) is never pruned as "older".
  save_checkpoint(ckdir, make_state(9), 1);
  save_checkpoint(ckdir, make_state(5), 1);
  EXPECT_EQ(ckpt_files(ckdir),
            (std::vector<std::string>{"ckpt-00000005.h5", "ckpt-00000009.h5", "notes.txt"}));
}

TEST(Checkpoint, TruncatedFileIsRefused) {
  TempDir dir;
  const std::string path = dir / "ckpt-00000100.h5";
  write_checkpoint(path, make_state());
  const std::string bytes = read_bytes(path);
  for (size_t keep : {bytes.size() / 2, size_t(100)}) {
    const std::string cut = dir / ("cut-" + std::to_string(keep) + ".h5");
    write_bytes(cut, bytes.substr(0, keep));
    const std::string msg = error_of([&] { read_checkpoint(cut); });
    EXPECT_NE(msg.find(cut + ": truncated or unreadable"), std::string::npos) << msg;
  }
}

TEST(Checkpoint, FlippedByteFailsChecksumNamingTheDataset) {
  TempDir dir;
  const std::string path = dir / "ckpt-00000005.h5";
  write_and_flip(path);
  const std::string msg = error_of([&] { read_checkpoint(path); });
  EXPECT_NE(msg.find(path + ": dataset /model/big fails its checksum"), std::string::npos) << msg;
}

// Flips bits all over a small checkpoint (superblock, object headers, chunk
// indexes, raw data): every damaged file is refused with a CheckpointError, or
// reads back exactly the state written (the flip hit unused bytes). Never a
// crash, never silently different values.
TEST(Checkpoint, EveryFlippedByteIsRefusedOrHarmless) {
  // HDF5 1.10 leaks a little internal state when an object header fails its
  // checksum and, with error printing on, says so at exit ("infinite loop
  // closing library"; HDFGroup/hdf5#3790). Keep this process quiet.
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  TempDir dir;
  CheckpointState s;
  s.step = 3;
  s.config_text = "model:\n  d_model: 8\n";
  s.optimizer_name = "adamw";
  s.model = {tensor("embed", {16, 8}, 1), tensor("w", {8, 8}, 2), tensor("g", {8}, 3)};
  s.optimizer = {{"m", {tensor("embed", {16, 8}, 4), tensor("w", {8, 8}, 5), tensor("g", {8}, 6)}}};
  const std::string good = dir / "good.h5", bad = dir / "bad.h5";
  write_checkpoint(good, s);
  const std::string bytes = read_bytes(good);
  int refused = 0, harmless = 0;
  for (size_t i = 0; i < bytes.size(); i += 11) {
    std::string b = bytes;
    b[i] = static_cast<char>(b[i] ^ (1 << (i % 8)));
    write_bytes(bad, b);
    try {
      const CheckpointState r = read_checkpoint(bad);
      ++harmless;
      expect_same_state(s, r);
      if (testing::Test::HasFailure())
        FAIL() << "flip at byte " << i << " changed the state silently";
    } catch (const CheckpointError& e) {
      ++refused;
      EXPECT_EQ(std::string(e.what()).rfind(bad + ": ", 0), 0u) << e.what();
    }
  }
  EXPECT_GT(refused, harmless);  // most bytes of a checkpoint are checksummed content
}

TEST(Checkpoint, HDF5PrintsNothingForDamagedFiles) {
  TempDir dir;
  const std::string path = dir / "flipped.h5";
  write_and_flip(path);
  write_bytes(dir / "text.h5", "hello\n");
  // HDF5's default: print every error stack to stderr. The library turns it off.
  H5E_auto2_t saved_func = nullptr;
  void* saved_data = nullptr;
  H5Eget_auto2(H5E_DEFAULT, &saved_func, &saved_data);
  H5Eset_auto2(H5E_DEFAULT, reinterpret_cast<H5E_auto2_t>(H5Eprint2), stderr);
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  EXPECT_THROW(read_checkpoint(path), CheckpointError);
  EXPECT_THROW(read_checkpoint(dir / "text.h5"), CheckpointError);
  const std::string err = testing::internal::GetCapturedStderr();
  const std::string out = testing::internal::GetCapturedStdout();
  H5E_auto2_t func = nullptr;
  void* data = nullptr;
  H5Eget_auto2(H5E_DEFAULT, &func, &data);
  EXPECT_EQ(func, nullptr);  // and stays off, so nothing prints at exit either
  H5Eset_auto2(H5E_DEFAULT, saved_func, saved_data);
  EXPECT_EQ(err, "");
  EXPECT_EQ(out, "");
}

TEST(Checkpoint, MissingDatasetIsNamedByCheckMatches) {
  TempDir dir;
  CheckpointState s = make_state();
  const auto expected = expected_of(s);
  s.model.erase(s.model.begin() + 2);  // drop ln.bias from what is written
  const std::string path = dir / "ckpt.h5";
  write_checkpoint(path, s);
  const CheckpointState r = read_checkpoint(path);  // valid on its own
  const std::string msg = error_of([&] { check_matches(r, expected); });
  EXPECT_NE(msg.find("missing dataset /model/ln.bias"), std::string::npos) << msg;

  auto extra = expected;
  extra.pop_back();
  extra.pop_back();  // the model no longer has layers.0.attn.wqk
  EXPECT_NE(
      error_of([&] { check_matches(r, extra); }).find("extra dataset /model/layers.0.attn.wqk"),
      std::string::npos);
}

TEST(Checkpoint, WrongShapeNamesParameterAndBothShapes) {
  TempDir dir;
  CheckpointState s;
  s.model = {tensor("embed", {5, 8}, 1), tensor("layers.0.attn.wqk", {64, 32}, 2)};
  const std::string path = dir / "ckpt.h5";
  write_checkpoint(path, s);
  const CheckpointState r = read_checkpoint(path);
  const std::string msg = error_of([&] {
    check_matches(r, {{"embed", {5, 8}}, {"layers.0.attn.wqk", {64, 64}}});
  });
  EXPECT_EQ(
      msg,
      "parameter layers.0.attn.wqk has shape [64, 32] in the checkpoint but [64, 64] in the model");
}

TEST(Checkpoint, CheckMatchesCoversOptimizerState) {
  CheckpointState s = make_state();
  const auto expected = expected_of(s);
  EXPECT_NO_THROW(check_matches(s, expected));

  CheckpointState bad = s;
  bad.optimizer[1].second[1].shape = {5, 3, 7};  // v of layers.0.attn.wqk
  EXPECT_NE(error_of([&] { check_matches(bad, expected); })
                .find("optimizer state v: parameter layers.0.attn.wqk has shape [5, 3, 7] in the "
                      "checkpoint but [3, 5, 7] in the model"),
            std::string::npos);

  bad = s;
  bad.optimizer[0].second.pop_back();  // m lacks ln.bias
  EXPECT_NE(
      error_of([&] { check_matches(bad, expected); }).find("missing dataset /optimizer/m/ln.bias"),
      std::string::npos);

  bad = s;
  bad.optimizer[0].second.push_back(tensor("ghost", {2}, 1));
  EXPECT_NE(
      error_of([&] { check_matches(bad, expected); }).find("extra dataset /optimizer/m/ghost"),
      std::string::npos);

  // Adafactor: vr x vc must factor the parameter; unfactored tensors have no vc.
  CheckpointState af = s;
  af.optimizer = {
      {"vr",
       {tensor("embed", {7}, 1), tensor("layers.0.attn.wqk", {15}, 2), tensor("ln.bias", {11}, 3)}},
      {"vc", {tensor("embed", {3}, 4), tensor("layers.0.attn.wqk", {7}, 5)}}};
  EXPECT_NO_THROW(check_matches(af, expected));
  af.optimizer[1].second[0].shape = {4};
  af.optimizer[1].second[0].data.resize(4);
  EXPECT_NE(error_of([&] { check_matches(af, expected); }).find("parameter embed"),
            std::string::npos);
}

TEST(Checkpoint, NonHdf5EmptyAndMissingFilesAreRefused) {
  TempDir dir;
  write_bytes(dir / "text.h5", "model:\n  d_model: 64\nthis is YAML, not HDF5\n");
  write_bytes(dir / "empty.h5", "");
  std::string msg = error_of([&] { read_checkpoint(dir / "text.h5"); });
  EXPECT_NE(msg.find("text.h5: not an HDF5 file"), std::string::npos) << msg;
  msg = error_of([&] { read_checkpoint(dir / "empty.h5"); });
  EXPECT_NE(msg.find("empty.h5: empty file"), std::string::npos) << msg;
  msg = error_of([&] { read_checkpoint(dir / "missing.h5"); });
  EXPECT_NE(msg.find("missing.h5: does not exist"), std::string::npos) << msg;
  msg = error_of([&] { read_checkpoint(dir.path()); });
  EXPECT_NE(msg.find("is not a regular file"), std::string::npos) << msg;
}

TEST(Checkpoint, ForeignOrNewerHdf5FilesAreRefused) {
  TempDir dir;
  // An HDF5 file that is not a checkpoint.
  const std::string plain = dir / "plain.h5";
  hid_t f = H5Fcreate(plain.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  H5Fclose(f);
  std::string msg = error_of([&] { read_checkpoint(plain); });
  EXPECT_NE(msg.find("plain.h5: no whole-file checksum footer"), std::string::npos) << msg;
  ckpt::seal_file(plain);  // sealed, it reaches the HDF5 checks
  msg = error_of([&] { read_checkpoint(plain); });
  EXPECT_NE(msg.find("plain.h5: missing attribute format"), std::string::npos) << msg;

  // A checkpoint claiming a newer format version (edited, then sealed again).
  const std::string newer = dir / "newer.h5";
  write_checkpoint(newer, make_state());
  ckpt::unseal_file(newer);
  f = H5Fopen(newer.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
  const int64_t three = 3;
  H5Awrite(a, H5T_NATIVE_INT64, &three);
  H5Aclose(a);
  H5Adelete(f, "step");
  H5Fclose(f);
  ckpt::seal_file(newer);
  msg = error_of([&] { read_checkpoint(newer); });
  EXPECT_NE(msg.find("format_version 3 is not supported"), std::string::npos) << msg;
  std::ostringstream report;
  EXPECT_FALSE(inspect_checkpoint(newer, report));
  EXPECT_NE(report.str().find("missing attribute step"), std::string::npos) << report.str();
}

TEST(Checkpoint, InspectReportsAGoodFile) {
  TempDir dir;
  const std::string path = dir / "ckpt-00000100.h5";
  write_checkpoint(path, make_state());
  std::ostringstream out;
  EXPECT_TRUE(inspect_checkpoint(path, out));
  const std::string r = out.str();
  for (const char* want :
       {"reformer-checkpoint version 2", "step           : 100", "tokens seen    : 123,456,789,112",
        "seed           : 18364758544493064720", "dp 2 x sp 4", "optimizer      : adamw",
        "d_model: 64", "parameters     : 137 in 3 tensors", "/model/layers.0.attn.wqk", "[3, 5, 7]",
        "float32", "/optimizer/v/ln.bias", "status         : valid"})
    EXPECT_NE(r.find(want), std::string::npos) << "missing \"" << want << "\" in:\n" << r;
  EXPECT_EQ(r.find("FAILED"), std::string::npos) << r;
}

TEST(Checkpoint, InspectNamesTheDamagedDatasetAndNeverThrows) {
  TempDir dir;
  const std::string path = dir / "ckpt-00000005.h5";
  write_and_flip(path);
  std::ostringstream out;
  EXPECT_FALSE(inspect_checkpoint(path, out));
  const std::string r = out.str();
  EXPECT_NE(r.find("/model/big"), std::string::npos) << r;
  EXPECT_NE(r.find("FAILED (dataset /model/big fails its checksum)"), std::string::npos) << r;
  EXPECT_NE(r.find("/model/embed"), std::string::npos) << r;  // the rest is still listed
  EXPECT_NE(r.find("INVALID"), std::string::npos) << r;

  for (const std::string& bad : {dir / "missing.h5", dir.path()}) {
    std::ostringstream o;
    EXPECT_NO_THROW(EXPECT_FALSE(inspect_checkpoint(bad, o)));
    EXPECT_NE(o.str().find("INVALID"), std::string::npos);
  }
  const std::string bytes = read_bytes(path);
  write_bytes(dir / "cut.h5", bytes.substr(0, bytes.size() / 2));
  std::ostringstream o;
  EXPECT_FALSE(inspect_checkpoint(dir / "cut.h5", o));
  EXPECT_NE(o.str().find("truncated or unreadable"), std::string::npos) << o.str();
}

TEST(Checkpoint, FindResumablePassesOverDamagedNewerFiles) {
  TempDir dir;
  for (int64_t step = 1; step <= 2; ++step) save_checkpoint(dir.path(), make_state(step), 5);
  // Step 4: a flipped byte; step 3: truncated; step 6: a valid file whose step
  // attribute (2) disagrees with its name.
  write_and_flip(checkpoint_path(dir.path(), 4));
  write_checkpoint(checkpoint_path(dir.path(), 3), make_state(3));
  std::string bytes = read_bytes(checkpoint_path(dir.path(), 3));
  write_bytes(checkpoint_path(dir.path(), 3), bytes.substr(0, bytes.size() / 2));
  fs::copy_file(checkpoint_path(dir.path(), 2), checkpoint_path(dir.path(), 6));
  write_bytes(dir / "ckpt-00000009.h5.tmp", "partial");

  std::vector<std::string> notes;
  const auto found = find_resumable(dir.path(), &notes);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(*found, checkpoint_path(dir.path(), 2));
  ASSERT_EQ(notes.size(), 3u);
  EXPECT_NE(notes[0].find("ckpt-00000006.h5: its step attribute is 2"), std::string::npos)
      << notes[0];
  EXPECT_NE(notes[1].find("ckpt-00000004.h5: dataset /model/big fails its checksum"),
            std::string::npos)
      << notes[1];
  EXPECT_NE(notes[2].find("ckpt-00000003.h5: truncated or unreadable"), std::string::npos)
      << notes[2];
  EXPECT_EQ(find_resumable(dir.path(), nullptr), found);
}

TEST(Checkpoint, FindResumableOnEmptyOrMissingDir) {
  TempDir dir;
  std::vector<std::string> notes;
  EXPECT_EQ(find_resumable(dir.path(), &notes), std::nullopt);
  EXPECT_EQ(find_resumable(dir / "does-not-exist", &notes), std::nullopt);
  write_bytes(dir / "ckpt-00000001.h5", "garbage");
  EXPECT_EQ(find_resumable(dir.path(), &notes), std::nullopt);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("not an HDF5 file"), std::string::npos) << notes[0];
}

namespace {
const char* g_kill_stage = nullptr;
void kill_at_stage(const char* stage) {
  if (g_kill_stage && std::strcmp(stage, g_kill_stage) == 0) raise(SIGKILL);
}
}  // namespace

TEST(Checkpoint, SigkillAtEveryStageLeavesAResumableDirectory) {
  const char* stages[] = {"created", "model_written", "optimizer_written", "closed", "fsynced",
                          "renamed", "pruned"};
  for (const char* stage : stages) {
    SCOPED_TRACE(stage);
    TempDir dir;
    save_checkpoint(dir.path(), make_state(1), 2);
    save_checkpoint(dir.path(), make_state(2), 2);

    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      g_kill_stage = stage;
      checkpoint_stage_hook = kill_at_stage;
      try {
        save_checkpoint(dir.path(), make_state(3), 2);
      } catch (...) {
        _exit(4);
      }
      _exit(3);  // the hook never fired
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
    ASSERT_EQ(WTERMSIG(status), SIGKILL);

    const bool completed = std::string(stage) == "renamed" || std::string(stage) == "pruned";
    std::vector<std::string> notes;
    const auto found = find_resumable(dir.path(), &notes);
    ASSERT_TRUE(found.has_value());
    EXPECT_EQ(*found, checkpoint_path(dir.path(), completed ? 3 : 2));
    for (const auto& name : ckpt_files(dir.path())) {
      if (name.size() < 3 || name.substr(name.size() - 3) != ".h5") continue;
      const std::string p = dir / name;
      bool valid = true;
      try {
        read_checkpoint(p);
      } catch (const CheckpointError&) {
        valid = false;
      }
      const bool noted = std::any_of(notes.begin(), notes.end(), [&](const std::string& n) {
        return n.find(p) != std::string::npos;
      });
      EXPECT_TRUE(valid || noted) << p;
    }
    EXPECT_EQ(read_checkpoint(checkpoint_path(dir.path(), 2)).step, 2);
    if (completed)
      expect_same_state(make_state(3), read_checkpoint(checkpoint_path(dir.path(), 3)));

    // The next save tidies up: newest two kept, no temporary file left.
    save_checkpoint(dir.path(), make_state(3), 2);
    EXPECT_EQ(ckpt_files(dir.path()),
              (std::vector<std::string>{"ckpt-00000002.h5", "ckpt-00000003.h5"}));
  }
}
