// The op conformance harness: one list of op cases per family
// (test_conformance_*.cpp), each run on every device backend present (CUDA
// where a device is visible) against the fp64 CPU reference CpuOps<double>,
// as ggml's test-backend-ops does. Without a device every case skips; with
// REFORMER_CONFORMANCE_CPU=1 in the environment the CPU's Ops<float> is
// checked as a backend too (it checks the harness and the lists on machines
// without a GPU; the CPU ops themselves are tested by tests/cpu).
//
// A case names its op, its tensors (initial contents, which ones to check
// and with what tolerance) and one generic call, written once for Ops<float>
// and Ops<double>. The harness uploads the same float-representable inputs to
// each side, runs the call, downloads every tensor and compares:
//  - float tensors: |got - want| <= atol + rtol |want| + atol_max * max|want|
//    + atol_inc * max|want - initial| (the last two for GEMM-like sums whose
//    error scales with the output, or with the increment of an accumulated
//    gradient); integer tensors exactly;
//  - bitwise cases: also bit for bit against CpuOps<float> (ops the backends
//    promise to compute identically: copies, masks, sorts, argmax);
//  - deterministic cases (all but atomics): a second run gives the same bits.
// A backend whose supports(op) is false is skipped for that case.
// New op: add its entry to kernels/op_list.h and a case to one of the lists.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <ostream>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common/philox.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#if defined(REFORMER_HAVE_CUDA)
#include "kernels/cuda/cuda_ops.h"
#endif

namespace reformer::conformance {

// Tolerances by precision (see the header comment for the formula).
struct Tol {
  double atol = 0, rtol = 0, atol_max = 0, atol_inc = 0;
};
// fp32 result of one or two rounded operations on fp32 inputs of magnitude
// <= ~4 (device tanhf / expf / FMA contraction may differ from the host by a
// few ulp): rtol 1e-5 plus 1e-6 absolute for results near zero.
constexpr Tol kFp32Elementwise{1e-6, 1e-5};
// Reductions summed in fp32 in another order than the reference (layernorm,
// cross-entropy, optimizer statistics): rtol 1e-4, atol 1e-5 for O(1) data.
constexpr Tol kFp32Reduction{1e-5, 1e-4};
// GEMMs with bf16 inputs (8-bit mantissa, rounding 2^-9 ~ 2e-3 each) and fp32
// accumulation over C terms: 2e-2 of the output's largest magnitude.
constexpr Tol kBf16Gemm{0, 0, 2e-2};
// Attention: fp32 kernels, scores are sums of dh products of O(1) numbers,
// then softmax: 1e-4 absolute and relative (2e-4 absolute for dqk, which
// sums the query and the key side).
constexpr Tol kAttention{1e-4, 1e-4};
constexpr Tol kAttentionDqk{2e-4, 1e-4};

// Uniform values in [lo, hi) from the counter RNG; float-representable.
inline std::vector<double> random_values(int64_t n, uint64_t seed, double lo = -1.0, double hi = 1.0);

struct TensorSpec {
  std::string name;
  bool is_int = false;
  std::vector<double> values;  // initial contents (floats)
  // Where set, makes `values` when the case runs (check_case): random
  // inputs are drawn then, not when the lists are built, because every test
  // process builds every case of its binary.
  std::function<std::vector<double>()> make;
  std::vector<int32_t> ints;   // initial contents (ints)
  bool check = false;          // compared after the call
  Tol tol;
};

// An input: random values in [lo, hi), not compared.
inline TensorSpec input(const std::string& name, int64_t n, uint64_t seed, double lo = -1.0,
                 double hi = 1.0);
// An output or accumulated gradient: random initial values, compared with tol.
inline TensorSpec output(const std::string& name, int64_t n, uint64_t seed, Tol tol);
// Given float values, compared with tol when check.
inline TensorSpec values(const std::string& name, std::vector<double> v, bool check = false,
                  Tol tol = {});
inline TensorSpec ints(const std::string& name, std::vector<int32_t> v, bool check = false);
// An int32 output: initial -7 everywhere, compared exactly.
inline TensorSpec int_output(const std::string& name, int64_t n);

// The tensors of one case on one backend, by name.
template <class T>
class Ctx {
 public:
  T* operator()(const std::string& name) { return f_.at(name).data(); }
  int32_t* i(const std::string& name) { return i_.at(name).data(); }
  double scalar = 0.0;  // a value the call returns (sum_squares)

