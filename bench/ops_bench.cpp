// Development benchmark (bench/, built with -DREFORMER_BENCH=ON): one
// training step of a configuration broken down by op on the GPU.
//
//   ops_bench [L] [--length L] [--reps N] [--steps N] [--config PATH]
//
// Every (op, shape) that one training step calls (framework/model.cpp,
// framework/trainer.cpp) is timed on its own through make_cuda_ops() on
// buffers of random contents: a warm-up call, one call to size the run, then
// up to --reps calls (fewer for slow ops, ~0.25 s per op) between two
// synchronize()s. Each mean is multiplied by the number of calls the step
// makes. The table, sorted by time per step, ends with the summed step,
// compared with a real step of the same model measured in the same process
// (as `reformer bench` does it: one warm-up step, then the mean of --steps).
// The difference is what the per-op view does not see: host work, launch
// gaps and synchronisations between ops.
//
// Exit status: 0 done, 1 no CUDA device or an error, 2 bad arguments.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "framework/config.h"
#include "kernels/errors.h"
#include "framework/logging.h"
#include "framework/model.h"
#include "framework/optimizer.h"
#include "kernels/common/philox.h"
#include "kernels/cuda/cuda_ops.h"

namespace reformer {
namespace {

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

struct Options {
  int64_t length = 65536;
  int reps = 20;    // most timed calls per op
  int steps = 3;    // measured training steps after one warm-up; 0 skips them
  std::string config = REFORMER_SOURCE_DIR "/configs/bench-peer.yaml";
};

constexpr double kBudgetPerOpS = 0.25;  // timed calls per op stop near this

void usage(std::FILE* f) {
  std::fprintf(f,
               "usage: ops_bench [L] [--length L] [--reps N] [--steps N] [--config PATH]\n"
               "  L        sequence length (default 65536)\n"
               "  --reps   most timed calls per op (default 20; slow ops get fewer)\n"
               "  --steps  real training steps measured for comparison (default 3; 0: none)\n"
               "  --config model configuration (default configs/bench-peer.yaml)\n");
}

// Parses a positive integer; false on anything else.
bool parse_int(const char* s, int64_t* out) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || v < 0) return false;
  *out = v;
  return true;
}

// One (op, shape) of the step. `fn` makes `per_run` op calls; the step
// makes `calls` of them.
struct Entry {
  std::string op, shape, category;
  double flops = 0;     // per op call; 0: no TFLOP/s reported
  int64_t calls = 0;    // op calls per training step
  int per_run = 1;      // op calls per run of fn
  std::function<void()> fn;
  double ms_run = 0;    // mean ms per run of fn
  int reps = 0;         // timed runs
  double ms_call() const { return ms_run / per_run; }
  double ms_step() const { return ms_call() * double(calls); }
};

// The step's op calls, merged by (op, shape) in first-call order.
class Recipe {
 public:
  void add(const std::string& op, const std::string& shape, const char* category, int64_t n,
           double flops, std::function<void()> fn, int per_run = 1) {
    const std::string key = op + "|" + shape;
    auto it = index_.find(key);
    if (it != index_.end()) {
      entries_[it->second].calls += n;
      return;
    }
    index_[key] = entries_.size();
    Entry e;
    e.op = op;
    e.shape = shape;
    e.category = category;
    e.flops = flops;
    e.calls = n;
    e.per_run = per_run;
    e.fn = std::move(fn);
    entries_.push_back(std::move(e));
  }
  std::vector<Entry>& entries() { return entries_; }

 private:
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
};

// The model's shapes, resolved from the validated config.
struct Shapes {
  int64_t L;
  int D, H, dh, HD, F, V, NL, nh, nb, f0, cols, d1, a1, a2;  // f0, cols: rotation_cols
  int64_t fc, oc;  // feed-forward and loss chunk rows
  float eps;
  AttentionParams ap;  // chunk geometry; rounds and wrap set per kind
  explicit Shapes(const Config& c) {
    const ModelConfig& m = c.model;
    L = m.max_len;
    D = m.d_model;
    H = m.n_heads;
    dh = c.head_dim();
    HD = H * dh;
    F = m.d_ff;
    V = m.vocab_size;
    NL = m.n_layers;
    nh = c.attention.n_hashes;
    nb = c.buckets();
    f0 = c.bucket_factor0();
    cols = rotation_cols(nb, f0);
    a1 = m.axial_shape[0];
    a2 = m.axial_shape[1];
    d1 = m.axial_dims[0];
    fc = m.ffn_chunk > 0 ? std::min<int64_t>(m.ffn_chunk, L) : L;
    oc = m.loss_chunk > 0 ? std::min<int64_t>(m.loss_chunk, L) : L;
    eps = float(m.layernorm_eps);
    ap.L = L;
    ap.dh = dh;
    ap.ld = HD;
    ap.chunk = c.attention.bucket_size;
    ap.chunks_before = c.attention.chunks_before;
    ap.chunks_after = c.attention.chunks_after;
    ap.causal = c.attention.causal;
  }
};

