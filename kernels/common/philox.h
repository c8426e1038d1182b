// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11).
//
// Every random quantity (parameter initialisation, data sampling, LSH
// rotations, dropout masks, benchmark inputs, generation sampling, test
// inputs) is a pure function of a stream key and an element counter, so any
// rank, any device and any recompute draws exactly the same numbers with no
// state to carry.
//
// Key layout. A stream is named by make_key(seed, purpose, a, b, c, d): the
// purpose is a required RngPurpose, the indices a..d mean what the purpose
// says (unused ones are 0):
//
//   purpose     a          b          c        d
//   init        param k    -          -        -     (framework/model.cpp)
//   data        split      sequence   -        -     (framework/data.cpp)
//   rotations   step       layer      head     -     (kernels/*/lsh.*)
//   dropout     step       layer      site     -     (kernels/*/elementwise.*)
//   bench       -          -          -        -     (launch/bench.cpp)
//   sampling    token idx  -          -        -     (framework/generator.cpp)
//   test        free       free       free     free  (tests only)
//
// The stream's Philox key (k0, k1) is a splitmix hash of (seed, purpose, a,
// b, c, d); the purpose is moreover the third counter word of every block:
// block i of a stream is philox4x32(i_lo, i_hi, purpose, 0; k0, k1). Philox
// is a bijection of the counter for a fixed key, so two streams of different
// purposes never produce the same block even if their hashed keys were
// equal; streams of one purpose differ by their hashed key
// (tests/cpu/test_rng.cpp enumerates the families and checks that every key
// is distinct).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define REFORMER_HD __host__ __device__ __forceinline__
#else
#define REFORMER_HD inline
#endif

namespace reformer {

struct Philox4 {
  uint32_t v[4];
};

// One Philox4x32-10 block: counter (c0..c3) under key (k0, k1).
REFORMER_HD Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                               uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = uint64_t(M0) * c0;
    const uint64_t p1 = uint64_t(M1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += W0; k1 += W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Mixes a 64-bit value (splitmix64 finaliser); used to fold key parts.
REFORMER_HD uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// What a stream is for: one fixed field of every key (see the layout above).
// Values are part of the numbers drawn; never renumber them.
enum class RngPurpose : uint32_t {
  init = 1,       // parameter initialisation
  data = 2,       // sampling training / evaluation sequences
  rotations = 3,  // LSH random rotations
  dropout = 4,    // dropout masks
  bench = 5,      // benchmark inputs
  sampling = 6,   // token sampling in generation
  test = 7,       // random inputs of tests
};

// A stream of random numbers; element i of the stream is a pure function of
// (key, purpose, i).
struct RngKey {
  uint64_t key;      // Philox key words k0 (low half) and k1 (high half)
  uint32_t purpose;  // the RngPurpose, the third counter word of every block
};

// The stream of `purpose` named by the seed and up to four indices (their
// meaning per purpose is in the layout above). Different tuples give
// unrelated streams.
REFORMER_HD RngKey make_key(uint64_t seed, RngPurpose purpose, uint64_t a = 0, uint64_t b = 0,
                            uint64_t c = 0, uint64_t d = 0) {
  uint64_t k = mix64(seed);
  k = mix64(k ^ uint64_t(purpose));
  k = mix64(k ^ (a + 0x1000193ull));
  k = mix64(k ^ (b + 0x2000329ull));
  k = mix64(k ^ (c + 0x40006b3ull));
  k = mix64(k ^ (d + 0x8000d67ull));
  return RngKey{k, uint32_t(purpose)};
}

// Four uniform 32-bit words for block i of the stream.
REFORMER_HD Philox4 rng_block(RngKey key, uint64_t i) {
  return philox4x32(uint32_t(i), uint32_t(i >> 32), key.purpose, 0u, uint32_t(key.key),
                    uint32_t(key.key >> 32));
}

// Uniform in [0, 1) from 32 random bits (24-bit resolution, exact in fp32).
REFORMER_HD float u32_to_unit(uint32_t x) { return float(x >> 8) * (1.0f / 16777216.0f); }

// Element i of the stream as a uniform float in [0, 1).
REFORMER_HD float rng_uniform(RngKey key, uint64_t i) {
  return u32_to_unit(rng_block(key, i).v[0]);
}

// Dropout's uniform for element i of a stream: word i % 4 of block i / 4, so
// one Philox block serves four consecutive elements (a dropout mask costs a
// quarter of the rounds rng_uniform would).
REFORMER_HD float dropout_uniform(RngKey key, uint64_t i) {
  return u32_to_unit(rng_block(key, i >> 2).v[i & 3]);
}

// Element i of the stream as a 32-bit word.
REFORMER_HD uint32_t rng_u32(RngKey key, uint64_t i) { return rng_block(key, i).v[0]; }

// Element i of the stream as a standard normal (Box-Muller on one block).
REFORMER_HD float rng_normal(RngKey key, uint64_t i) {
  const Philox4 b = rng_block(key, i);
  const float u1 = (float(b.v[0] >> 8) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
  const float u2 = u32_to_unit(b.v[1]);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
}

}  // namespace reformer
