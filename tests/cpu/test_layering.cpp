// The include graph points down: kernels <- distributed <- framework <- launch
// (kernels and distributed are siblings at the bottom; distributed may use the
// kernels' error types). A header or source that includes a layer above its
// own fails here, so the layering of the link lines holds for includes too.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

// For each folder, the top-level folders its files may include from.
const std::map<std::string, std::vector<std::string>> kAllowed = {
    {"kernels", {"kernels"}},
    {"distributed", {"distributed", "kernels"}},
    {"framework", {"framework", "distributed", "kernels"}},
    {"launch", {"launch", "framework", "distributed", "kernels"}},
};

bool is_source(const fs::path& p) {
  const std::string e = p.extension().string();
  return e == ".h" || e == ".cpp" || e == ".cu" || e == ".cuh";
}

// "top/rest" quoted includes of one file.
std::vector<std::string> quoted_includes(const fs::path& p) {
  static const std::regex inc(R"(^\s*#\s*include\s*"([^"]+)\")");
  std::vector<std::string> out;
  std::ifstream in(p);
  std::string line;
  std::smatch m;
  while (std::getline(in, line))
    if (std::regex_search(line, m, inc)) out.push_back(m[1]);
  return out;
}

}  // namespace

TEST(Layering, IncludesPointDown) {
  const fs::path root = REFORMER_SOURCE_DIR;
  int files = 0;
  std::vector<std::string> violations;
  for (const auto& [folder, allowed] : kAllowed) {
    ASSERT_TRUE(fs::is_directory(root / folder)) << folder;
    for (const auto& e : fs::recursive_directory_iterator(root / folder)) {
      if (!e.is_regular_file() || !is_source(e.path())) continue;
      ++files;
      for (const std::string& inc : quoted_includes(e.path())) {
        const std::string top = inc.substr(0, inc.find('/'));
        if (!kAllowed.count(top)) continue;  // generated or system-style headers
        if (std::find(allowed.begin(), allowed.end(), top) == allowed.end())
          violations.push_back(fs::relative(e.path(), root).string() + " includes " + inc);
      }
    }
  }
  EXPECT_GT(files, 40) << "the walk found too few sources under " << root;
  for (const auto& v : violations) ADD_FAILURE() << v;
}