  std::map<std::string, Buffer<T>> f_;
  std::map<std::string, IntBuffer<T>> i_;
};

struct Case {
  std::string name;
  OpId op;
  std::vector<TensorSpec> tensors;
  std::function<void(Ops<float>&, Ctx<float>&)> run_f;
  std::function<void(Ops<double>&, Ctx<double>&)> run_d;
  bool bitwise = false;        // also bitwise equal to CpuOps<float>
  bool deterministic = true;   // two runs give the same bits
  double scalar_rtol = -1.0;   // >= 0: compare Ctx::scalar with this rtol
};

// A case from one generic call `[](auto& ops, auto& c) { ops.op(c("x"), ...); }`.
template <class F>
Case make_case(std::string name, OpId op, std::vector<TensorSpec> tensors, F call) {
  Case c;
  c.name = std::move(name);
  c.op = op;
  c.tensors = std::move(tensors);
  c.run_f = call;
  c.run_d = call;
  return c;
}

// One backend under test.
struct Backend {
  std::string name;
  std::unique_ptr<Ops<float>> ops;
};
// The device backends, plus CpuOps<float> when REFORMER_CONFORMANCE_CPU=1.
inline std::vector<Backend> all_backends();
// The device backends only (empty here without a GPU).
inline std::vector<Backend> device_backends();

// Runs the case on every backend and checks it (gtest expectations).
inline void check_case(const Case& c);

// Counts elements outside tol and reports the worst one.
inline void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                  const std::vector<double>& initial, const Tol& tol, const std::string& what);

// gtest parameter names: the case name with non-alphanumerics as '_'.
inline std::string case_test_name(const ::testing::TestParamInfo<Case>& info);


// ---------------------------------------------------------------- implementation

inline std::vector<double> random_values(int64_t n, uint64_t seed, double lo, double hi) {
  const RngKey key = make_key(seed, RngPurpose::test, 77);
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[size_t(i)] = double(float(lo) + float(hi - lo) * rng_uniform(key, uint64_t(i)));
  return v;
}

inline TensorSpec input(const std::string& name, int64_t n, uint64_t seed, double lo, double hi) {
  TensorSpec t;
  t.name = name;
  t.make = [=] { return random_values(n, seed, lo, hi); };
  return t;
}

inline TensorSpec output(const std::string& name, int64_t n, uint64_t seed, Tol tol) {
  TensorSpec t = input(name, n, seed);
  t.check = true;
  t.tol = tol;
  return t;
}

inline TensorSpec values(const std::string& name, std::vector<double> v, bool check, Tol tol) {
  TensorSpec t;
  t.name = name;
  t.values = std::move(v);
  t.check = check;
  t.tol = tol;
  return t;
}

inline TensorSpec ints(const std::string& name, std::vector<int32_t> v, bool check) {
  TensorSpec t;
  t.name = name;
  t.is_int = true;
  t.ints = std::move(v);
  t.check = check;
  return t;
}

inline TensorSpec int_output(const std::string& name, int64_t n) {
  return ints(name, std::vector<int32_t>(static_cast<size_t>(n), -7), true);
}

inline std::vector<Backend> all_backends() {
  std::vector<Backend> b;
  const char* cpu = std::getenv("REFORMER_CONFORMANCE_CPU");
  if (cpu != nullptr && std::string(cpu) == "1")
    b.push_back(Backend{"cpu", std::make_unique<CpuOps<float>>()});
  for (Backend& d : device_backends()) b.push_back(std::move(d));
  return b;
}

inline std::vector<Backend> device_backends() {
  std::vector<Backend> b;
#if defined(REFORMER_HAVE_CUDA)
  if (cuda_device_count() > 0) b.push_back(Backend{"cuda", make_cuda_ops()});
#endif
  return b;
}

// Every tensor of a case after its call on one Ops.
struct Outcome {
  std::map<std::string, std::vector<double>> f;
  std::map<std::string, std::vector<int32_t>> i;
  double scalar = 0.0;
};

template <class T>
Outcome run_on(Ops<T>& ops, const Case& c, const std::function<void(Ops<T>&, Ctx<T>&)>& call) {
  Ctx<T> ctx;
  for (const TensorSpec& t : c.tensors) {
    if (t.is_int) {
      IntBuffer<T> b(ops, int64_t(t.ints.size()));
      ops.from_host_i32(b.data(), t.ints.data(), int64_t(t.ints.size()));
      ctx.i_.emplace(t.name, std::move(b));
    } else {
      const std::vector<T> h(t.values.begin(), t.values.end());
      Buffer<T> b(ops, int64_t(h.size()));
      ops.from_host(b.data(), h.data(), int64_t(h.size()));
      ctx.f_.emplace(t.name, std::move(b));
    }
  }
  call(ops, ctx);
  Outcome o;
  o.scalar = ctx.scalar;
  for (const TensorSpec& t : c.tensors) {
    if (t.is_int) {
      std::vector<int32_t> h(t.ints.size());
      ops.to_host_i32(h.data(), ctx.i(t.name), int64_t(h.size()));
      o.i[t.name] = std::move(h);
    } else {
      std::vector<T> h(t.values.size());
      ops.to_host(h.data(), ctx(t.name), int64_t(h.size()));
      o.f[t.name] = std::vector<double>(h.begin(), h.end());
    }
  }
  return o;
}

