// Training data: byte corpora and the paper's synthetic duplication task.
//
// Sequence `index` of a split is a pure function of (seed, split, index), so
// a run is reproducible, ranks draw disjoint sequences without talking, and
// resuming needs only the number of sequences drawn so far.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "framework/config.h"

namespace reformer {

enum class Split { train = 0, valid = 1, test = 2 };

class Dataset {
 public:
  virtual ~Dataset() = default;
  // Writes sequence `index` of `split`: tokens[L] (model inputs) and
  // targets[L] (the next token for each position; -1 where no loss is taken).
  virtual void sample(Split split, int64_t index, int32_t* tokens, int32_t* targets) const = 0;
  virtual std::string describe() const = 0;
};

// Sequences `0 w 0 w` of length L, w uniform over symbols 1..symbols-1.
// Loss and accuracy are taken on the predictions of the second copy of w.
class DuplicationTask final : public Dataset {
 public:
  DuplicationTask(int64_t L, int symbols, uint64_t seed);
  void sample(Split split, int64_t index, int32_t* tokens, int32_t* targets) const override;
  std::string describe() const override;

 private:
  int64_t L_;
  int symbols_;
  uint64_t seed_;
};

// Windows of L+1 bytes at random offsets of a file's train / valid / test
// range. The whole file is held in memory.
class ByteCorpus final : public Dataset {
 public:
  // ByteSplit::enwik8: 90M / 5M / 5M bytes (the file must hold 100M);
  // ByteSplit::fractions: the last valid_fraction and test_fraction of the file.
  // Throws DataError for a missing, unreadable, too short or too large file,
  // or a path that is not a regular file.
  ByteCorpus(const std::string& path, ByteSplit split_kind, double valid_fraction,
             double test_fraction, int64_t L, uint64_t seed);
  void sample(Split split, int64_t index, int32_t* tokens, int32_t* targets) const override;
  std::string describe() const override;
  int64_t split_size(Split s) const { return end_[int(s)] - begin_[int(s)]; }

 private:
  std::string path_;
  std::vector<uint8_t> bytes_;
  int64_t begin_[3], end_[3];
  int64_t L_;
  uint64_t seed_;
};

std::unique_ptr<Dataset> make_dataset(const Config& cfg);

}  // namespace reformer
