// Data: the duplication task and the byte corpus reader.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <set>

#include "framework/data.h"
#include "kernels/errors.h"

using namespace reformer;

TEST(Duplication, SequenceIsZeroWZeroW) {
  DuplicationTask task(16, 5, 1);
  std::vector<int32_t> tok(16), tgt(16);
  task.sample(Split::train, 3, tok.data(), tgt.data());
  EXPECT_EQ(tok[0], 0);
  EXPECT_EQ(tok[8], 0);
  for (int j = 1; j < 8; ++j) {
    EXPECT_EQ(tok[size_t(j)], tok[size_t(8 + j)]);
    EXPECT_GE(tok[size_t(j)], 1);
    EXPECT_LE(tok[size_t(j)], 4);
  }
}

TEST(Duplication, TargetsOnlyOnTheSecondCopy) {
  DuplicationTask task(16, 5, 1);
  std::vector<int32_t> tok(16), tgt(16);
  task.sample(Split::valid, 0, tok.data(), tgt.data());
  for (int i = 0; i < 16; ++i) {
    if (i >= 8 && i < 15) EXPECT_EQ(tgt[size_t(i)], tok[size_t(i + 1)]) << i;
    else EXPECT_EQ(tgt[size_t(i)], -1) << i;
  }
}

TEST(Duplication, ReproducibleAndSplitDependent) {
  DuplicationTask a(32, 9, 7), b(32, 9, 7), c(32, 9, 8);
  std::vector<int32_t> x(32), y(32), t(32);
  a.sample(Split::train, 5, x.data(), t.data());
  b.sample(Split::train, 5, y.data(), t.data());
  EXPECT_EQ(x, y);
  b.sample(Split::valid, 5, y.data(), t.data());
  EXPECT_NE(x, y);
  c.sample(Split::train, 5, y.data(), t.data());
  EXPECT_NE(x, y);
  std::set<int32_t> seen;
  for (int i = 0; i < 200; ++i) {
    a.sample(Split::train, i, x.data(), t.data());
    seen.insert(x.begin() + 1, x.begin() + 16);
  }
  EXPECT_EQ(seen.size(), 8u);  // every symbol 1..8 appears
}

namespace {
std::string write_temp(const std::string& bytes) {
  char path[] = "/tmp/reformer_corpus_XXXXXX";
  const int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  FILE* f = fdopen(fd, "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  return path;
}
}  // namespace

TEST(ByteCorpus, WindowsStayInsideTheirSplit) {
  // Bytes mark their split: train 't' [0, 800), valid 'v' [800, 900), test 'x'.
  const std::string path =
      write_temp(std::string(800, 't') + std::string(100, 'v') + std::string(100, 'x'));
  ByteCorpus c(path, ByteSplit::fractions, 0.1, 0.1, 16, 1);
  EXPECT_EQ(c.split_size(Split::train), 800);
  EXPECT_EQ(c.split_size(Split::valid), 100);
  EXPECT_EQ(c.split_size(Split::test), 100);
  std::vector<int32_t> tok(16), tgt(16);
  const char mark[3] = {'t', 'v', 'x'};
  for (int s = 0; s < 3; ++s) {
    for (int k = 0; k < 50; ++k) {
      c.sample(Split(s), k, tok.data(), tgt.data());
      for (int i = 0; i < 16; ++i) {
        ASSERT_EQ(tok[size_t(i)], mark[s]);
        ASSERT_EQ(tgt[size_t(i)], mark[s]);
      }
    }
  }
  std::remove(path.c_str());
}

// data.test_fraction = 0 leaves no test split: sampling it is a DataError
// (it once read outside the file), the other splits still work.
TEST(ByteCorpus, EmptyTestSplitIsRefusedWhenSampled) {
  const std::string path = write_temp(std::string(1000, 'a'));
  ByteCorpus c(path, ByteSplit::fractions, 0.1, 0.0, 16, 1);
  EXPECT_EQ(c.split_size(Split::test), 0);
  std::vector<int32_t> tok(16), tgt(16);
  c.sample(Split::valid, 0, tok.data(), tgt.data());
  try {
    c.sample(Split::test, 0, tok.data(), tgt.data());
    ADD_FAILURE() << "sampling an empty test split did not throw";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("the test split has 0 bytes"), std::string::npos)
        << e.what();
  }
  std::remove(path.c_str());
}

TEST(ByteCorpus, TargetsAreTheNextBytes) {
  std::string bytes;
  for (int i = 0; i < 1000; ++i) bytes += char(i % 251);
  const std::string path = write_temp(bytes);
  ByteCorpus c(path, ByteSplit::fractions, 0.1, 0.1, 16, 1);
  std::vector<int32_t> tok(16), tgt(16);
  for (int k = 0; k < 50; ++k) {
    c.sample(Split::train, k, tok.data(), tgt.data());
    for (int i = 0; i < 16; ++i) EXPECT_EQ(tgt[size_t(i)], (tok[size_t(i)] + 1) % 251);
  }
  std::remove(path.c_str());
}

TEST(ByteCorpus, MissingFileIsRefused) {
  EXPECT_THROW(ByteCorpus("/nonexistent/enwik8", ByteSplit::fractions, 0.05, 0.05, 16, 1),
               DataError);
}

TEST(ByteCorpus, TooShortForTheSplitIsRefused) {
  const std::string path = write_temp(std::string(40, 'a'));
  try {
    ByteCorpus c(path, ByteSplit::fractions, 0.1, 0.1, 16, 1);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("valid"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ByteCorpus(path, ByteSplit::enwik8, 0, 0, 16, 1), DataError);
  std::remove(path.c_str());
}
