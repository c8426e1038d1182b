// Conformance cases of the dense ops: elementwise, embedding, layernorm,
// matmul, activation, loss and optimizers (harness: conformance.h). Sizes
// include odd ones (97, 65, 1025) beside powers of two; backward ops start
// from nonzero gradient buffers, since gradients accumulate.
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "tests/gpu/conformance.h"

using namespace reformer;
using namespace reformer::conformance;

namespace {

std::string sz(int64_t n) { return std::to_string(n); }

// Row mean and 1 / sqrt(var + eps) of x [N, C], in double: the layernorm
// backward cases start from the same statistics on every side.
std::pair<std::vector<double>, std::vector<double>> row_stats(const std::vector<double>& x,
                                                              int64_t N, int C, double eps) {
  std::vector<double> m(static_cast<size_t>(N)), r(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    double s = 0, q = 0;
    for (int c = 0; c < C; ++c) s += x[size_t(n * C + c)];
    const double mean = s / C;
    for (int c = 0; c < C; ++c) q += (x[size_t(n * C + c)] - mean) * (x[size_t(n * C + c)] - mean);
    m[size_t(n)] = double(float(mean));
    r[size_t(n)] = double(float(1.0 / std::sqrt(q / C + eps)));
  }
  return {m, r};
}

void add_elementwise(std::vector<Case>& cases) {
  // 65536: the float4 kernels; the others one element per thread.
  for (int64_t n : {int64_t(1), int64_t(97), int64_t(1025), int64_t(65536), int64_t(65536 + 3)}) {
    const std::string s = " n=" + sz(n);
    Case c = make_case("fill" + s, OpId::fill, {output("x", n, 1, kFp32Elementwise)},
                       [n](auto& ops, auto& t) { ops.fill(t("x"), 2.5f, n); });
    c.bitwise = true;
    cases.push_back(c);
    c = make_case("add" + s, OpId::add,
                  {input("a", n, 1), input("b", n, 2), output("out", n, 3, kFp32Elementwise)},
                  [n](auto& ops, auto& t) { ops.add(t("out"), t("a"), t("b"), n); });
    c.bitwise = true;
    cases.push_back(c);
    // out aliases a.
    c = make_case("sub in place" + s, OpId::sub,
                  {output("a", n, 1, kFp32Elementwise), input("b", n, 2)},
                  [n](auto& ops, auto& t) { ops.sub(t("a"), t("a"), t("b"), n); });
    c.bitwise = true;
    cases.push_back(c);
    // axpy: rounded multiply then add on every backend: bitwise equal to the CPU.
    c = make_case("axpy" + s, OpId::axpy, {output("y", n, 1, kFp32Elementwise), input("x", n, 2)},
                  [n](auto& ops, auto& t) { ops.axpy(t("y"), 0.75f, t("x"), n); });
    c.bitwise = true;
    cases.push_back(c);
    cases.push_back(make_case("scale" + s, OpId::scale, {output("x", n, 1, kFp32Elementwise)},
                              [n](auto& ops, auto& t) { ops.scale(t("x"), -1.5f, n); }));
    c = make_case("copy" + s, OpId::copy, {input("a", n, 1), output("out", n, 3, kFp32Elementwise)},
                  [n](auto& ops, auto& t) { ops.copy(t("out"), t("a"), n); });
    c.bitwise = true;
    cases.push_back(c);
    // A stash and back: the CPU's is exact, CUDA's rounds each value to bf16
    // (relative 2^-9); the stash itself is in each backend's own layout.
    for (OpId id : {OpId::stash, OpId::unstash}) {
      c = make_case(std::string(id == OpId::stash ? "stash" : "unstash") + s, id,
                    {input("a", n, 1), input("kept", n, 2),
                     output("out", n, 3, Tol{1e-30, 2.0 / 512})},
                    [n](auto& ops, auto& t) {
                      ops.stash(t("kept"), t("a"), n);
                      ops.unstash(t("out"), t("kept"), n);
                    });
      cases.push_back(c);
    }
    // Sum of squares in double: only the summation order differs.
    c = make_case("sum_squares" + s, OpId::sum_squares, {input("x", n, 1)},
                  [n](auto& ops, auto& t) { t.scalar = ops.sum_squares(t("x"), n); });
    c.scalar_rtol = 1e-12;
    cases.push_back(c);
    // Dropout masks are the same counter-RNG draws on every backend: in
    // place, into another buffer, and added with a sign at an offset that is
    // not a multiple of 4 (a Philox block split across the call's edges).
    c = make_case("dropout in place" + s, OpId::dropout, {output("x", n, 1, kFp32Elementwise)},
                  [n](auto& ops, auto& t) {
                    ops.dropout(t("x"), t("x"), n, 0.3f, 11, 5, 2, 1, 1000, 1.0f, false,
                                nullptr);
                  });
    c.bitwise = true;
    cases.push_back(c);
    c = make_case("dropout into out" + s, OpId::dropout,
                  {input("x", n, 1), output("out", n, 2, kFp32Elementwise)},
                  [n](auto& ops, auto& t) {
                    ops.dropout(t("out"), t("x"), n, 0.2f, 11, 5, 2, 1, 4096, 1.0f, false,
                                nullptr);
                  });
    c.bitwise = true;
    cases.push_back(c);
    c = make_case("dropout subtracted" + s, OpId::dropout,
                  {input("x", n, 1), output("out", n, 2, kFp32Elementwise)},
                  [n](auto& ops, auto& t) {
                    ops.dropout(t("out"), t("x"), n, 0.2f, 11, 5, 2, 1, 1001, -1.0f, true,
                                nullptr);
                  });
    c.bitwise = true;
    cases.push_back(c);
    // Onto a residual elsewhere: out = res + dropout(x), out's old values unread.
    c = make_case("dropout onto a residual" + s, OpId::dropout,
                  {input("x", n, 1), input("res", n, 3), output("out", n, 2, kFp32Elementwise)},
                  [n](auto& ops, auto& t) {
                    ops.dropout(t("out"), t("x"), n, 0.2f, 11, 5, 2, 1, 4096, 1.0f, true,
                                t("res"));
                  });
    c.bitwise = true;
    cases.push_back(c);
  }
  // Overlapping copy has memmove semantics.
  Case c = make_case("copy overlapping", OpId::copy, {output("x", 1025, 3, kFp32Elementwise)},
                     [](auto& ops, auto& t) { ops.copy(t("x") + 7, t("x"), 1000); });
  c.bitwise = true;
  cases.push_back(c);
  // A strided stash and back into other strides, and a contiguous stash
  // taken back by rows (the sequence-parallel exchange's pairs of calls):
  // values rounded as the 1-d stash rounds them. Even columns, strides and
  // offsets: two columns a lane; odd ones: one.
  for (int64_t w : {int64_t(0), int64_t(1)}) {
    const int64_t srows = 37, scols = 1026 + w, sld = 1030 + w;
    const std::string s = w ? " odd" : " pairs";
    c = make_case("stash_2d" + s, OpId::stash_2d,
                  {input("a", srows * sld, 1), input("kept", srows * scols, 2),
                   output("out", srows * sld, 3, Tol{1e-30, 2.0 / 512})},
                  [=](auto& ops, auto& t) {
                    ops.stash_2d(t("kept"), t("a") + 2 * w, sld, srows, scols);
                    ops.unstash_2d(t("out") + 2 + w, sld, t("kept"), srows, scols);
                  });
    cases.push_back(c);
    c = make_case("unstash_2d" + s, OpId::unstash_2d,
                  {input("a", srows * scols, 1), input("kept", srows * scols, 2),
                   output("out", srows * sld, 3, Tol{1e-30, 2.0 / 512})},
                  [=](auto& ops, auto& t) {
                    ops.stash(t("kept"), t("a"), srows * scols);
                    ops.unstash_2d(t("out") + 2 * w, sld, t("kept"), srows, scols);
                  });
    cases.push_back(c);
  }
  const int64_t rows = 97, cols = 65, ld_src = 130, ld_dst = 71;
  c = make_case("copy_2d", OpId::copy_2d,
                {input("src", rows * ld_src, 4), output("dst", rows * ld_dst, 5, kFp32Elementwise)},
                [=](auto& ops, auto& t) {
                  ops.copy_2d(t("dst"), ld_dst, t("src") + 3, ld_src, rows, cols);
                });
  c.bitwise = true;
  cases.push_back(c);
  c = make_case("add_2d", OpId::add_2d,
                {input("src", rows * ld_src, 4), output("dst", rows * ld_dst, 5, kFp32Elementwise)},
                [=](auto& ops, auto& t) {
                  ops.add_2d(t("dst") + 1, ld_dst, t("src"), ld_src, rows - 1, cols);
                });
  c.bitwise = true;
  cases.push_back(c);
  // Rows of float4 (columns, strides and pointers multiples of 4), wider
  // than one block of threads.
  const int64_t wcols = 1032, wld_src = 1040, wld_dst = 1036;
  c = make_case("copy_2d float4", OpId::copy_2d,
                {input("src", rows * wld_src, 4),
                 output("dst", rows * wld_dst, 5, kFp32Elementwise)},
                [=](auto& ops, auto& t) {
                  ops.copy_2d(t("dst") + 4, wld_dst, t("src"), wld_src, rows - 1, wcols);
                });
  c.bitwise = true;
  cases.push_back(c);
  c = make_case("add_2d float4", OpId::add_2d,
                {input("src", rows * wld_src, 4),
                 output("dst", rows * wld_dst, 5, kFp32Elementwise)},
                [=](auto& ops, auto& t) {
                  ops.add_2d(t("dst"), wld_dst, t("src") + 8, wld_src, rows - 1, wcols);
                });
  c.bitwise = true;
  cases.push_back(c);
  // Rows picked out of order, repeated and skipped (idx < 0), set and added.
  std::vector<int32_t> idx(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) idx[size_t(r)] = r % 9 == 4 ? -1 : int32_t((r * 37) % 60);
  for (bool accumulate : {false, true}) {
    c = make_case(accumulate ? "gather_rows accumulate" : "gather_rows", OpId::gather_rows,
                  {input("src", rows * ld_src, 4), ints("idx", idx),
                   output("dst", rows * ld_dst, 5, kFp32Elementwise)},
                  [=](auto& ops, auto& t) {
                    ops.gather_rows(t("dst"), ld_dst, t("src") + 2, ld_src, t.i("idx"), rows,
                                    cols, accumulate);
                  });
    c.bitwise = true;
    cases.push_back(c);
    // Four columns per thread where the shapes and addresses allow it.
    const int64_t cols4 = 64, ld_src4 = 132, ld_dst4 = 68;
    c = make_case(accumulate ? "gather_rows vec4 accumulate" : "gather_rows vec4",
                  OpId::gather_rows,
                  {input("src", rows * ld_src4, 4), ints("idx", idx),
                   output("dst", rows * ld_dst4, 5, kFp32Elementwise)},
                  [=](auto& ops, auto& t) {
                    ops.gather_rows(t("dst") + 4, ld_dst4, t("src") + 8, ld_src4, t.i("idx"),
                                    rows - 1, cols4, accumulate);
                  });
    c.bitwise = true;
    cases.push_back(c);
  }
}

void add_embedding(std::vector<Case>& cases) {
  const int64_t L = 97, offset = 13;
  const int D = 65, d1 = 32, a2 = 10, a1 = 12, V = 29;
  std::vector<int32_t> tokens(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) tokens[size_t(i)] = int32_t((i * 7 + 3) % V);
  Case c = make_case("embedding_forward", OpId::embedding_forward,
                     {ints("tokens", tokens), input("wte", int64_t(V) * D, 6),
                      input("pos1", int64_t(a1) * d1, 7), input("pos2", int64_t(a2) * (D - d1), 8),
                      output("out", L * D, 9, kFp32Elementwise)},
                     [=](auto& ops, auto& t) {
                       ops.embedding_forward(t("out"), t.i("tokens"), t("wte"), t("pos1"),
                                             t("pos2"), L, D, d1, a2, offset);
                     });
  c.bitwise = true;
  cases.push_back(c);
  // CUDA sums dwte over the positions sorted by token, window by window
  // (kernels/common/embedding_sums.h): here within one window; the case
  // below crosses windows.
  c = make_case("embedding_backward", OpId::embedding_backward,
                {ints("tokens", tokens), input("dout", L * D, 9),
                 output("dwte", int64_t(V) * D, 10, kFp32Elementwise),
                 output("dpos1", int64_t(a1) * d1, 11, kFp32Elementwise),
                 output("dpos2", int64_t(a2) * (D - d1), 12, kFp32Elementwise)},
                [=](auto& ops, auto& t) {
                  ops.embedding_backward(t("dwte"), t("dpos1"), t("dpos2"), t("dout"),
                                         t.i("tokens"), L, D, d1, a2, offset);
                });
  cases.push_back(c);
  // dwte alone over 2,000 positions (8 windows of kDwteWindow sorted slots)
  // and 300 columns (3 column blocks, the last short): token 0 at every third
  // position (slots 0-666: windows 0 to 2, ending in window 2's head part),
  // tokens 1, 2, 3, 5 and 7 each crossing one window's end (a tail part and
  // a head part), 4, 6, 8 and 9 within one window (9 at the last slots);
  // sums of up to 667 rows of O(1) values: fp32 rounding of 1e-5 of the
  // largest sum on top of kFp32Reduction (a row missed or added twice is
  // off by O(1)).
  {
    const int64_t Ls = 2000;
    const int Ds = 300, Vs = 10;
    std::vector<int32_t> tok(static_cast<size_t>(Ls));
    for (int64_t i = 0; i < Ls; ++i) {
      const int64_t h = (i * 2654435761u) % 97;
      tok[size_t(i)] = i % 3 == 0 ? 0 : i % 4 == 1 ? 1 : i >= Ls - 40 ? 9 : int32_t(2 + h % 7);
    }
    c = make_case("embedding_backward dwte across windows", OpId::embedding_backward,
                  {ints("tokens", tok), input("dout", Ls * Ds, 13),
                   output("dwte", int64_t(Vs) * Ds, 14, Tol{1e-5, 1e-4, 0, 1e-5})},
                  [=](auto& ops, auto& t) {
                    ops.embedding_backward(t("dwte"), nullptr, nullptr, t("dout"), t.i("tokens"),
                                           Ls, Ds, 0, 1, 0);
                  });
    cases.push_back(c);
  }
}

void add_layernorm(std::vector<Case>& cases) {
  // Widths for every register kernel of the CUDA LayerNorm (<= 256, 1024,
  // 2048, 4096 columns) and one beyond them; 5000 rows of 200: more rows
  // than the one-pass backward's 512 blocks of 8 warps, so warps take
  // several rows (and the last block fewer). The forward and the one-pass
  // backward read rows by float4 where C % 4 == 0: 516 ends inside their
  // quads' second sweep, 1022 and 65 take the scalar path.
  for (auto [N, C] : {std::pair<int64_t, int>{97, 65}, {128, 1024}, {3, 1025}, {1500, 2048},
                      {600, 4096}, {40, 4100}, {5000, 200}, {257, 516}, {64, 1022}}) {
    const std::string s = " " + sz(N) + "x" + sz(C);
    // fp32 row statistics vs double: a few ulp of the row scale.
    cases.push_back(make_case(
        "layernorm_forward" + s, OpId::layernorm_forward,
        {input("x", N * C, 20, -2.0, 3.0), input("w", C, 21, 0.5, 1.5), input("b", C, 22),
         output("out", N * C, 23, {1e-5, 1e-5}), output("mean", N, 24, {1e-6, 1e-5}),
         output("rstd", N, 25, {0, 1e-5})},
        [=](auto& ops, auto& t) {
          ops.layernorm_forward(t("out"), t("mean"), t("rstd"), t("x"), t("w"), t("b"), N, C,
                                1e-6f);
        }));
    // x and its statistics, made when the case runs.
    TensorSpec mean = values("mean", {}), rstd = values("rstd", {});
    const auto stats = [N, C] {
      return row_stats(random_values(N * C, 20, -2.0, 3.0), N, C, 1e-6);
    };
    mean.make = [stats] { return stats().first; };
    rstd.make = [stats] { return stats().second; };
    cases.push_back(make_case(
        "layernorm_backward" + s, OpId::layernorm_backward,
        {input("x", N * C, 20, -2.0, 3.0), input("w", C, 21, 0.5, 1.5), mean, rstd,
         input("dout", N * C, 26), output("dinp", N * C, 27, kFp32Reduction),
         output("dw", C, 28, {1e-5, 1e-5}), output("db", C, 29, {1e-5, 1e-5})},
        [=](auto& ops, auto& t) {
          ops.layernorm_backward(t("dinp"), t("dw"), t("db"), t("dout"), t("x"), t("w"),
                                 t("mean"), t("rstd"), N, C);
        }));
  }
}

void add_matmul(std::vector<Case>& cases) {
  struct Shape {
    int64_t N;
    int C, OC;
  };
  for (const Shape sh : {Shape{97, 65, 1025}, Shape{128, 256, 512}, Shape{1, 64, 3}}) {
    const int64_t N = sh.N;
    const int C = sh.C, OC = sh.OC;
    const std::string s = " N=" + sz(N) + " C=" + sz(C) + " OC=" + sz(OC);
    for (bool bias : {true, false})
      cases.push_back(make_case(
          std::string("matmul_forward") + (bias ? " bias" : "") + s, OpId::matmul_forward,
          {input("x", N * C, 30), input("w", int64_t(C) * OC, 31), input("bias", OC, 32),
           output("out", N * OC, 33, kBf16Gemm)},
          [=](auto& ops, auto& t) {
            ops.matmul_forward(t("out"), t("x"), t("w"), bias ? t("bias") : nullptr, N, C, OC);
          }));
    // A residual branch added or taken away: out starts nonzero; 2e-2 of the
    // increment's scale (atol_inc), as for accumulated gradients.
    // With a residual elsewhere: out = res + branch, out's old values unread.
    for (float alpha : {1.0f, -1.0f})
      for (bool bias : {true, false})
        for (bool res : {false, true})
          cases.push_back(make_case(
              std::string("matmul_accumulate alpha=") + (alpha > 0 ? "1" : "-1") +
                  (bias ? " bias" : "") + (res ? " onto res" : "") + s,
              OpId::matmul_accumulate,
              {input("x", N * C, 30), input("w", int64_t(C) * OC, 31), input("bias", OC, 32),
               input("res", N * OC, 38), output("out", N * OC, 37, Tol{0, 0, 0, 2e-2})},
              [=](auto& ops, auto& t) {
                ops.matmul_accumulate(t("out"), t("x"), t("w"), bias ? t("bias") : nullptr, N,
                                      C, OC, alpha, res ? t("res") : nullptr);
              }));
    // Accumulated GEMM gradients: 2e-2 of the increment's scale; dbias sums
    // columns in double on every backend.
    const Tol gemm_inc{0, 0, 0, 2e-2};
    cases.push_back(make_case(
        "matmul_backward" + s, OpId::matmul_backward,
        {input("x", N * C, 30), input("w", int64_t(C) * OC, 31), input("dout", N * OC, 33),
         output("dinp", N * C, 34, gemm_inc), output("dw", int64_t(C) * OC, 35, gemm_inc),
         output("dbias", OC, 36, {1e-5, 1e-5})},
        [=](auto& ops, auto& t) {
          ops.matmul_backward(t("dinp"), t("dw"), t("dbias"), t("dout"), t("x"), t("w"), N, C,
                              OC, /*add_dinp=*/true);
        }));
    // dinp written over what it held (add_dinp = false).
    cases.push_back(make_case(
        "matmul_backward dinp written" + s, OpId::matmul_backward,
        {input("x", N * C, 30), input("w", int64_t(C) * OC, 31), input("dout", N * OC, 33),
         output("dinp", N * C, 34, gemm_inc), output("dw", int64_t(C) * OC, 35, gemm_inc)},
        [=](auto& ops, auto& t) {
          ops.matmul_backward(t("dinp"), t("dw"), nullptr, t("dout"), t("x"), t("w"), N, C, OC,
                              /*add_dinp=*/false);
        }));
    // Null gradients are skipped.
    cases.push_back(make_case(
        "matmul_backward dbias only" + s, OpId::matmul_backward,
        {input("x", N * C, 30), input("w", int64_t(C) * OC, 31), input("dout", N * OC, 33),
         output("dbias", OC, 36, {1e-5, 1e-5})},
        [=](auto& ops, auto& t) {
          ops.matmul_backward(nullptr, nullptr, t("dbias"), t("dout"), t("x"), t("w"), N, C, OC,
                              /*add_dinp=*/true);
        }));
  }
}

void add_activation(std::vector<Case>& cases) {
  // 1025: one element per thread; 4096: four (float4).
  for (int64_t n : {int64_t(1025), int64_t(4096)})
  for (Activation act : {Activation::gelu, Activation::relu}) {
    const std::string s = (act == Activation::gelu ? " gelu" : " relu") + std::string(" n=") + sz(n);
    cases.push_back(make_case("activation_forward" + s, OpId::activation_forward,
                              {input("x", n, 40, -4.0, 4.0), output("out", n, 41, kFp32Elementwise)},
                              [=](auto& ops, auto& t) {
                                ops.activation_forward(t("out"), t("x"), n, act);
                              }));
    cases.push_back(make_case(
        "activation_backward" + s, OpId::activation_backward,
        {input("x", n, 40, -4.0, 4.0), input("dout", n, 41), output("dinp", n, 42, kFp32Elementwise)},
        [=](auto& ops, auto& t) { ops.activation_backward(t("dinp"), t("dout"), t("x"), n, act); }));
  }
}

// An input of values bf16 represents exactly (8 significant bits).
TensorSpec bf16_input(const std::string& name, int64_t n, uint64_t seed) {
  TensorSpec t = input(name, n, seed);
  t.make = [random = t.make] {
    std::vector<double> values = random();
    for (double& v : values) {
      int e = 0;
      const double m = std::frexp(v, &e);  // v = m 2^e, 0.5 <= |m| < 1
      v = std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8);
    }
    return values;
  };
  return t;
}

