// Stream keys of the counter-based RNG (kernels/common/philox.h): every
// purpose's family of keys is distinct from every other key, so no random
// quantity of the model can repeat the numbers of another.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kernels/common/philox.h"

namespace reformer {
namespace {

struct NamedKey {
  RngKey key;
  std::string name;  // purpose and indices, for the failure message
};

// Every key each purpose uses, over small index ranges and a few seeds:
// the ranges the model reaches first (step, layer, head, site, parameter,
// split and sequence indices all start at 0).
std::vector<NamedKey> key_families() {
  std::vector<NamedKey> keys;
  auto add = [&](uint64_t seed, RngPurpose p, const char* name, uint64_t a = 0, uint64_t b = 0,
                 uint64_t c = 0) {
    keys.push_back({make_key(seed, p, a, b, c),
                    std::string(name) + "(seed " + std::to_string(seed) + ", " +
                        std::to_string(a) + ", " + std::to_string(b) + ", " + std::to_string(c) +
                        ")"});
  };
  for (uint64_t seed : {0ull, 1ull, 2ull, 1234ull}) {
    for (uint64_t k = 0; k < 64; ++k) add(seed, RngPurpose::init, "init", k);
    for (uint64_t split = 0; split < 3; ++split)
      for (uint64_t i = 0; i < 64; ++i) add(seed, RngPurpose::data, "data", split, i);
    for (uint64_t step = 0; step < 8; ++step)
      for (uint64_t layer = 0; layer < 8; ++layer) {
        for (uint64_t head = 0; head < 8; ++head)
          add(seed, RngPurpose::rotations, "rotations", step, layer, head);
        for (uint64_t site = 0; site < 4; ++site)
          add(seed, RngPurpose::dropout, "dropout", step, layer, site);
      }
    add(seed, RngPurpose::bench, "bench");
    for (uint64_t i = 0; i < 64; ++i) add(seed, RngPurpose::sampling, "sampling", i);
    for (uint64_t i = 0; i < 64; ++i) add(seed, RngPurpose::test, "test", i);
  }
  return keys;
}

TEST(RngKeys, EveryKeyOfEveryFamilyIsDistinct) {
  const std::vector<NamedKey> keys = key_families();
  // The hashed 64-bit keys alone are already distinct, across purposes too;
  // the purpose in the counter makes cross-purpose equality impossible anyway.
  std::map<uint64_t, const NamedKey*> seen;
  for (const NamedKey& k : keys) {
    auto [it, inserted] = seen.emplace(k.key.key, &k);
    EXPECT_TRUE(inserted) << k.name << " has the key of " << it->second->name;
  }
  EXPECT_EQ(seen.size(), keys.size());
}

TEST(RngKeys, PurposeIsPartOfTheCounter) {
  // Two streams with the same Philox key but different purposes still differ.
  const RngKey a{0x0123456789abcdefull, uint32_t(RngPurpose::init)};
  const RngKey b{0x0123456789abcdefull, uint32_t(RngPurpose::dropout)};
  for (uint64_t i = 0; i < 16; ++i) EXPECT_NE(rng_u32(a, i), rng_u32(b, i)) << i;
  EXPECT_EQ(make_key(5, RngPurpose::data, 1).purpose, uint32_t(RngPurpose::data));
}

// Where positional indices used to collide: parameter k's initialisation
// stream was (seed, 2, k), the attention-dropout stream of step 2, layer k;
// data sequence (split, i) was (seed, 3, split, i), a dropout stream of
// step 3. Each pair now draws unrelated numbers.
TEST(RngKeys, FormerCollisionsNowDiffer) {
  for (uint64_t seed : {0ull, 42ull}) {
    for (uint64_t k = 0; k < 8; ++k) {
      const RngKey init = make_key(seed, RngPurpose::init, k);
      const RngKey drop = make_key(seed, RngPurpose::dropout, 2, k, 0);
      EXPECT_NE(init.key, drop.key);
      int equal = 0;
      for (uint64_t i = 0; i < 64; ++i) equal += rng_normal(init, i) == rng_normal(drop, i);
      EXPECT_EQ(equal, 0) << "init k=" << k;
    }
    for (uint64_t split = 0; split < 3; ++split)
      for (uint64_t i = 0; i < 8; ++i) {
        const RngKey data = make_key(seed, RngPurpose::data, split, i);
        const RngKey drop = make_key(seed, RngPurpose::dropout, 3, split, i);
        EXPECT_NE(data.key, drop.key);
        EXPECT_NE(rng_block(data, 0).v[0], rng_block(drop, 0).v[0]);
      }
  }
}

TEST(RngKeys, StreamsAreDeterministic) {
  const RngKey a = make_key(9, RngPurpose::rotations, 1, 2, 3);
  const RngKey b = make_key(9, RngPurpose::rotations, 1, 2, 3);
  EXPECT_EQ(a.key, b.key);
  EXPECT_EQ(a.purpose, b.purpose);
  for (uint64_t i = 0; i < 8; ++i) EXPECT_EQ(rng_normal(a, i), rng_normal(b, i));
}

}  // namespace
}  // namespace reformer
