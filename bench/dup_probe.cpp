// Where a duplication-task model fails: evaluates a checkpoint on the CPU and
// reports, per position class of the second copy, the accuracy and what LSH
// did there.
//
//   dup_probe CHECKPOINT.h5 [SEQUENCES]
//
// For the query at position q of the second copy (sequence 0 w 0 w, copy
// offset h = L / 2) the symbol to predict sits at t = q - h + 1. For each hash
// round of each head of the first layer it counts whether t shares q's bucket
// and whether t lies in a chunk q attends to (its own chunk of the sorted
// round or the one before it). Prints accuracy by the axial column of q, by
// slice of the copy, and the hash figures for correct and wrong predictions.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/trainer.h"
#include "kernels/errors.h"
#include "kernels/ops.h"

using namespace reformer;

namespace {

// Forwards every op unchanged.
class ForwardingOps : public Ops<float> {
 public:
  using T = float;
  explicit ForwardingOps(Ops<float>& inner) : inner_(inner) {}
  const char* name() const override { return inner_.name(); }
  int64_t peak_bytes() const override { return inner_.peak_bytes(); }
  bool supports(OpId id) const override { return inner_.supports(id); }
  void* stream() override { return inner_.stream(); }
  bool attention_output_bf16(AttentionPrecision prec) const override {
    return inner_.attention_output_bf16(prec);
  }
#define FORWARD(ret, name, params, args) \
  ret name params override { return inner_.name args; }
  REFORMER_OPS(FORWARD)
#undef FORWARD