// The feed-forward block, forward then backward in one call (h and a hold
// the backend's own state between them and are not compared). C and F
// multiples of 8 take CUDA's fused path, 20 x 36 the separate ops'. x, w1
// and b1 are bf16 numbers, so that the product's bf16 operands and the
// epilogue's bf16 bias are exact and no pre-activation changes sign against
// the reference (ReLU's slope would jump there). "rebuilt": a is
// overwritten between the two and ffn_rebuild writes its state back from h
// (what a layer keeping only h does, model.kept_ffn: pre_activation).
void add_ffn(std::vector<Case>& cases) {
  struct Shape {
    int64_t N;
    int C, F;
  };
  for (const Shape sh : {Shape{300, 64, 128}, Shape{70, 24, 40}, Shape{33, 20, 36}})
  for (Activation act : {Activation::gelu, Activation::relu})
  for (int mode = 0; mode < 5; ++mode) {  // out += g, out -= g, out = g (no biases), res + g,
    const int64_t N = sh.N;                 // out += g with a rebuilt
    const int C = sh.C, F = sh.F;
    const bool accumulate = mode != 2, biases = mode != 2, onto_res = mode == 3;
    const float alpha = mode == 1 ? -1.0f : 1.0f;
    const std::string s = std::string(act == Activation::gelu ? " gelu" : " relu") +
                          (mode == 0   ? " add"
                           : mode == 1 ? " subtract"
                           : mode == 2 ? " write nobias"
                           : mode == 3 ? " onto res"
                                       : " add, a rebuilt") +
                          " N=" + sz(N) + " C=" + sz(C) + " F=" + sz(F);
    const Tol inc{0, 0, 0, 2e-2};
    std::vector<TensorSpec> tensors = {
        bf16_input("x", N * C, 90), bf16_input("w1", int64_t(C) * F, 91), bf16_input("b1", F, 92),
        input("w2", int64_t(F) * C, 93), input("b2", C, 94), input("dout", N * C, 95),
        input("h", N * F, 96), input("a", N * F, 97), input("res", N * C, 104),
        output("out", N * C, 98, accumulate ? inc : kBf16Gemm),
        output("dinp", N * C, 99, kBf16Gemm), output("dw1", int64_t(C) * F, 100, inc),
        output("dw2", int64_t(F) * C, 101, inc), output("db2", C, 103, {1e-5, 1e-5})};
    if (biases) tensors.push_back(output("db1", F, 102, inc));
    cases.push_back(make_case(
        "ffn_forward and backward" + s, OpId::ffn_forward, tensors, [=](auto& ops, auto& t) {
          ops.ffn_forward(t("out"), t("h"), t("a"), t("x"), t("w1"), biases ? t("b1") : nullptr,
                          t("w2"), biases ? t("b2") : nullptr, N, C, F, act, alpha, accumulate,
                          onto_res ? t("res") : nullptr);
          if (mode == 4) {
            ops.fill(t("a"), 7.0f, N * F);
            ops.ffn_rebuild(t("a"), t("h"), N, C, F, act);
          }
          ops.ffn_backward(t("dinp"), t("dw1"), biases ? t("db1") : nullptr, t("dw2"), t("db2"),
                           t("dout"), t("x"), t("h"), t("a"), t("w1"), t("w2"), N, C, F, act);
        }));
  }
}

