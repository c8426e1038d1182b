// Test data and comparisons shared by the GPU block tests: a fixed pattern
// of values in [-1, 1] (a linear congruential sequence, three decimals),
// and bit-for-bit equality of float vectors.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace reformer::test {

inline std::vector<float> pattern(int64_t n, uint32_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  uint32_t s = seed;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = float(int32_t(s >> 8) % 2001 - 1000) / 1000.0f;
  }
  return v;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace reformer::test