// Device buffers the ops run on, sized for the largest use; random contents.
struct Bufs {
  Ops<float>& ops;
  Buffer<float> pool;                     // random normals tiled into the others
  Buffer<float> x, y, z;                  // generic activations [big]
  Buffer<float> qk, v, ao, dqk, dv, dao;  // attention [L, HD]
  Buffer<float> out_r, lse;               // one head: [rounds, L, dh], [rounds, L]
  Buffer<float> rot;                      // [nh, dh, cols]
  Buffer<float> w, dw, bias, dbias;       // one weight matrix and its bias, with gradients
  Buffer<float> lnw, lnb, dlnw, dlnb;     // [2D]
  Buffer<float> mean, rstd, loss;         // [L]
  Buffer<float> wte, pos1, pos2, dwte, dpos1, dpos2;
  IntBuffer<float> tokens, targets, identity, perm, buckets, pred;
  Buffer<float> params, grads;            // [num_params]
  std::vector<float> host_loss;
  std::vector<int32_t> host_pred, host_tokens;

  Bufs(Ops<float>& o, const Shapes& s, int64_t n_params) : ops(o) {
    const int64_t big = std::max({s.L * s.D, s.L * s.HD, s.fc * s.F, s.oc * 2 * s.D, s.oc * s.V});
    const int64_t wmax =
        std::max({int64_t(s.D) * s.HD, int64_t(s.D) * s.F, int64_t(2) * s.D * s.V});
    const int64_t vmax = std::max({s.F, 2 * s.D, s.V, s.HD});
    const int rounds = std::max(s.nh, 1);
    {
      const int64_t n = (int64_t(1) << 22) + 7;  // odd period: tiles do not line up with rows
      std::vector<float> h(static_cast<size_t>(n));
      const RngKey key = make_key(1234, /*purpose: ops_bench*/ 11);
      for (int64_t i = 0; i < n; ++i) h[size_t(i)] = rng_normal(key, uint64_t(i));
      pool = Buffer<float>(ops, n);
      ops.from_host(pool.data(), h.data(), n);
    }
    for (Buffer<float>* b : {&x, &y, &z}) *b = random(big, 1.0f);
    for (Buffer<float>* b : {&qk, &v, &ao, &dqk, &dv, &dao}) *b = random(s.L * s.HD, 1.0f);
    out_r = random(int64_t(rounds) * s.L * s.dh, 1.0f);
    lse = random(int64_t(rounds) * s.L, 1.0f);
    rot = random(int64_t(s.nh) * s.dh * s.cols, 1.0f);
    w = random(wmax, 0.02f);
    dw = random(wmax, 0.02f);
    bias = random(vmax, 0.02f);
    dbias = random(vmax, 0.02f);
    lnw = random(2 * s.D, 1.0f);
    lnb = random(2 * s.D, 1.0f);
    dlnw = random(2 * s.D, 1.0f);
    dlnb = random(2 * s.D, 1.0f);
    mean = random(s.L, 1.0f);
    rstd = random(s.L, 1.0f);
    loss = random(s.L, 1.0f);
    wte = random(int64_t(s.V) * s.D, 0.02f);
    dwte = random(int64_t(s.V) * s.D, 0.02f);
    pos1 = random(int64_t(s.a1) * s.d1, 0.02f);
    dpos1 = random(int64_t(s.a1) * s.d1, 0.02f);
    pos2 = random(int64_t(s.a2) * (s.D - s.d1), 0.02f);
    dpos2 = random(int64_t(s.a2) * (s.D - s.d1), 0.02f);
    params = random(n_params, 0.02f);
    grads = random(n_params, 1e-3f);

    std::vector<int32_t> h(static_cast<size_t>(s.L));
    const RngKey key = make_key(1234, /*purpose: ops_bench tokens*/ 12);
    tokens = IntBuffer<float>(ops, s.L);
    for (int64_t i = 0; i < s.L; ++i)
      h[size_t(i)] = int32_t(rng_u32(key, uint64_t(i)) % uint32_t(s.V));
    ops.from_host_i32(tokens.data(), h.data(), s.L);
    host_tokens = h;
    targets = IntBuffer<float>(ops, s.L);
    std::rotate(h.begin(), h.begin() + 1, h.end());
    ops.from_host_i32(targets.data(), h.data(), s.L);
    identity = IntBuffer<float>(ops, s.L);
    std::iota(h.begin(), h.end(), 0);
    ops.from_host_i32(identity.data(), h.data(), s.L);
    // Valid bucket ids and orders until the LSH ops overwrite them.
    perm = IntBuffer<float>(ops, int64_t(rounds) * s.L);
    buckets = IntBuffer<float>(ops, int64_t(rounds) * s.L);
    for (int r = 0; r < rounds; ++r) {
      ops.from_host_i32(perm.data() + int64_t(r) * s.L, h.data(), s.L);
      std::vector<int32_t> b(static_cast<size_t>(s.L));
      for (int64_t i = 0; i < s.L; ++i) b[size_t(i)] = int32_t(i * s.nb / s.L);
      ops.from_host_i32(buckets.data() + int64_t(r) * s.L, b.data(), s.L);
    }
    pred = IntBuffer<float>(ops, s.oc);
    host_loss.resize(size_t(s.oc));
    host_pred.resize(size_t(s.oc));
    ops.synchronize();
  }

