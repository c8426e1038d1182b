// Conformance of decode_attention (harness: conformance.h) against the fp64
// CPU reference: one query per head against gathered sets of cached keys -
// full-attention-like prefixes, LSH-like sets over several rounds with an
// empty set and repeated keys, the widest head the device supports, and odd
// sizes.
#include <string>
#include <vector>

#include "kernels/errors.h"
#include "tests/gpu/conformance.h"

using namespace reformer;
using namespace reformer::conformance;

namespace {

struct DecodeShape {
  int heads, rounds, dh;
  int64_t positions;  // cached positions; the query is the last
  bool sparse;        // LSH-like sets (every third position, one empty set) or prefixes
};

std::vector<Case> decode_cases() {
  const DecodeShape shapes[] = {
      {2, 1, 64, 97, false},    // full attention over an odd-length prefix
      {4, 3, 32, 200, true},    // LSH-like: three rounds
      {1, 2, 128, 1025, true},  // widest head, long cache
      {3, 1, 24, 1, false},     // only the query itself
      {2, 4, 65, 50, true},     // odd width
  };
  std::vector<Case> cases;
  for (const DecodeShape& c : shapes) {
    DecodeAttentionParams p;
    p.heads = c.heads;
    p.rounds = c.rounds;
    p.dh = c.dh;
    p.ld = int64_t(c.heads) * c.dh + 5;  // rows of a wider cache
    p.q_pos = c.positions - 1;
    std::vector<int32_t> sets, keys;
    for (int u = 0; u < c.heads * c.rounds; ++u) {
      const int32_t begin = int32_t(keys.size());
      if (!c.sparse) {
        for (int64_t j = 0; j < c.positions; ++j) keys.push_back(int32_t(j));
      } else if (u != 1) {  // set 1 stays empty
        for (int64_t j = (u % 3); j < c.positions; j += 3) keys.push_back(int32_t(j));
        keys.push_back(int32_t(p.q_pos));  // the query's own position
        keys.push_back(0);                 // a key repeated within the set
      }
      sets.push_back(begin);
      sets.push_back(int32_t(keys.size()) - begin);
    }
    const int64_t n = c.positions * p.ld;
    const std::string name = "decode_attention heads" + std::to_string(c.heads) + " rounds" +
                             std::to_string(c.rounds) + " dh" + std::to_string(c.dh) + " n" +
                             std::to_string(c.positions) + (c.sparse ? " sparse" : " prefix");
    cases.push_back(make_case(
        name, OpId::decode_attention,
        {input("q", int64_t(c.heads) * c.dh, 80, -1.5, 1.5), input("k", n, 81),
         input("v", n, 82), ints("sets", sets), ints("keys", keys),
         output("out", int64_t(c.heads) * c.dh, 83, kAttention)},
        [p](auto& ops, auto& t) {
          ops.decode_attention(t("out"), t("q"), t("k"), t("v"), t.i("sets"), t.i("keys"), p);
        }));
  }
  return cases;
}

// lsh_decode_keys: a bucket history with skewed buckets (one bucket holds
// most positions), at the first position, inside the first tile, across
// several of the kernel's 2,048-position tiles, and at the last slot.
std::vector<Case> decode_keys_cases() {
  struct KeysShape {
    int units;
    int64_t capacity, pos;
  };
  const KeysShape shapes[] = {{3, 10, 0}, {5, 700, 613}, {2, 5000, 4999}, {32, 4100, 4096}};
  std::vector<Case> cases;
  for (const KeysShape& c : shapes) {
    std::vector<int32_t> history(size_t(c.units * c.capacity)), buckets(size_t(c.units));
    uint64_t x = 0x9e3779b97f4a7c15ull * uint64_t(c.capacity + c.units);
    for (int32_t& h : history) {
      x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
      const uint32_t r = uint32_t((x * 0x2545f4914f6cdd1dull) >> 40);
      h = r % 4 == 0 ? int32_t(r % 7) : 3;  // bucket 3 holds about 3/4
    }
    // The new position's buckets 3 apart (stride 3), as a prefill reads
    // one row of a [units, rows] table.
    buckets.assign(size_t(3 * c.units), -1);
    for (int u = 0; u < c.units; ++u) buckets[size_t(3 * u)] = u % 2 == 0 ? 3 : u % 7;
    const std::string name = "lsh_decode_keys units" + std::to_string(c.units) + " cap" +
                             std::to_string(c.capacity) + " pos" + std::to_string(c.pos);
    cases.push_back(make_case(
        name, OpId::lsh_decode_keys,
        {ints("history", history, true), ints("buckets", buckets),
         int_output("keys", int64_t(c.units) * c.capacity), int_output("sets", 2 * c.units)},
        [c](auto& ops, auto& t) {
          ops.lsh_decode_keys(t.i("keys"), t.i("sets"), t.i("history"), t.i("buckets"), 3,
                              c.units, c.capacity, c.pos);
        }));
  }
  return cases;
}

REFORMER_CONFORMANCE_SUITE(DecodeOps, decode_cases());
REFORMER_CONFORMANCE_SUITE(DecodeKeysOps, decode_keys_cases());

// The CUDA kernel holds a head in registers up to dh = 128 and refuses wider
// heads with ShapeError (the CPU has no such limit).
TEST(DecodeLimits, DeviceRejectsWideHeads) {
  std::vector<Backend> backends = device_backends();
  if (backends.empty()) GTEST_SKIP() << "no device backend";
  for (Backend& b : backends) {
    SCOPED_TRACE("backend " + b.name);
    DecodeAttentionParams p;
    p.heads = 1;
    p.dh = 129;
    p.ld = 129;
    Buffer<float> x(*b.ops, 129);
    IntBuffer<float> s(*b.ops, 2);
    EXPECT_THROW(b.ops->decode_attention(x.data(), x.data(), x.data(), x.data(), s.data(),
                                         s.data(), p),
                 ShapeError);
  }
}

}  // namespace
