// The metrics file: lines past a resumed step are dropped (a run killed after
// its last checkpoint logged them once already), everything else is kept.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "framework/logging.h"

using namespace reformer;

namespace {

std::vector<std::string> read_lines(const std::string& path) {
  std::vector<std::string> out;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);) out.push_back(line);
  return out;
}

}  // namespace

TEST(Metrics, DropAfterKeepsEarlierStepsAndOtherLines) {
  const std::string path = ::testing::TempDir() + "reformer_metrics_drop.jsonl";
  {
    MetricsWriter w(path, /*append*/ false);
    for (int64_t s = 1; s <= 30; ++s) {
      JsonLine j;
      j.add("step", s).add("loss", 1.0 / double(s));
      w.write(j);
      if (s % 10 == 0) {
        JsonLine e;
        e.add("step", s).add("eval", true);
        w.write(e);
      }
    }
  }
  EXPECT_EQ(read_lines(path).size(), 33u);
  EXPECT_EQ(drop_metrics_after(path, 20), 11);  // steps 21..30 and the eval at 30
  const std::vector<std::string> lines = read_lines(path);
  ASSERT_EQ(lines.size(), 22u);
  EXPECT_EQ(lines.back().rfind("{\"step\": 20, \"eval\"", 0), 0u) << lines.back();
  EXPECT_EQ(drop_metrics_after(path, 20), 0);                     // nothing more to drop
  EXPECT_EQ(drop_metrics_after(path + ".absent", 5), 0);         // no file: nothing to do
  std::remove(path.c_str());
}