// LayerNorm and the projections that read it, forward then backward in one
// call (ln and dln are scratch, not compared). C and OC multiples of 8 take
// CUDA's path with bf16 normalised rows, 20 x 36 the separate ops'.
void add_layernorm_project(std::vector<Case>& cases) {
  struct Shape {
    int64_t N;
    int C, OC;
  };
  for (const Shape sh : {Shape{300, 64, 128}, Shape{70, 24, 40}, Shape{33, 20, 36}})
  for (bool two : {true, false}) {
    const int64_t N = sh.N;
    const int C = sh.C, OC = sh.OC;
    const std::string s = std::string(two ? " two" : " one") + " N=" + sz(N) + " C=" + sz(C) +
                          " OC=" + sz(OC);
    const Tol inc{0, 0, 0, 2e-2};
    std::vector<TensorSpec> tensors = {
        input("x", N * C, 110, -2.0, 3.0), input("lw", C, 111, 0.5, 1.5), input("lb", C, 112),
        input("w1", int64_t(C) * OC, 113), input("w2", int64_t(C) * OC, 114),
        input("d1", N * OC, 115), input("d2", N * OC, 116), input("ln", N * C, 117),
        input("dln", N * C, 118), output("mean", N, 119, {1e-6, 1e-5}),
        output("rstd", N, 120, {0, 1e-5}), output("o1", N * OC, 121, kBf16Gemm),
        output("o2", N * OC, 122, kBf16Gemm), output("dinp", N * C, 123, inc),
        output("dlw", C, 124, inc), output("dlb", C, 125, inc),
        output("dw1", int64_t(C) * OC, 126, inc), output("dw2", int64_t(C) * OC, 127, inc)};
    cases.push_back(make_case(
        "layernorm_project forward and backward" + s, OpId::layernorm_project_forward, tensors,
        [=](auto& ops, auto& t) {
          auto* w2 = two ? t("w2") : nullptr;
          ops.layernorm_project_forward(t("o1"), t("o2"), t("ln"), t("mean"), t("rstd"), t("x"),
                                        t("lw"), t("lb"), t("w1"), w2, N, C, OC, 1e-6f, false);
          ops.layernorm_project_backward(t("dinp"), t("dlw"), t("dlb"), t("dw1"),
                                         two ? t("dw2") : nullptr, t("d1"), two ? t("d2") : nullptr,
                                         t("ln"), t("dln"), t("mean"), t("rstd"), t("x"), t("lw"),
                                         t("lb"), t("w1"), w2, N, C, OC, 1e-6f);
        }));
  }
}

