// Corruption campaign: thousands of damaged copies of one checkpoint, covering
// every byte region of the file (superblock, object headers, B-trees, heaps,
// free-space records, raw data, the checksum footer) with
// single-bit flips, multi-byte garbage, zeroed ranges, truncations and
// appended bytes. The reader must refuse each with a CheckpointError or read
// back exactly the state written: never a crash, never another exception,
// never different values. A sample goes through the real program (inspect,
// eval, train --resume PATH / auto), which must exit 0 or 1, never by a signal.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <sstream>
#include <sys/wait.h>

#include "framework/checkpoint.h"
#include "framework/checkpoint_seal.h"
#include "kernels/errors.h"
#include "tests/common/checkpoint_testing.h"

namespace fs = std::filesystem;
using namespace reformer;
using namespace reformer::testing_ckpt;

namespace {

// Byte ranges of a checkpoint file by the structure they belong to. HDF5
// structures are found by their signatures; a byte belongs to the last
// structure starting at or before it, raw tensor data and the footer by exact
// range.
class RegionMap {
 public:
  RegionMap(const std::string& bytes, const CheckpointState& s) : size_(bytes.size()) {
    static const std::map<std::string, std::string> kSignatures = {
        {"OHDR", "object header"},       {"OCHK", "object header"},
        {"FRHP", "fractal heap"},        {"FHDB", "fractal heap"},
        {"FHIB", "fractal heap"},        {"BTHD", "v2 B-tree"},
        {"BTLF", "v2 B-tree"},           {"BTIN", "v2 B-tree"},
        {"FSHD", "free-space manager"},  {"FSSE", "free-space manager"},
        {"EAHD", "chunk index"},         {"EAIB", "chunk index"},
        {"EADB", "chunk index"},         {"EASB", "chunk index"},
        {"FAHD", "chunk index"},         {"FADB", "chunk index"}};
    starts_[0] = "superblock";
    for (const auto& [sig, name] : kSignatures)
      for (size_t at = bytes.find(sig); at != std::string::npos; at = bytes.find(sig, at + 1))
        starts_[at] = name;
    auto add_data = [&](const std::vector<CheckpointTensor>& ts) {
      for (const auto& t : ts) {
        if (t.data.empty()) continue;
        const std::string raw(reinterpret_cast<const char*>(t.data.data()), t.data.size() * 4);
        const size_t at = bytes.find(raw);
        if (at != std::string::npos) data_.push_back({at, at + raw.size()});
      }
    };
    add_data(s.model);
    for (const auto& [name, ts] : s.optimizer) add_data(ts);
  }
  std::string at(size_t offset) const {
    if (offset >= size_ - ckpt::kFooterSize) return "footer";
    for (const auto& [begin, end] : data_)
      if (offset >= begin && offset < end) return "raw data";
    return std::prev(starts_.upper_bound(offset))->second;
  }
  const std::vector<std::pair<size_t, size_t>>& data() const { return data_; }