 protected:
  Ops<float>& inner_;
};

// Keeps host copies of the buckets, sorted orders, predictions and targets
// of the passes it sees (CPU ops: every pointer is a host pointer).
class CaptureOps final : public ForwardingOps {
 public:
  using ForwardingOps::ForwardingOps;
  void lsh_hash(int32_t* buckets, Operand<T> qk, int64_t ld, const T* R, int64_t L, int dh,
                int n_hashes, int n_buckets, int factor0, int heads) override {
    inner_.lsh_hash(buckets, qk, ld, R, L, dh, n_hashes, n_buckets, factor0, heads);
    hashes.emplace_back(buckets, buckets + L * n_hashes * heads);
  }
  void lsh_sort(int32_t* perm, const int32_t* buckets, int64_t L, int n_hashes,
                int n_buckets) override {
    inner_.lsh_sort(perm, buckets, L, n_hashes, n_buckets);
    perms.emplace_back(perm, perm + L * n_hashes);
  }
  void softmax_cross_entropy(T* loss, T* dlogits, const T* logits, const int32_t* t,
                             int64_t N, int V, T grad_scale) override {
    inner_.softmax_cross_entropy(loss, dlogits, logits, t, N, V, grad_scale);
    targets.insert(targets.end(), t, t + N);
  }
  void argmax_rows(int32_t* out, const T* logits, int64_t N, int V) override {
    inner_.argmax_rows(out, logits, N, V);
    pred.insert(pred.end(), out, out + N);
  }
  std::vector<std::vector<int32_t>> hashes, perms;  // one per head: [rounds * L]
  std::vector<int32_t> pred, targets;
  void clear() { hashes.clear(), perms.clear(), pred.clear(), targets.clear(); }
};

struct Tally {
  int64_t n = 0, correct = 0;
  void add(bool ok) { ++n, correct += ok; }
  double acc() const { return n ? double(correct) / double(n) : 0.0; }
};

struct HashTally {
  int64_t pairs = 0, same_bucket = 0, visible = 0, any_visible = 0, queries = 0;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: dup_probe CHECKPOINT.h5 [SEQUENCES]\n");
    return 2;
  }
  try {
    const std::string path = argv[1];
    const int sequences = argc > 2 ? std::atoi(argv[2]) : 16;
    const CheckpointState st = read_checkpoint(path);
    Config cfg = parse_config(st.config_text, path + " (stored config)",
                              {"training.device=cpu", "training.batch_size=1", "model.loss_chunk=0"});
    if (cfg.data.kind != DataKind::duplication)
      throw ConfigError("not a duplication-task checkpoint");
    CaptureOps* cap = nullptr;
    LocalCommunicator world;
    Trainer trainer(cfg, world, "", [&cap](Ops<float>& cpu) -> std::unique_ptr<Ops<float>> {
      auto c = std::make_unique<CaptureOps>(cpu);
      cap = c.get();
      return c;
    });
    trainer.load(path, /*full*/ false);
    trainer.evaluate(Split::valid, sequences);
    const int64_t L = cfg.model.max_len, h = L / 2;
    const int a2 = cfg.model.axial_shape[1];
    const int chunk = cfg.attention.bucket_size;
    std::vector<Tally> by_column(static_cast<size_t>(a2)), by_slice(8);
    HashTally ok_hash, bad_hash;
    Tally all;
    const int n_heads = int(cap->hashes.size()) / sequences;
    for (int s = 0; s < sequences; ++s) {
      for (int64_t q = h; q + 1 < L; ++q) {
        const int32_t target = cap->targets[size_t(s * L + q)];
        if (target < 0) continue;
        const bool ok = cap->pred[size_t(s * L + q)] == target;
        const int64_t t = q - h + 1;
        all.add(ok);
        by_column[size_t(q % a2)].add(ok);
        by_slice[size_t((q - h) * 8 / h)].add(ok);
        HashTally& ht = ok ? ok_hash : bad_hash;
        ++ht.queries;
        bool seen = false;
        for (int head = 0; head < n_heads; ++head) {
          const std::vector<int32_t>& b = cap->hashes[size_t(s * n_heads + head)];
          const std::vector<int32_t>& perm = cap->perms[size_t(s * n_heads + head)];
          const int rounds = int(b.size() / size_t(L));
          for (int r = 0; r < rounds; ++r) {
            const int32_t* br = b.data() + int64_t(r) * L;
            const int32_t* pr = perm.data() + int64_t(r) * L;
            int64_t slot_q = -1, slot_t = -1;
            for (int64_t i = 0; i < L; ++i) {
              if (pr[i] == q) slot_q = i;
              if (pr[i] == t) slot_t = i;
            }
            const int64_t cq = slot_q / chunk, ct = slot_t / chunk;
            const bool vis = cq == ct || cq == ct + 1;
            ++ht.pairs;
            ht.same_bucket += br[q] == br[t];
            ht.visible += vis;
            seen |= vis;
          }
        }
        ht.any_visible += seen;
      }
    }
    std::printf("checkpoint %s: %d sequences, accuracy %.4f (%lld predictions)\n", path.c_str(),
                sequences, all.acc(), (long long)all.n);
    std::printf("\naccuracy by axial column of the query (q %% %d)\n", a2);
    for (int c = 0; c < a2; ++c)
      std::printf("  col %3d  %.3f%s", c, by_column[size_t(c)].acc(), c % 4 == 3 ? "\n" : "");
    std::printf("\naccuracy by eighth of the second copy\n");
    for (int k = 0; k < 8; ++k) std::printf("  %d/8  %.3f\n", k, by_slice[size_t(k)].acc());
    auto print = [](const char* what, const HashTally& ht) {
      std::printf("  %-8s queries %7lld  same bucket %.3f  target visible %.3f  visible in some "
                  "(head, round) %.3f\n",
                  what, (long long)ht.queries, ht.pairs ? double(ht.same_bucket) / ht.pairs : 0.0,
                  ht.pairs ? double(ht.visible) / ht.pairs : 0.0,
                  ht.queries ? double(ht.any_visible) / ht.queries : 0.0);
    };
    std::printf("\nhash rounds of every LSH layer (share of (layer, head, round) triples)\n");
    print("correct", ok_hash);
    print("wrong", bad_hash);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dup_probe: %s\n", e.what());
    return 1;
  }
}
