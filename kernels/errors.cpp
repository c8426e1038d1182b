#include "kernels/errors.h"

namespace reformer {

std::string where(const char* what, const char* file, int line) {
  return std::string(what) + " (at " + file + ":" + std::to_string(line) + ")";
}

}  // namespace reformer