  // n elements: the pool tiled, times `scale`.
  Buffer<float> random(int64_t n, float scale) {
    Buffer<float> b(ops, n);
    for (int64_t i = 0; i < n; i += pool.size())
      ops.copy(b.data() + i, pool.data(), std::min(pool.size(), n - i));
    if (scale != 1.0f) ops.scale(b.data(), scale, n);
    return b;
  }
};

std::string dims(int64_t a, int64_t b) { return strfmt("[%lld,%lld]", (long long)a, (long long)b); }

// Adds every op call of one training step (model.cpp's forward_backward,
// then trainer.cpp's clip and optimizer step) to `r`, in call order.
void build_recipe(Recipe& r, Bufs& b, const Shapes& s, const Config& cfg,
                  const ParamTable& table, Optimizer<float>& opt) {
  const bool dropout = cfg.model.dropout > 0;  // train = true
  const float p = float(cfg.model.dropout);
  const Activation act = cfg.model.activation;

  // ---- elementwise and copies on `rows` x `cols` elements
  auto fill = [&](int64_t rows, int64_t cols, int64_t n) {
    r.add("fill", dims(rows, cols), "elementwise", n, 0,
          [&b, rows, cols] { b.ops.fill(b.z.data(), 0.0f, rows * cols); });
  };
  auto add = [&](int64_t rows, int64_t cols, int64_t n) {
    r.add("add", dims(rows, cols), "elementwise", n, 0,
          [&b, rows, cols] { b.ops.add(b.x.data(), b.x.data(), b.y.data(), rows * cols); });
  };
  auto sub = [&](int64_t rows, int64_t cols, int64_t n) {
    r.add("sub", dims(rows, cols), "elementwise", n, 0,
          [&b, rows, cols] { b.ops.sub(b.x.data(), b.x.data(), b.y.data(), rows * cols); });
  };
  auto copy = [&](int64_t rows, int64_t cols, int64_t n) {
    r.add("copy", dims(rows, cols), "elementwise", n, 0,
          [&b, rows, cols] { b.ops.copy(b.z.data(), b.y.data(), rows * cols); });
  };
  auto drop = [&](int64_t rows, int64_t cols, int64_t n) {
    if (!dropout) return;
    r.add("dropout", dims(rows, cols), "elementwise", n, 0, [&b, rows, cols, p] {
      b.ops.dropout(b.z.data(), rows * cols, p, 1234, 1, 0, 0, 0);
    });
  };
  // ---- GEMMs: out[N, OC] = inp[N, C] @ w[C, OC] (+ bias)
  auto gemm = [](int64_t N, int C, int OC, bool bias) {
    return strfmt("[%lld,%d]x[%d,%d]%s", (long long)N, C, C, OC, bias ? "+b" : "");
  };
  auto mm_fwd = [&](int64_t N, int C, int OC, bool bias, int64_t n) {
    r.add("matmul_forward", gemm(N, C, OC, bias),
          "GEMM", n, 2.0 * double(N) * C * OC, [&b, N, C, OC, bias] {
            b.ops.matmul_forward(b.y.data(), b.x.data(), b.w.data(), bias ? b.bias.data() : nullptr,
                                 N, C, OC);
          });
  };
  auto mm_bwd = [&](int64_t N, int C, int OC, bool bias, int64_t n) {
    r.add("matmul_backward", gemm(N, C, OC, bias),
          "GEMM", n, 4.0 * double(N) * C * OC, [&b, N, C, OC, bias] {
            b.ops.matmul_backward(b.z.data(), b.dw.data(), bias ? b.dbias.data() : nullptr,
                                  b.y.data(), b.x.data(), b.w.data(), N, C, OC);
          });
  };
  // ---- layernorm over [N, C]
  auto ln_fwd = [&](int64_t N, int C, int64_t n) {
    r.add("layernorm_forward", dims(N, C), "layernorm", n, 0, [&b, N, C, eps = s.eps] {
      b.ops.layernorm_forward(b.y.data(), b.mean.data(), b.rstd.data(), b.x.data(), b.lnw.data(),
                              b.lnb.data(), N, C, eps);
    });
  };
  auto ln_bwd = [&](int64_t N, int C, int64_t n) {
    r.add("layernorm_backward", dims(N, C), "layernorm", n, 0, [&b, N, C] {
      b.ops.layernorm_backward(b.z.data(), b.dlnw.data(), b.dlnb.data(), b.y.data(), b.x.data(),
                               b.lnw.data(), b.mean.data(), b.rstd.data(), N, C);
    });
  };

  // ---- attention of one layer: forward (rehash in the step's forward,
  // reuse of the bucket ids in the backward's recompute) and backward, all
  // heads; head 0's slices are timed (every head has the same shape).
  using Kind = AttentionKind;
  auto kind_of = [&](int l) {
    const Kind k = cfg.attention_kind(l);
    return s.L <= cfg.attention.bucket_size ? Kind::full : k;
  };
  const double window = double((1 + s.ap.chunks_before + s.ap.chunks_after) * s.ap.chunk);
  auto attention_forward = [&](Kind kind, bool rehash) {
    mm_fwd(s.L, s.D, s.HD, false, 2);  // qk, v
    if (kind == Kind::full) {
      const double f = 2.0 * double(s.L) * double(s.L) * s.dh;  // causal: half of 4 L^2 dh
      r.add("full_attention_forward", strfmt("L=%lld dh=%d", (long long)s.L, s.dh), "attention",
            s.H, f, [&b, ap = s.ap] {
              b.ops.full_attention_forward(b.ao.data(), b.lse.data(), b.qk.data(), b.v.data(), ap);
            });
    } else {
      AttentionParams ap = s.ap;
      ap.n_rounds = kind == Kind::lsh ? s.nh : 1;
      ap.wrap = kind == Kind::lsh;
      const int32_t* perm = kind == Kind::lsh ? b.perm.data() : b.identity.data();
      if (kind == Kind::lsh) {
        if (rehash) {
          r.add("lsh_rotations", strfmt("[%d,%d,%d]", s.nh, s.dh, s.cols), "LSH", s.H, 0, [&b, s] {
            b.ops.lsh_rotations(b.rot.data(), 1234, 1, 0, 0, s.nh, s.dh, s.nb, s.f0);
          });
          r.add("lsh_hash",
                strfmt("[%lld,%d]x[%d,%d]x%d", (long long)s.L, s.dh, s.dh, s.cols, s.nh), "LSH",
                s.H, 2.0 * double(s.L) * s.dh * s.cols * s.nh, [&b, s] {
                  b.ops.lsh_hash(b.buckets.data(), b.qk.data(), s.HD, b.rot.data(), s.L, s.dh,
                                 s.nh, s.nb, s.f0);
                });
        }
        r.add("lsh_sort", strfmt("[%d,%lld] %d buckets", s.nh, (long long)s.L, s.nb), "LSH", s.H, 0,
              [&b, s] { b.ops.lsh_sort(b.perm.data(), b.buckets.data(), s.L, s.nh, s.nb); });
      }
      const double f = ap.n_rounds * 2.0 * double(s.L) * window * s.dh * 2.0;
      r.add("chunked_attention_forward",
            strfmt("L=%lld dh=%d r=%d w=%d", (long long)s.L, s.dh, ap.n_rounds, int(window)),
            "attention", s.H, f, [&b, ap, perm] {
              b.ops.chunked_attention_forward(b.ao.data(), b.out_r.data(), b.lse.data(),
                                              b.qk.data(), b.v.data(), perm, ap);
            });
    }
    mm_fwd(s.L, s.HD, s.D, false, 1);  // wo
  };
  auto attention_backward = [&](Kind kind) {
    fill(s.L, s.HD, 1);               // dao
    mm_bwd(s.L, s.HD, s.D, false, 1);  // wo
    fill(s.L, s.HD, 2);               // dqk, dv
    if (kind == Kind::full) {
      const double f = 2.5 * 2.0 * double(s.L) * double(s.L) * s.dh;
      r.add("full_attention_backward", strfmt("L=%lld dh=%d", (long long)s.L, s.dh), "attention",
            s.H, f, [&b, ap = s.ap] {
              b.ops.full_attention_backward(b.dqk.data(), b.dv.data(), b.dao.data(), b.ao.data(),
                                            b.qk.data(), b.v.data(), b.lse.data(), ap);
            });
    } else {
      AttentionParams ap = s.ap;
      ap.n_rounds = kind == Kind::lsh ? s.nh : 1;
      ap.wrap = kind == Kind::lsh;
      const int32_t* perm = kind == Kind::lsh ? b.perm.data() : b.identity.data();
      if (kind == Kind::lsh)
        r.add("lsh_sort", strfmt("[%d,%lld] %d buckets", s.nh, (long long)s.L, s.nb), "LSH", s.H, 0,
              [&b, s] { b.ops.lsh_sort(b.perm.data(), b.buckets.data(), s.L, s.nh, s.nb); });
      const double f = 2.5 * ap.n_rounds * 2.0 * double(s.L) * window * s.dh * 2.0;
      r.add("chunked_attention_backward",
            strfmt("L=%lld dh=%d r=%d w=%d", (long long)s.L, s.dh, ap.n_rounds, int(window)),
            "attention", s.H, f, [&b, ap, perm] {
              b.ops.chunked_attention_backward(b.dqk.data(), b.dv.data(), b.dao.data(), b.qk.data(),
                                               b.v.data(), perm, b.out_r.data(), b.lse.data(), ap);
            });
    }
    mm_bwd(s.L, s.D, s.HD, false, 2);  // wqk, wv
  };

  // ---- feed-forward chunk of `rows` positions
  auto ffn_fwd = [&](int64_t rows) {
    ln_fwd(rows, s.D, 1);
    mm_fwd(rows, s.D, s.F, true, 1);
    r.add("activation_forward", dims(rows, s.F), "elementwise", 1, 0, [&b, rows, s, act] {
      b.ops.activation_forward(b.y.data(), b.x.data(), rows * s.F, act);
    });
    mm_fwd(rows, s.F, s.D, true, 1);
    drop(rows, s.D, 1);
  };
  auto ffn_bwd = [&](int64_t rows) {
    copy(rows, s.D, 1);
    drop(rows, s.D, 1);
    fill(rows, s.F, 1);
    mm_bwd(rows, s.F, s.D, true, 1);
    fill(rows, s.F, 1);
    r.add("activation_backward", dims(rows, s.F), "elementwise", 1, 0, [&b, rows, s, act] {
      b.ops.activation_backward(b.z.data(), b.y.data(), b.x.data(), rows * s.F, act);
    });
    fill(rows, s.D, 1);
    mm_bwd(rows, s.D, s.F, true, 1);
    ln_bwd(rows, s.D, 1);
  };
  // Host to device copy of `n` token ids (the step's tokens and targets).
  auto upload = [&](int64_t n) {
    r.add("from_host_i32", strfmt("[%lld]", (long long)n), "transfers", 1, 0,
          [&b, n] { b.ops.from_host_i32(b.targets.data(), b.host_tokens.data(), n); });
  };
  // Chunk sizes covering [0, L) in steps of `chunk`.
  auto chunks = [&](int64_t chunk) {
    std::vector<int64_t> v;
    for (int64_t r0 = 0; r0 < s.L; r0 += chunk) v.push_back(std::min(chunk, s.L - r0));
    return v;
  };

  // ================================================================ stack_forward
  upload(s.L);  // tokens
  r.add("embedding_forward", strfmt("[%lld,%d] V=%d", (long long)s.L, s.D, s.V), "embedding", 1, 0,
        [&b, s] {
          b.ops.embedding_forward(b.y.data(), b.tokens.data(), b.wte.data(), b.pos1.data(),
                                  b.pos2.data(), s.L, s.D, s.d1, s.a2, 0);
        });
  copy(s.L, s.D, 1);
  for (int l = 0; l < s.NL; ++l) {
    ln_fwd(s.L, s.D, 1);
    attention_forward(kind_of(l), /*rehash*/ true);
    drop(s.L, s.D, 1);
    add(s.L, s.D, 1);
    for (int64_t rows : chunks(s.fc)) {
      ffn_fwd(rows);
      add(rows, s.D, 1);
    }
  }

  // ================================================================ head (with backward)
  upload(s.L);  // targets
  fill(s.L, s.D, 2);  // dx1, dx2
  for (int64_t rows : chunks(s.oc)) {
    const int D2 = 2 * s.D;
    r.add("copy_2d", strfmt("[%lld,%d] ld %d<-%d", (long long)rows, s.D, D2, s.D), "head", 2, 0,
          [&b, rows, s, D2] { b.ops.copy_2d(b.y.data(), D2, b.x.data(), s.D, rows, s.D); });
    ln_fwd(rows, D2, 1);
    mm_fwd(rows, D2, s.V, true, 1);
    r.add("argmax_rows", dims(rows, s.V), "head", 1, 0,
          [&b, rows, s] { b.ops.argmax_rows(b.pred.data(), b.y.data(), rows, s.V); });
    r.add("softmax_cross_entropy", dims(rows, s.V), "head", 1, 0, [&b, rows, s] {
      b.ops.softmax_cross_entropy(b.loss.data(), b.y.data(), b.y.data(), b.targets.data(), rows,
                                  s.V, 1.0f / float(s.L));
    });
    r.add("to_host", strfmt("[%lld]", (long long)rows), "transfers", 1, 0,
          [&b, rows] { b.ops.to_host(b.host_loss.data(), b.loss.data(), rows); });
    r.add("to_host_i32", strfmt("[%lld]", (long long)rows), "transfers", 1, 0,
          [&b, rows] { b.ops.to_host_i32(b.host_pred.data(), b.pred.data(), rows); });
    fill(rows, D2, 1);  // doln
    mm_bwd(rows, D2, s.V, true, 1);
    fill(rows, D2, 1);  // dcat
    ln_bwd(rows, D2, 1);
    r.add("add_2d", strfmt("[%lld,%d] ld %d<-%d", (long long)rows, s.D, s.D, D2), "head", 2, 0,
          [&b, rows, s, D2] { b.ops.add_2d(b.x.data(), s.D, b.y.data(), D2, rows, s.D); });
  }

  // ================================================================ stack_backward
  for (int l = s.NL - 1; l >= 0; --l) {
    for (int64_t rows : chunks(s.fc)) {
      ffn_fwd(rows);  // recompute
      sub(rows, s.D, 1);
      ffn_bwd(rows);
    }
    ln_fwd(s.L, s.D, 1);
    attention_forward(kind_of(l), /*rehash*/ false);
    drop(s.L, s.D, 1);
    sub(s.L, s.D, 1);
    copy(s.L, s.D, 1);  // dbranch
    drop(s.L, s.D, 1);
    fill(s.L, s.D, 1);  // dln
    attention_backward(kind_of(l));
    ln_bwd(s.L, s.D, 1);
  }
  add(s.L, s.D, 1);
  r.add("embedding_backward", strfmt("[%lld,%d] V=%d", (long long)s.L, s.D, s.V), "embedding", 1, 0,
        [&b, s] {
          b.ops.embedding_backward(b.dwte.data(), b.dpos1.data(), b.dpos2.data(), b.x.data(),
                                   b.tokens.data(), s.L, s.D, s.d1, s.a2, 0);
        });

  // ================================================================ trainer: zero, clip, update
  const int64_t P = table.total();
  const std::string all = strfmt("[%lld] all params", (long long)P);
  r.add("fill", all, "optimizer", 1, 0, [&b, P] { b.ops.fill(b.grads.data(), 0.0f, P); });
  r.add("sum_squares", all, "optimizer", 1, 0,
        [&b, P] { (void)b.ops.sum_squares(b.grads.data(), P); });
  // Counted once: the clip scales whenever the norm exceeds grad_clip.
  if (cfg.optimizer.grad_clip > 0)
    r.add("scale", all, "optimizer", 1, 0, [&b, P] { b.ops.scale(b.grads.data(), 1.0f, P); });
  const int n_tensors = int(table.params().size());
  r.add(std::string(to_string(opt.kind())) + "_update",
        strfmt("%d tensors, %lld", n_tensors, (long long)P), "optimizer", n_tensors, 0,
        [&b, &opt] { opt.step(b.params.data(), b.grads.data(), 1, 1e-4); }, n_tensors);
}