 private:
  size_t size_;
  std::map<size_t, std::string> starts_;
  std::vector<std::pair<size_t, size_t>> data_;
};

// A state with a zero-sized tensor too (no chunk written at all).
CheckpointState campaign_state() {
  CheckpointState s = small_state(3);
  s.model.push_back({"empty", {0, 5}, {}});
  for (auto& [name, ts] : s.optimizer) ts.push_back({"empty", {0, 5}, {}});
  return s;
}

bool same_state(const CheckpointState& a, const CheckpointState& b) {
  auto same = [](const std::vector<CheckpointTensor>& x, const std::vector<CheckpointTensor>& y) {
    if (x.size() != y.size()) return false;
    for (size_t i = 0; i < x.size(); ++i)
      if (x[i].name != y[i].name || x[i].shape != y[i].shape ||
          std::memcmp(x[i].data.data(), y[i].data.data(), x[i].data.size() * 4) != 0)
        return false;
    return true;
  };
  if (a.step != b.step || a.tokens_seen != b.tokens_seen || a.seed != b.seed ||
      a.config_text != b.config_text || !same(a.model, b.model) ||
      a.optimizer.size() != b.optimizer.size())
    return false;
  for (size_t i = 0; i < a.optimizer.size(); ++i)
    if (a.optimizer[i].first != b.optimizer[i].first ||
        !same(a.optimizer[i].second, b.optimizer[i].second))
      return false;
  return true;
}

struct Mutation {
  std::string kind;    // "flip", "garbage", "zero", "truncate", "append", "resealed flip"
  size_t offset;       // first byte changed (or the new length, for a truncation)
  std::string bytes;   // the damaged file
};

// The campaign's mutations of `good`: a bit flip at every byte, then random
// garbage, zeroed ranges, truncations (every region boundary, and random) and
// appended bytes. Deterministic (fixed seed).
std::vector<Mutation> mutations(const std::string& good, const RegionMap& regions) {
  std::vector<Mutation> out;
  std::mt19937_64 rng(20261129);
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  for (size_t i = 0; i < good.size(); ++i) {
    std::string b = good;
    b[i] = static_cast<char>(b[i] ^ (1 << (i % 8)));
    out.push_back({"flip", i, std::move(b)});
  }
  for (int k = 0; k < 600; ++k) {
    std::string b = good;
    const size_t at = pick(good.size()), len = std::min(1 + pick(64), good.size() - at);
    for (size_t j = 0; j < len; ++j) b[at + j] = static_cast<char>(rng());
    const bool zero = k % 4 == 0;
    if (zero) std::fill(b.begin() + at, b.begin() + at + len, '\0');
    if (b != good) out.push_back({zero ? "zero" : "garbage", at, std::move(b)});
  }
  std::vector<size_t> cuts = {0, 1, 7, 8, 47, 48, good.size() - 1, good.size() - 8,
                              good.size() - ckpt::kFooterSize, good.size() - ckpt::kFooterSize - 1};
  for (int k = 0; k < 300; ++k) cuts.push_back(pick(good.size()));
  for (size_t c : cuts) out.push_back({"truncate", c, good.substr(0, c)});
  for (int k = 0; k < 50; ++k) {
    std::string tail(1 + pick(100), '\0');
    for (auto& ch : tail) ch = static_cast<char>(rng());
    out.push_back({"append", good.size(), good + tail});
  }
  // Flips inside raw tensor data with the footer recomputed: damage that gets
  // past the whole-file checksum must still be stopped by Fletcher-32.
  const std::string bare = good.substr(0, good.size() - ckpt::kFooterSize);
  for (const auto& [begin, end] : regions.data())
    for (size_t i = begin; i < end; i += 37) {
      std::string b = bare;
      b[i] = static_cast<char>(b[i] ^ 0x10);
      b += ckpt::make_footer(ckpt::crc64(0, b.data(), b.size()), b.size());
      out.push_back({"resealed flip", i, std::move(b)});
    }
  return out;
}

}  // namespace