inline void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                         const std::vector<double>& initial, const Tol& tol,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_want = 0.0, max_inc = 0.0;
  for (size_t k = 0; k < want.size(); ++k) {
    max_want = std::max(max_want, std::fabs(want[k]));
    if (k < initial.size()) max_inc = std::max(max_inc, std::fabs(want[k] - initial[k]));
  }
  const double atol = tol.atol + tol.atol_max * max_want + tol.atol_inc * max_inc;
  size_t bad = 0, worst = 0;
  double worst_excess = -1e300;
  for (size_t k = 0; k < got.size(); ++k) {
    const double err = std::fabs(got[k] - want[k]), lim = atol + tol.rtol * std::fabs(want[k]);
    if (!(err <= lim)) ++bad;
    if (!(err - lim <= worst_excess)) {
      worst_excess = err - lim;
      worst = k;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size()
                     << " outside tolerance; worst at " << worst << ": got " << got[worst]
                     << " want " << want[worst];
}

// Every checked tensor of a and b bit for bit.
inline void expect_identical(const Case& c, const Outcome& a, const Outcome& b,
                             const std::string& what) {
  for (const TensorSpec& t : c.tensors) {
    if (!t.check) continue;
    if (t.is_int) {
      EXPECT_EQ(a.i.at(t.name), b.i.at(t.name)) << t.name << ": " << what;
      continue;
    }
    const auto& x = a.f.at(t.name);
    const auto& y = b.f.at(t.name);
    size_t bad = 0;
    for (size_t k = 0; k < x.size(); ++k) bad += !(x[k] == y[k]);
    EXPECT_EQ(bad, 0u) << t.name << ": " << what;
  }
  if (c.scalar_rtol >= 0) EXPECT_EQ(a.scalar, b.scalar) << "returned value: " << what;
}

inline void check_case(const Case& listed) {
  std::vector<Backend> backends = all_backends();
  if (backends.empty()) GTEST_SKIP() << "no device backend (REFORMER_CONFORMANCE_CPU=1 checks the CPU)";
  Case c = listed;
  for (TensorSpec& t : c.tensors)
    if (t.make) t.values = t.make();
  CpuOps<double> ref_ops;
  const Outcome want = run_on<double>(ref_ops, c, c.run_d);
  Outcome cpu32;
  if (c.bitwise) {
    CpuOps<float> cpu;
    cpu32 = run_on<float>(cpu, c, c.run_f);
  }
  for (Backend& b : backends) {
    SCOPED_TRACE("backend " + b.name + ", case " + c.name);
    if (!b.ops->supports(c.op)) {
      std::printf("[ skip     ] %s on %s: not supported\n", c.name.c_str(), b.name.c_str());
      continue;
    }
    const Outcome got = run_on<float>(*b.ops, c, c.run_f);
    for (const TensorSpec& t : c.tensors) {
      if (!t.check) continue;
      if (t.is_int)
        EXPECT_EQ(got.i.at(t.name), want.i.at(t.name)) << t.name;
      else
        expect_close(got.f.at(t.name), want.f.at(t.name), t.values, t.tol, t.name);
    }
    if (c.scalar_rtol >= 0)
      EXPECT_NEAR(got.scalar, want.scalar, c.scalar_rtol * std::fabs(want.scalar) + 1e-300)
          << "returned value";
    if (c.bitwise) expect_identical(c, got, cpu32, "bitwise equal to CpuOps<float>");
    if (c.deterministic)
      expect_identical(c, got, run_on<float>(*b.ops, c, c.run_f), "two runs give the same bits");
  }
}

// gtest prints a case as its name.
inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

inline std::string case_test_name(const ::testing::TestParamInfo<Case>& info) {
  std::string s = info.param.name;
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

}  // namespace reformer::conformance

// The fixture every list instantiates: TEST_P(Family, Conforms) { check_case(GetParam()); }.
#define REFORMER_CONFORMANCE_SUITE(Family, list)                                  \
  class Family : public ::testing::TestWithParam<::reformer::conformance::Case> {}; \
  TEST_P(Family, Conforms) { ::reformer::conformance::check_case(GetParam()); }    \
  INSTANTIATE_TEST_SUITE_P(Ops, Family, ::testing::ValuesIn(list),                 \
                           ::reformer::conformance::case_test_name)