// Times one entry: a warm-up call, one run to size the measurement, then up
// to `max_reps` runs (about kBudgetPerOpS in all) between synchronize()s.
void time_entry(Ops<float>& ops, Entry& e, int max_reps) {
  e.fn();
  ops.synchronize();
  double t0 = now_s();
  e.fn();
  ops.synchronize();
  const double once = now_s() - t0;
  e.reps = std::clamp(int(kBudgetPerOpS / std::max(once, 1e-7)), 1, max_reps);
  t0 = now_s();
  for (int i = 0; i < e.reps; ++i) e.fn();
  ops.synchronize();
  e.ms_run = 1e3 * (now_s() - t0) / e.reps;
}

// Mean ms of `steps` training steps after one warm-up, exactly as `reformer
// bench` runs them (launch/bench.cpp); leaves the model's parameter table in
// `table`. With steps == 0 only the table is built; returns -1.
double measure_step(const Config& cfg, Ops<float>& ops, int steps, ParamTable* table) {
  ReformerModel<float> model(cfg, ops);
  *table = model.table();
  if (steps <= 0) return -1;
  model.init_params(cfg.training.seed);
  Optimizer<float> opt(cfg.optimizer, model.table(), ops);
  const int64_t L = model.seq_len();
  std::vector<int32_t> tokens(static_cast<size_t>(L)), targets(static_cast<size_t>(L));
  const RngKey key = make_key(cfg.training.seed, /*purpose: bench*/ 9);
  for (int64_t i = 0; i < L; ++i)
    tokens[size_t(i)] = int32_t(rng_u32(key, uint64_t(i)) % uint32_t(cfg.model.vocab_size));
  for (int64_t i = 0; i < L; ++i) targets[size_t(i)] = i + 1 < L ? tokens[size_t(i + 1)] : -1;
  const float scale = 1.0f / float(L - 1);
  auto step = [&](int64_t s) {
    model.zero_grads();
    model.forward_backward(tokens.data(), targets.data(), uint64_t(s), true, true, scale);
    clip_grad_norm(ops, model.grads(), model.num_params(), cfg.optimizer.grad_clip);
    opt.step(model.params(), model.grads(), s + 1, learning_rate(cfg.optimizer, s + 1, steps));
  };
  step(0);
  ops.synchronize();
  const double t0 = now_s();
  for (int s = 1; s <= steps; ++s) step(s);
  ops.synchronize();
  return 1e3 * (now_s() - t0) / steps;
}

