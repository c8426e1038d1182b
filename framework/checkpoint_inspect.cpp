// `reformer inspect`: a human-readable report on one checkpoint file.
#include <filesystem>
#include <sstream>

#include "framework/checkpoint.h"
#include "framework/checkpoint_hdf5.h"
#include "framework/checkpoint_read.h"

namespace reformer {
namespace {

constexpr int kConfigSummaryLines = 12;

std::string with_commas(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return (v < 0 ? "-" : "") + out;
}


}  // namespace

bool inspect_checkpoint(const std::string& path, std::ostream& out) {
  using namespace ckpt;
  namespace fs = std::filesystem;
  silence_hdf5_errors();
  Scan scan;
  try {
    scan_file(path, false, scan);
  } catch (const Problem& p) {  // not expected in collecting mode; stay non-throwing anyway
    scan.problems.push_back(p.what);
  } catch (const std::exception& e) {
    scan.problems.push_back(std::string("internal error: ") + e.what());
  }
  const CheckpointState& s = scan.state;
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  out << "file           : " << path;
  if (!ec) out << " (" << with_commas(static_cast<int64_t>(size)) << " bytes)";
  out << "\n";
  if (scan.opened) {
    out << "format         : " << (scan.format.empty() ? "?" : scan.format) << " version "
        << (scan.format_version < 0 ? std::string("?") : std::to_string(scan.format_version))
        << ", written by build " << (scan.build_version.empty() ? "?" : scan.build_version) << "\n";
    out << "step           : " << s.step << "\n";
    out << "tokens seen    : " << with_commas(s.tokens_seen) << "\n";
    out << "samples drawn  : " << with_commas(s.samples_drawn) << "\n";
    out << "seed           : " << s.seed << "\n";
    out << "world          : dp " << s.dp << " x sp " << s.sp << "\n";
    out << "optimizer      : " << (s.optimizer_name.empty() ? "?" : s.optimizer_name) << "\n";

    std::vector<std::string> lines;
    std::istringstream text(s.config_text);
    for (std::string line; std::getline(text, line);) lines.push_back(line);
    out << "config         : " << lines.size() << " lines";
    if (lines.size() > static_cast<size_t>(kConfigSummaryLines))
      out << " (first " << kConfigSummaryLines << " shown)";
    out << "\n";
    for (size_t i = 0; i < lines.size() && i < static_cast<size_t>(kConfigSummaryLines); ++i)
      out << "    " << lines[i] << "\n";

    int64_t params = 0, tensors = 0;
    for (const auto& d : scan.datasets)
      if (d.full.rfind("/model/", 0) == 0) {
        ++tensors;
        if (numel(d.shape) > 0) params += numel(d.shape);
      }
    out << "parameters     : " << with_commas(params) << " in " << tensors << " tensors\n";

    size_t wname = 7, wshape = 5, wtype = 5;
    for (const auto& d : scan.datasets) {
      wname = std::max(wname, d.full.size());
      wshape = std::max(wshape, shape_str(d.shape).size());
      wtype = std::max(wtype, d.dtype.size());
    }
    auto pad = [](const std::string& v, size_t w) {
      return v + std::string(w - std::min(w, v.size()), ' ');
    };
    out << "datasets       : " << scan.datasets.size() << "\n";
    out << "  " << pad("dataset", wname) << "  " << pad("shape", wshape) << "  "
        << pad("dtype", wtype) << "  checksum\n";
    for (const auto& d : scan.datasets) {
      out << "  " << pad(d.full, wname) << "  "
          << pad(d.shape.empty() ? "?" : shape_str(d.shape), wshape) << "  " << pad(d.dtype, wtype)
          << "  ";
      if (d.ok)
        out << "ok\n";
      else
        out << "FAILED (" << d.problem << ")\n";
    }
  }
  const bool valid = scan.problems.empty();
  if (valid) {
    out << "status         : valid\n";
  } else {
    out << "status         : INVALID, " << scan.problems.size() << " problem"
        << (scan.problems.size() == 1 ? "" : "s") << "\n";
    for (const auto& p : scan.problems) out << "  - " << p << "\n";
  }
  return valid;
}

}  // namespace reformer