// LayerNorm and the feed-forward block, forward then backward in one call
// (ln, dln, h and a hold the backend's state or scratch and are not
// compared). C and F multiples of 8 take CUDA's path with the normalised
// rows kept in bf16, 20 x 36 the separate ops'. GELU only: the normalised
// rows are not bf16 numbers, so a pre-activation near 0 may change sign
// against the reference, where ReLU's slope would jump. "rebuilt": ln,
// mean, rstd and a are overwritten between the two and layernorm_ffn_rows
// and ffn_rebuild write them back (a kept layer under model.kept_ln and
// model.kept_ffn: pre_activation).
void add_layernorm_ffn(std::vector<Case>& cases) {
  struct Shape {
    int64_t N;
    int C, F;
  };
  for (const Shape sh : {Shape{300, 64, 128}, Shape{33, 20, 36}})
  for (int mode = 0; mode < 4; ++mode) {  // out += g, out = g (no biases), res - g, rebuilt
    const int64_t N = sh.N;
    const int C = sh.C, F = sh.F;
    const bool accumulate = mode != 1, biases = mode != 1, onto_res = mode == 2;
    const float alpha = mode == 2 ? -1.0f : 1.0f;
    const std::string s = std::string(mode == 0   ? " add"
                                      : mode == 1 ? " write nobias"
                                      : mode == 2 ? " res minus"
                                                  : " add, rebuilt") +
                          " N=" + sz(N) + " C=" + sz(C) + " F=" + sz(F);
    const Tol inc{0, 0, 0, 2e-2};
    std::vector<TensorSpec> tensors = {
        input("x", N * C, 130, -2.0, 3.0), input("lw", C, 131, 0.5, 1.5), input("lb", C, 132),
        input("w1", int64_t(C) * F, 133), input("b1", F, 134), input("w2", int64_t(F) * C, 135),
        input("b2", C, 136), input("dout", N * C, 137), input("h", N * F, 138),
        input("a", N * F, 139), input("ln", N * C, 140), input("dln", N * C, 141),
        input("res", N * C, 142), output("mean", N, 143, {1e-6, 1e-5}),
        output("rstd", N, 144, {0, 1e-5}), output("out", N * C, 145, accumulate ? inc : kBf16Gemm),
        output("dinp", N * C, 146, inc), output("dlw", C, 147, inc), output("dlb", C, 148, inc),
        output("dw1", int64_t(C) * F, 149, inc), output("dw2", int64_t(F) * C, 150, inc),
        output("db2", C, 151, {1e-5, 1e-5})};
    if (biases) tensors.push_back(output("db1", F, 152, inc));
    cases.push_back(make_case(
        "layernorm_ffn forward and backward" + s, OpId::layernorm_ffn_forward, tensors,
        [=](auto& ops, auto& t) {
          ops.layernorm_ffn_forward(t("out"), t("h"), t("a"), t("ln"), t("mean"), t("rstd"),
                                    t("x"), t("lw"), t("lb"), t("w1"), biases ? t("b1") : nullptr,
                                    t("w2"), biases ? t("b2") : nullptr, N, C, F,
                                    Activation::gelu, 1e-6f, alpha, accumulate,
                                    onto_res ? t("res") : nullptr);
          if (mode == 3) {
            ops.fill(t("ln"), 5.0f, N * C);
            ops.fill(t("a"), 5.0f, N * F);
            ops.fill(t("mean"), 3.0f, N);
            ops.fill(t("rstd"), 0.5f, N);
            ops.layernorm_ffn_rows(t("ln"), t("mean"), t("rstd"), t("x"), t("lw"), t("lb"), N, C,
                                   F, 1e-6f);
            ops.ffn_rebuild(t("a"), t("h"), N, C, F, Activation::gelu);
          }
          ops.layernorm_ffn_backward(t("dinp"), t("dlw"), t("dlb"), t("dw1"),
                                     biases ? t("db1") : nullptr, t("dw2"), t("db2"), t("dout"),
                                     t("ln"), t("dln"), t("h"), t("a"), t("x"), t("lw"),
                                     t("mean"), t("rstd"), t("w1"), t("w2"), N, C, F,
                                     Activation::gelu);
        }));
  }
}