std::string peak_gib(const Ops<float>& ops) {
  const int64_t b = ops.peak_bytes();
  return b < 0 ? "-" : strfmt("%.2f", double(b) / double(1ull << 30));
}

int run(const Options& o) {
  if (cuda_device_count() == 0) {
    std::fprintf(stderr,
                 "ops_bench: no CUDA device is visible; it times the CUDA ops and needs a GPU\n");
    return 1;
  }
  const double t_start = now_s();
  Config cfg = load_config(o.config);
  cfg.model.max_len = int(o.length);
  cfg.model.axial_shape.clear();  // re-derived for this length, as `reformer bench` does
  cfg.attention.n_buckets = 0;
  validate_config(cfg, o.config + " (length " + std::to_string(o.length) + ")");
  const Shapes s(cfg);
  auto ops = make_cuda_ops();

  ParamTable table;
  const double step_ms = measure_step(cfg, *ops, o.steps, &table);
  const std::string step_peak = peak_gib(*ops);

  std::string kinds;
  for (AttentionKind k : cfg.attention.kinds)
    kinds += (kinds.empty() ? "" : ",") + std::string(to_string(k));
  std::printf("ops_bench: %s, L=%lld, %d layers, d_model %d, %d heads x %d, d_ff %d, vocab %d, "
              "attention %s (%d rounds, %d buckets%s, chunk %d), ffn_chunk %lld, loss_chunk %lld, "
              "%s, %lld parameters\n\n",
              o.config.c_str(), (long long)s.L, s.NL, s.D, s.H, s.dh, s.F, s.V, kinds.c_str(),
              s.nh, s.nb, s.f0 ? strfmt(" = %d x %d", s.f0, s.nb / s.f0).c_str() : "",
              s.ap.chunk, (long long)s.fc, (long long)s.oc,
              to_string(cfg.optimizer.name), (long long)table.total());

  Bufs b(*ops, s, table.total());
  Optimizer<float> opt(cfg.optimizer, table, *ops);
  Recipe recipe;
  build_recipe(recipe, b, s, cfg, table, opt);
  std::vector<Entry>& es = recipe.entries();
  for (Entry& e : es) time_entry(*ops, e, o.reps);
  const std::string ops_peak = peak_gib(*ops);

  double total = 0;
  int64_t calls = 0;
  for (const Entry& e : es) {
    total += e.ms_step();
    calls += e.calls;
  }
  std::vector<const Entry*> sorted;
  for (const Entry& e : es) sorted.push_back(&e);
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const Entry* a, const Entry* c) { return a->ms_step() > c->ms_step(); });
  std::printf("| op | shape | ms/call | reps | calls/step | ms/step | share | TFLOP/s |\n");
  std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Entry* e : sorted) {
    const std::string tflops =
        e->flops > 0 ? strfmt("%.1f", e->flops / (e->ms_call() * 1e-3) / 1e12) : "";
    std::printf("| %s | %s | %.4f | %d | %lld | %.2f | %.1f%% | %s |\n", e->op.c_str(),
                e->shape.c_str(), e->ms_call(), e->reps * e->per_run, (long long)e->calls,
                e->ms_step(), 100.0 * e->ms_step() / total, tflops.c_str());
  }
  std::printf("| **summed step** | | | | %lld | %.1f | 100%% | |\n\n", (long long)calls, total);

  // Subtotals by category, largest first.
  std::map<std::string, std::pair<int64_t, double>> cat;
  for (const Entry& e : es) {
    cat[e.category].first += e.calls;
    cat[e.category].second += e.ms_step();
  }
  std::vector<std::pair<std::string, std::pair<int64_t, double>>> cats(cat.begin(), cat.end());
  std::stable_sort(cats.begin(), cats.end(),
                   [](const auto& a, const auto& c) { return a.second.second > c.second.second; });
  std::printf("| category | calls/step | ms/step | share |\n| --- | ---: | ---: | ---: |\n");
  for (const auto& [name, v] : cats)
    std::printf("| %s | %lld | %.1f | %.1f%% |\n", name.c_str(), (long long)v.first, v.second,
                100.0 * v.second / total);

  std::printf("\nsummed step: %.1f ms (%.0f tokens/s), %lld op calls\n", total,
              double(s.L) / (total * 1e-3), (long long)calls);
  if (step_ms > 0)
    std::printf("measured step: %.1f ms (%.0f tokens/s; mean of %d after a warm-up, device peak "
                "%s GiB); not in the per-op sum: %.1f ms (%.1f%%: host work, launch gaps, "
                "synchronisations)\n",
                step_ms, double(s.L) / (step_ms * 1e-3), o.steps, step_peak.c_str(),
                step_ms - total, 100.0 * (step_ms - total) / step_ms);
  std::printf("device peak over the run: %s GiB; run time %.1f s\n", ops_peak.c_str(),
              now_s() - t_start);
  return 0;
}

}  // namespace
}  // namespace reformer

