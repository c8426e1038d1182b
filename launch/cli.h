// Command-line plumbing shared by the `reformer` commands: the usage error
// (exit status 2), an option's value, and numbers read whole.
#pragma once

#include <charconv>
#include <sstream>
#include <string>
#include <system_error>
#include <type_traits>

#include "kernels/errors.h"

namespace reformer {

// A bad command line: main prints it and exits 2.
struct UsageError : Error {
  using Error::Error;
};

// argv[i + 1], the value of the option `flag` at argv[i]; advances i past it.
// Throws UsageError when the command line ends first.
inline std::string option_value(int argc, char** argv, int& i, const char* flag) {
  if (i + 1 >= argc) throw UsageError(std::string(flag) + " needs a value");
  return argv[++i];
}

// The number `text` given to `flag`, in [lo, hi], read whole (std::from_chars:
// no sign prefix '+', no spaces, no trailing characters); else a UsageError
// naming the option.
template <class N>
N parse_number(const char* flag, const std::string& text, N lo, N hi) {
  N v{};
  const auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  const char* what = std::is_integral_v<N> ? "' is not a whole number" : "' is not a number";
  if (text.empty() || r.ptr != text.data() + text.size() || r.ec == std::errc::invalid_argument)
    throw UsageError(std::string(flag) + ": '" + text + what);
  if (r.ec == std::errc::result_out_of_range || !(v >= lo && v <= hi)) {
    std::ostringstream range;
    range << " is out of range [" << lo << ", " << hi << "]";
    throw UsageError(std::string(flag) + ": " + text + range.str());
  }
  return v;
}

}  // namespace reformer