void add_loss(std::vector<Case>& cases) {
  for (auto [N, V] : {std::pair<int64_t, int>{97, 256}, {33, 1025}, {4, 7}}) {
    const std::string s = " N=" + sz(N) + " V=" + sz(V);
    auto logits = random_values(N * V, 80, -5.0, 5.0);
    // Ties for argmax: row 1 has its maximum twice.
    logits[size_t(V) + 3] = 9.0;
    logits[size_t(V) + 5] = 9.0;
    std::vector<int32_t> targets(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) targets[size_t(i)] = i % 5 == 2 ? -1 : int32_t((i * 13) % V);
    // Softmax terms are fp32 exps summed in another order: rtol 1e-5.
    const Tol loss_tol{1e-5, 1e-5}, dlogits_tol{1e-9, 1e-5};
    cases.push_back(make_case(
        "softmax_cross_entropy" + s, OpId::softmax_cross_entropy,
        {values("logits", logits), ints("targets", targets), output("loss", N, 81, loss_tol),
         output("dlogits", N * V, 82, dlogits_tol)},
        [=](auto& ops, auto& t) {
          ops.softmax_cross_entropy(t("loss"), t("dlogits"), t("logits"), t.i("targets"), N, V,
                                    0.01f);
        }));
    // dlogits may alias logits.
    cases.push_back(make_case(
        "softmax_cross_entropy in place" + s, OpId::softmax_cross_entropy,
        {values("logits", logits, true, dlogits_tol), ints("targets", targets),
         output("loss", N, 81, loss_tol)},
        [=](auto& ops, auto& t) {
          ops.softmax_cross_entropy(t("loss"), t("logits"), t("logits"), t.i("targets"), N, V,
                                    0.01f);
        }));
    Case c = make_case("argmax_rows" + s, OpId::argmax_rows,
                       {values("logits", logits), int_output("out", N)},
                       [=](auto& ops, auto& t) { ops.argmax_rows(t.i("out"), t("logits"), N, V); });
    c.bitwise = true;
    cases.push_back(c);
  }
}