TEST(CheckpointCorruption, EveryMutationIsRefusedOrReadsBackExactly) {
  TempDir dir;
  const CheckpointState state = campaign_state();
  const std::string good_path = dir / "good.h5", bad = dir / "bad.h5";
  write_checkpoint(good_path, state);
  const std::string good = read_bytes(good_path);
  const RegionMap regions(good, state);
  std::map<std::string, int> refused_by_region, refused_by_kind;
  int accepted = 0, total = 0;
  for (const Mutation& m : mutations(good, regions)) {
    ++total;
    // A new file each time: ext4 flushes a truncated-and-rewritten file on close.
    fs::remove(bad);
    write_bytes(bad, m.bytes);
    const std::string where = m.kind + " at byte " + std::to_string(m.offset) + " (" +
                              regions.at(std::min(m.offset, good.size() - 1)) + ")";
    try {
      const CheckpointState r = read_checkpoint(bad);
      ++accepted;
      ASSERT_TRUE(same_state(state, r)) << where << " changed the state silently";
    } catch (const CheckpointError& e) {
      ++refused_by_region[regions.at(std::min(m.offset, good.size() - 1))];
      ++refused_by_kind[m.kind];
      ASSERT_EQ(std::string(e.what()).rfind(bad + ": ", 0), 0u) << where << ": " << e.what();
      if (m.kind == "resealed flip")
        ASSERT_NE(std::string(e.what()).find("fails its checksum"), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      FAIL() << where << ": " << e.what() << " is not a CheckpointError";
    }
    if (total % 25 == 0) {  // inspect never throws and agrees with the reader
      std::ostringstream report;
      ASSERT_NO_THROW(inspect_checkpoint(bad, report)) << where;
    }
  }
  EXPECT_GE(total, 2000);
  EXPECT_EQ(accepted, 0);  // every mutation changes checksummed bytes
  // Every dataset here is one chunk, whose address sits in the layout message
  // of its object header: there is no separate chunk index to damage.
  for (const char* region : {"superblock", "object header", "fractal heap", "v2 B-tree",
                             "free-space manager", "raw data", "footer"})
    EXPECT_GT(refused_by_region[region], 0) << "no mutation hit the " << region;
  std::string summary;
  for (const auto& [k, n] : refused_by_region) summary += " " + k + ": " + std::to_string(n) + ";";
  RecordProperty("regions", summary);
  std::printf("%d mutations refused, by region:%s\n", total, summary.c_str());
}

// The real program on a sample of damaged files: exit status 0 or 1, never a
// signal, never a sanitizer report.
TEST(CheckpointCorruption, TheProgramExitsCleanlyOnDamagedFiles) {
  TempDir dir;
  const std::string bin = REFORMER_BINARY;
  const std::string cfg = std::string(REFORMER_SOURCE_DIR) + "/configs/tiny.yaml";
  const std::string asan = std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "";
  // Sanitizer reports would otherwise exit 1, like a clean refusal.
  const std::string env = "env OMP_NUM_THREADS=1 ASAN_OPTIONS=" + asan +
                          (asan.empty() ? "" : ":") + "exitcode=99 UBSAN_OPTIONS=exitcode=99 ";
  auto run = [&](const std::string& args, std::string& out) {
    FILE* p = popen((env + bin + " " + args + " 2>&1").c_str(), "r");
    char buf[4096];
    for (size_t n; p && (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    const int st = p ? pclose(p) : -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  };
  const std::string train = "train --config " + cfg + " --set training.steps=1 ";
  std::string out;
  ASSERT_EQ(run(train + "--set checkpoint.dir=" + dir / "src", out), 0) << out;
  const std::string good = read_bytes(dir / "src/ckpt-00000001.h5");
  const CheckpointState state = read_checkpoint(dir / "src/ckpt-00000001.h5");
  const RegionMap regions(good, state);
  // 30 cases: flips spread over the file (every region), garbage, truncations.
  std::vector<Mutation> cases;
  for (int k = 0; k < 24; ++k) {
    const size_t at = (good.size() - 1) * static_cast<size_t>(k) / 23 + (k % 5);
    std::string b = good;
    b[std::min(at, good.size() - 1)] ^= static_cast<char>(1 << (k % 8));
    cases.push_back({"flip", at, std::move(b)});
  }
  for (size_t cut : {size_t(0), size_t(100), good.size() / 2, good.size() - 1})
    cases.push_back({"truncate", cut, good.substr(0, cut)});
  const size_t heap = good.find("\x0c" "embed.tokens");
  std::string b = good;
  b[heap + 20] ^= 0x30;
  cases.push_back({"link record", heap + 20, b});
  b = good;
  for (size_t i = 0; i < 48; ++i) b[i] = static_cast<char>(i * 37);
  cases.push_back({"garbage", 0, b});
  ASSERT_EQ(cases.size(), 30u);
  for (size_t k = 0; k < cases.size(); ++k) {
    const Mutation& m = cases[k];
    const std::string ck = dir / ("case" + std::to_string(k));
    fs::create_directories(ck);
    const std::string file = ck + "/ckpt-00000001.h5";
    write_bytes(file, m.bytes);
    const std::string where = m.kind + " at byte " + std::to_string(m.offset) + " (" +
                              regions.at(std::min(m.offset, good.size() - 1)) + ")";
    const std::string own_dir = "--set checkpoint.dir=" + ck + "/out ";
    for (const std::string& args :
         {"inspect " + file, "eval --checkpoint " + file, train + own_dir + "--resume " + file}) {
      out.clear();
      EXPECT_EQ(run(args, out), 1) << where << ": reformer " << args << "\n" << out;
    }
    if (k % 3 == 0) {  // resume auto passes over the damaged file and starts fresh
      out.clear();
      EXPECT_EQ(run(train + "--set checkpoint.dir=" + ck + " --resume auto", out), 0)
          << where << "\n" << out;
      EXPECT_NE(out.find("passed over " + file), std::string::npos) << out;
    }
  }
}