int main(int argc, char** argv) {
  using reformer::Options;
  Options o;
  bool have_length = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    int64_t v = 0;
    auto value = [&](int64_t lo) {
      if (i + 1 >= argc || !reformer::parse_int(argv[i + 1], &v) || v < lo) return false;
      ++i;
      return true;
    };
    if (a == "-h" || a == "--help") {
      reformer::usage(stdout);
      return 0;
    } else if (a == "--length" && value(1)) {
      o.length = v;
      have_length = true;
    } else if (a == "--reps" && value(1)) {
      o.reps = int(std::min<int64_t>(v, 1000000));
    } else if (a == "--steps" && value(0)) {
      o.steps = int(std::min<int64_t>(v, 1000));
    } else if (a == "--config" && i + 1 < argc) {
      o.config = argv[++i];
    } else if (!have_length && a[0] != '-' && reformer::parse_int(a.c_str(), &v) && v > 0) {
      o.length = v;
      have_length = true;
    } else {
      std::fprintf(stderr, "ops_bench: bad argument '%s'\n", a.c_str());
      reformer::usage(stderr);
      return 2;
    }
  }
  if (o.length > (int64_t(1) << 30)) {
    std::fprintf(stderr, "ops_bench: length %lld is too large\n", (long long)o.length);
    return 2;
  }
  try {
    return reformer::run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ops_bench: %s\n", e.what());
    return 1;
  }
}
