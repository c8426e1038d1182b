#include "framework/data.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <new>

#include "kernels/errors.h"
#include "kernels/common/philox.h"

namespace reformer {

DuplicationTask::DuplicationTask(int64_t L, int symbols, uint64_t seed)
    : L_(L), symbols_(symbols), seed_(seed) {
  REFORMER_REQUIRE(L >= 4 && L % 2 == 0, DataError, "duplication task needs an even length >= 4");
  REFORMER_REQUIRE(symbols >= 3, DataError, "duplication task needs at least 3 symbols");
}

void DuplicationTask::sample(Split split, int64_t index, int32_t* tokens,
                             int32_t* targets) const {
  const int64_t half = L_ / 2;
  const RngKey key = make_key(seed_, RngPurpose::data, uint64_t(split), uint64_t(index));
  // Sequence s[0 .. L] = 0 w 0 w with |w| = half - 1, plus s[L] = 0 so the
  // last target exists; tokens = s[0 .. L), targets = s[1 .. L].
  tokens[0] = 0;
  tokens[half] = 0;
  for (int64_t j = 1; j < half; ++j) {
    const int32_t w = int32_t(1 + rng_u32(key, uint64_t(j)) % uint32_t(symbols_ - 1));
    tokens[j] = w;
    tokens[half + j] = w;
  }
  // Position i predicts s[i + 1]; the second copy is s[half + 1 .. L - 1],
  // predicted at positions half .. L - 2.
  for (int64_t i = 0; i < L_; ++i) {
    const bool second_copy = i >= half && i + 1 < L_;
    targets[i] = second_copy ? tokens[i + 1] : -1;
  }
}

std::string DuplicationTask::describe() const {
  return "duplication task: length " + std::to_string(L_) + ", symbols 1.." +
         std::to_string(symbols_ - 1);
}

ByteCorpus::ByteCorpus(const std::string& path, ByteSplit split_kind, double valid_fraction,
                       double test_fraction, int64_t L, uint64_t seed)
    : path_(path), L_(L), seed_(seed) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (fs::exists(st) && !fs::is_regular_file(st))
    throw DataError("data file '" + path + "' is " +
                    (fs::is_directory(st) ? "a directory" : "not a regular file") +
                    "; data.path names the file of bytes itself");
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw DataError("cannot open data file '" + path + "'");
  const std::streamsize n = f.tellg();
  if (n <= 0) throw DataError("data file '" + path + "' is empty");
  try {
    bytes_.resize(size_t(n));
  } catch (const std::bad_alloc&) {
    throw DataError("data file '" + path + "' has " + std::to_string(n) +
                    " bytes, more than this process can hold in memory");
  }
  f.seekg(0);
  if (!f.read(reinterpret_cast<char*>(bytes_.data()), n))
    throw DataError("cannot read data file '" + path + "'");
  const int64_t total = int64_t(n);
  if (split_kind == ByteSplit::enwik8) {
    constexpr int64_t M = 1000000;
    if (total < 100 * M)
      throw DataError("data file '" + path + "' has " + std::to_string(total) +
                      " bytes; the enwik8 split needs 100000000 (unzipped enwik8)");
    begin_[0] = 0, end_[0] = 90 * M;
    begin_[1] = 90 * M, end_[1] = 95 * M;
    begin_[2] = 95 * M, end_[2] = 100 * M;
  } else {
    const int64_t nt = int64_t(double(total) * test_fraction);
    const int64_t nv = int64_t(double(total) * valid_fraction);
    begin_[0] = 0, end_[0] = total - nv - nt;
    begin_[1] = end_[0], end_[1] = total - nt;
    begin_[2] = end_[1], end_[2] = total;
  }
  const char* names[3] = {"train", "valid", "test"};
  for (int s = 0; s < 3; ++s) {
    const bool needed = s < 2 || end_[2] > begin_[2];
    if (needed && end_[s] - begin_[s] < L + 1)
      throw DataError("data file '" + path + "': the " + names[s] + " split has " +
                      std::to_string(end_[s] - begin_[s]) + " bytes, fewer than max_len + 1 = " +
                      std::to_string(L + 1));
  }
}

void ByteCorpus::sample(Split split, int64_t index, int32_t* tokens, int32_t* targets) const {
  const int s = int(split);
  const int64_t span = end_[s] - begin_[s] - L_;  // window starts in [begin, begin + span)
  if (span < 1) {  // only the test split may be this short (data.test_fraction = 0)
    const char* names[3] = {"train", "valid", "test"};
    throw DataError("data file '" + path_ + "': the " + names[s] + " split has " +
                    std::to_string(end_[s] - begin_[s]) +
                    " bytes, too few for one sequence (data.test_fraction is 0?); evaluate "
                    "--split valid, or set data.test_fraction");
  }
  const RngKey key = make_key(seed_, RngPurpose::data, uint64_t(split), uint64_t(index));
  const Philox4 r = rng_block(key, 0);
  const uint64_t x = (uint64_t(r.v[0]) << 32) | r.v[1];
  const int64_t start = begin_[s] + int64_t(x % uint64_t(span));
  for (int64_t i = 0; i < L_; ++i) {
    tokens[i] = bytes_[size_t(start + i)];
    targets[i] = bytes_[size_t(start + i + 1)];
  }
}

std::string ByteCorpus::describe() const {
  return "bytes of '" + path_ + "': train " + std::to_string(split_size(Split::train)) +
         ", valid " + std::to_string(split_size(Split::valid)) + ", test " +
         std::to_string(split_size(Split::test));
}

std::unique_ptr<Dataset> make_dataset(const Config& cfg) {
  if (cfg.data.kind == DataKind::bytes)
    return std::make_unique<ByteCorpus>(cfg.data.path, cfg.data.split, cfg.data.valid_fraction,
                                        cfg.data.test_fraction, cfg.model.max_len,
                                        cfg.training.seed);
  const int symbols = cfg.data.dup_symbols > 0 ? cfg.data.dup_symbols : cfg.model.vocab_size;
  return std::make_unique<DuplicationTask>(cfg.model.max_len, symbols, cfg.training.seed);
}

}  // namespace reformer
