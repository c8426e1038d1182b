// `reformer generate` end to end: exit statuses for bad command lines and
// missing or damaged checkpoints, exactly N bytes on stdout, reproducible
// sampling for a seed, deterministic greedy decoding, the tokens/s line, and
// the duplication task continued by a trained model.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/model.h"
#include "kernels/cpu/cpu_ops.h"
#include "tests/common/checkpoint_testing.h"

namespace reformer {
namespace {

const std::string kBin = REFORMER_BINARY;
const std::string kSrc = REFORMER_SOURCE_DIR;

struct Result {
  int status = -1;   // exit status, or 128 + signal
  std::string out;   // stdout
  std::string err;   // stderr
};

// Runs `reformer generate ARGS`, capturing stdout and stderr apart.
Result generate(const std::string& args, const std::string& err_path) {
  Result r;
  FILE* p = popen((kBin + " generate " + args + " 2>" + err_path).c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.err = testing_ckpt::read_bytes(err_path);
  return r;
}

// A checkpoint of the tiny recipe (LSH layers) with byte vocabulary and
// randomly initialised parameters: decoding does not need a trained model.
class GenerateCli : public ::testing::Test {
 protected:
  void SetUp() override {
    Config cfg = load_config(kSrc + "/configs/tiny.yaml",
                             {"model.vocab_size=256", "model.max_len=64"});
    CpuOps<float> ops;
    ReformerModel<float> model(cfg, ops);
    model.init_params(cfg.training.seed);
    CheckpointState st;
    st.step = 3;
    st.seed = cfg.training.seed;
    st.config_text = to_yaml(cfg);
    st.optimizer_name = "adamw";
    for (const ParamInfo& p : model.table().params()) {
      CheckpointTensor t{p.name, p.shape, std::vector<float>(size_t(p.size))};
      ops.to_host(t.data.data(), model.params() + p.offset, p.size);
      st.model.push_back(std::move(t));
    }
    ckpt_ = dir_ / "ckpt.h5";
    write_checkpoint(ckpt_, st);
  }
  Result run(const std::string& args) { return generate(args, dir_ / "err.txt"); }
  std::string base() const { return "--checkpoint " + ckpt_ + " --prompt hello "; }

  testing_ckpt::TempDir dir_;
  std::string ckpt_;
};

TEST_F(GenerateCli, BadArgumentsExit2) {
  const std::vector<std::string> bad = {
      "",                                                 // nothing
      "--prompt hi --tokens 3",                           // no checkpoint
      "--checkpoint " + ckpt_ + " --tokens 3",            // no prompt
      base(),                                             // no --tokens
      base() + "--tokens 3x",                             // not a whole number
      base() + "--tokens -1",                             // out of range
      base() + "--tokens 3 --temperature warm",           // not a number
      base() + "--tokens 3 --temperature -0.5",           // negative
      base() + "--tokens 3 --temperature nan",            // not finite
      base() + "--tokens 3 --top-p 0",                    // outside (0, 1]
      base() + "--tokens 3 --top-p 1.5",                  //
      base() + "--tokens 3 --top-k 2.5",                  // not whole
      base() + "--tokens 3 --seed -4",                    // not unsigned
      base() + "--tokens 3 --frobnicate",                 // unknown option
      base() + "--tokens 3 --prompt-file " + ckpt_,       // two prompts
      base() + "--tokens 60",                             // 5 + 60 > max_len 64
      "--checkpoint " + ckpt_ + " --prompt '' --tokens 3",  // empty prompt
      base() + "--tokens 3 --set model.n_heads=zero",     // bad override
  };
  for (const std::string& a : bad) {
    const Result r = run(a);
    EXPECT_EQ(r.status, 2) << a << "\n" << r.err;
    EXPECT_TRUE(r.out.empty()) << a;
    EXPECT_NE(r.err.find("reformer: "), std::string::npos) << a;
  }
  EXPECT_EQ(run("--help").status, 0);
}

TEST_F(GenerateCli, MissingOrDamagedCheckpointExits1) {
  Result r = run("--checkpoint " + (dir_ / "nope.h5") + " --prompt hi --tokens 3");
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_NE(r.err.find("checkpoint refused"), std::string::npos) << r.err;
  std::string bytes = testing_ckpt::read_bytes(ckpt_);
  bytes[bytes.size() / 2] ^= 0x40;
  const std::string damaged = dir_ / "damaged.h5";
  testing_ckpt::write_bytes(damaged, bytes);
  r = run("--checkpoint " + damaged + " --prompt hi --tokens 3");
  EXPECT_EQ(r.status, 1) << r.err;
  r = run("--checkpoint " + ckpt_ + " --prompt-file " + (dir_ / "missing.txt") + " --tokens 3");
  EXPECT_EQ(r.status, 1) << r.err;
}

TEST_F(GenerateCli, PrintsExactlyNBytesReproducibly) {
  const Result a = run(base() + "--tokens 40 --seed 7");
  ASSERT_EQ(a.status, 0) << a.err;
  EXPECT_EQ(a.out.size(), 40u);
  // The last stderr line reports the decoding speed.
  const std::string last = a.err.substr(a.err.rfind('\n', a.err.size() - 2) + 1);
  EXPECT_NE(last.find("tokens/s"), std::string::npos) << a.err;
  EXPECT_EQ(run(base() + "--tokens 40 --seed 7").out, a.out);  // same seed, same bytes
  const Result other = run(base() + "--tokens 40 --seed 8 --top-k 50 --top-p 0.9");
  ASSERT_EQ(other.status, 0) << other.err;
  EXPECT_EQ(other.out.size(), 40u);
  EXPECT_NE(other.out, a.out);
  // Greedy: the seed does not matter, and the prompt may come from a file.
  testing_ckpt::write_bytes(dir_ / "prompt.txt", "hello");
  const Result g1 = run(base() + "--tokens 20 --temperature 0 --seed 1");
  const Result g2 = run("--checkpoint " + ckpt_ + " --prompt-file " + (dir_ / "prompt.txt") +
                        " --tokens 20 --temperature 0 --seed 2");
  ASSERT_EQ(g1.status, 0) << g1.err;
  EXPECT_EQ(g1.out.size(), 20u);
  EXPECT_EQ(g1.out, g2.out);
  EXPECT_EQ(run(base() + "--tokens 0").out, "");
}

// The paper's task: trained on 0 w 0 w, the model given 0 w 0 and a prefix
// of w continues (greedily) with exactly the rest of w. Trained here on the
// CPU recipe (300 steps: eval accuracy 1.0 from step 200 in the recipe's
// runs), then decoded with the cache (LSH layers attend within buckets).
TEST(GenerateDuplication, ContinuesTheCopy) {
  testing_ckpt::TempDir dir;
  const std::string train = kBin + " train --config " + kSrc +
                            "/configs/duplication-cpu.yaml --set training.steps=300 "
                            "--set checkpoint.every=300 --set checkpoint.dir=" +
                            (dir / "ck") + " > " + (dir / "train.log") + " 2>&1";
  ASSERT_EQ(std::system(train.c_str()), 0) << testing_ckpt::read_bytes(dir / "train.log");
  const std::string ckpt = dir / "ck/ckpt-00000300.h5";
  uint64_t x = 12345;
  for (int trial = 0; trial < 3; ++trial) {
    std::string w;
    for (int i = 0; i < 31; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      w.push_back(char(1 + (x >> 33) % 31));  // symbols 1..31, as the task draws them
    }
    const int given = 5 + 8 * trial;
    const std::string prompt = std::string(1, '\0') + w + std::string(1, '\0') + w.substr(0, given);
    testing_ckpt::write_bytes(dir / "prompt.bin", prompt);
    const Result r = generate("--checkpoint " + ckpt + " --prompt-file " + (dir / "prompt.bin") +
                                  " --tokens " + std::to_string(31 - given) + " --temperature 0",
                              dir / "err.txt");
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, w.substr(size_t(given))) << "trial " << trial << " given " << given;
  }
}

}  // namespace
}  // namespace reformer