void add_optimizers(std::vector<Case>& cases) {
  // Three steps from zero moments; moments are statistics of squares.
  const int64_t n = 1025;
  cases.push_back(make_case(
      "adamw_update 3 steps", OpId::adamw_update,
      {output("p", n, 90, {1e-6, 1e-5}), values("m", std::vector<double>(size_t(n)), true, {1e-7, 1e-5}),
       values("v", std::vector<double>(size_t(n)), true, {1e-9, 1e-5}), input("g1", n, 92),
       input("g2", n, 93), input("g3", n, 94)},
      [=](auto& ops, auto& t) {
        AdamWParams ap;
        ap.lr = 1e-2f;
        ap.weight_decay = 0.1f;
        for (int step = 1; step <= 3; ++step) {
          ap.step = step;
          ops.adamw_update(t("p"), t("g" + std::to_string(step)), t("m"), t("v"), n, ap);
        }
      }));
  struct Shape {
    int64_t rows, cols;
    float beta1;
  };
  for (const Shape sh : {Shape{97, 65, 0.0f}, Shape{97, 65, 0.9f}, Shape{1, 1025, 0.0f},
                         Shape{1025, 1, 0.9f}, Shape{600, 300, 0.0f}}) {
    const int64_t rows = sh.rows, cols = sh.cols, nn = rows * cols;
    const bool factored = rows > 1 && cols > 1;
    const float beta1 = sh.beta1;
    const auto zeros = [](int64_t k) { return std::vector<double>(size_t(k)); };
    cases.push_back(make_case(
        "adafactor_update " + sz(rows) + "x" + sz(cols) + (beta1 > 0 ? " beta1" : ""),
        OpId::adafactor_update,
        {output("p", nn, 100, {1e-6, 1e-5}), values("m", zeros(nn), beta1 > 0, {1e-7, 1e-5}),
         values("vr", zeros(factored ? rows : nn), true, {1e-9, 1e-5}),
         values("vc", zeros(cols), factored, {1e-9, 1e-5}), input("g1", nn, 102),
         input("g2", nn, 103), input("g3", nn, 104)},
        [=](auto& ops, auto& t) {
          AdafactorParams ap;
          ap.lr = 1e-2f;
          ap.beta1 = beta1;
          ap.weight_decay = 0.01f;
          ap.clip_threshold = 0.5f;  // makes the clipping branch matter
          for (int step = 1; step <= 3; ++step) {
            ap.step = step;
            ops.adafactor_update(t("p"), t("g" + std::to_string(step)), t("m"), t("vr"), t("vc"),
                                 rows, cols, ap);
          }
        }));
  }
}

std::vector<Case> dense_cases() {
  std::vector<Case> cases;
  add_elementwise(cases);
  add_embedding(cases);
  add_layernorm(cases);
  add_matmul(cases);
  add_activation(cases);
  add_ffn(cases);
  add_layernorm_project(cases);
  add_layernorm_ffn(cases);
  add_loss(cases);
  add_optimizers(cases);
  return cases;
}

REFORMER_CONFORMANCE_SUITE(DenseOps, dense_cases());

}  // namespace
