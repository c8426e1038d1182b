// The `reformer` program end to end: exit statuses and messages for bad input,
// metrics output, determinism, and resuming after SIGKILL / SIGTERM with the
// same losses as an uninterrupted run.
#include <gtest/gtest.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>

#include "framework/checkpoint.h"
#include "tests/common/checkpoint_testing.h"

extern char** environ;
namespace fs = std::filesystem;

namespace {

const std::string kBin = REFORMER_BINARY;
const std::string kSrc = REFORMER_SOURCE_DIR;

struct Result {
  int status = -1;     // exit status, or 128 + signal
  std::string output;  // stdout and stderr together
};

// Runs a shell command line, capturing its output and exit status.
Result run(const std::string& cmd) {
  Result r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/reformer_cli_XXXXXX";
    dir_ = mkdtemp(tmpl);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void stop_signal_writes_a_checkpoint(int sig, bool echoed = false);
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path(name)) << text;
    return path(name);
  }
  // A tiny training command writing its checkpoints under the test's folder.
  std::string tiny(const std::string& extra) const {
    return "env OMP_NUM_THREADS=1 " + kBin + " train --config " + kSrc + "/configs/tiny.yaml" +
           " --set checkpoint.dir=" + path("ckpt") + " " + extra;
  }
  std::string dir_;
};

// step -> loss text, from a metrics file; a later line for the same step wins.
std::map<long, std::string> losses(const std::string& metrics) {
  std::map<long, std::string> out;
  std::ifstream f(metrics);
  std::string line;
  const std::regex re("\\{\"step\": ([0-9]+), \"loss\": ([^,]+),");
  std::smatch m;
  while (std::getline(f, line))
    if (std::regex_search(line, m, re)) out[std::stol(m[1])] = m[2];
  return out;
}

}  // namespace

TEST_F(Cli, HelpExitsZero) {
  for (const char* c : {"--help", "train --help", "eval --help", "inspect --help"}) {
    const Result r = run(kBin + " " + c);
    EXPECT_EQ(r.status, 0) << c;
    EXPECT_NE(r.output.find("usage"), std::string::npos) << c << ": " << r.output;
  }
}

TEST_F(Cli, UnknownCommandAndArgumentExitTwo) {
  EXPECT_EQ(run(kBin + " frobnicate").status, 2);
  EXPECT_EQ(run(kBin + " train --frobnicate").status, 2);
  EXPECT_EQ(run(kBin).status, 2);
}

TEST_F(Cli, MisspeltKeyExitsTwoNamingKeyFileAndLine) {
  const std::string cfg = write("bad.yaml", "model:\n  d_model: 32\n  n_layres: 2\n");
  const Result r = run(kBin + " train --config " + cfg);
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("model.n_layres"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("bad.yaml:3"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("model.n_layers"), std::string::npos) << r.output;  // did you mean
}

TEST_F(Cli, WrongTypeAndRangeExitTwo) {
  const Result a = run(tiny("--set model.d_model=abc"));
  EXPECT_EQ(a.status, 2);
  EXPECT_NE(a.output.find("model.d_model"), std::string::npos) << a.output;
  const Result b = run(tiny("--set model.n_heads=0"));
  EXPECT_EQ(b.status, 2);
  EXPECT_NE(b.output.find("model.n_heads"), std::string::npos) << b.output;
  const Result c = run(tiny("--set attention.kinds=[lsh,lhs]"));
  EXPECT_EQ(c.status, 2);
  EXPECT_NE(c.output.find("lhs"), std::string::npos) << c.output;
}

TEST_F(Cli, MissingConfigFileExitsTwo) {
  const Result r = run(kBin + " train --config " + path("nope.yaml"));
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("nope.yaml"), std::string::npos) << r.output;
}

TEST_F(Cli, MissingDataFileIsRefusedWithAMessage) {
  const Result small = run(tiny("--set data.kind=bytes --set data.path=" + path("enwik8")));
  EXPECT_EQ(small.status, 2) << small.output;  // vocab 16 cannot hold bytes
  EXPECT_NE(small.output.find("model.vocab_size"), std::string::npos) << small.output;
  const Result r = run(tiny("--set data.kind=bytes --set data.path=" + path("enwik8") +
                            " --set model.vocab_size=256"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("cannot open data file"), std::string::npos) << r.output;
}

TEST_F(Cli, TrainsWritesMetricsAndEndsWithAnEvalLine) {
  const Result r = run(tiny("--metrics " + path("m.jsonl")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("config (resolved):"), std::string::npos);
  EXPECT_NE(r.output.find("tok/s"), std::string::npos);
  EXPECT_NE(r.output.find("memory: 2 heads per pass; 0 of 2 layers kept (attention state; "
                          "feed-forward both; x1 kept; LN rows kept), 0 stashed"),
            std::string::npos)
      << r.output;
  std::ifstream f(path("m.jsonl"));
  std::string line, last;
  int lines = 0;
  while (std::getline(f, line)) {
    ++lines;
    last = line;
    if (line.find("\"eval\"") == std::string::npos)
      for (const char* k : {"\"step\"", "\"loss\"", "\"bpc\"", "\"lr\"", "\"tokens_per_s\""})
        EXPECT_NE(line.find(k), std::string::npos) << k << " missing in " << line;
  }
  EXPECT_GE(lines, 7);
  for (const char* k : {"\"eval\": true", "\"eval_loss\"", "\"eval_bpc\"", "\"eval_accuracy\""})
    EXPECT_NE(last.find(k), std::string::npos) << k << " missing in " << last;
  EXPECT_TRUE(fs::exists(path("ckpt/ckpt-00000030.h5")));
}

TEST_F(Cli, SameConfigSameLossesBitForBit) {
  ASSERT_EQ(run(tiny("--set checkpoint.resume=none --set training.log_every=1 --metrics " + path("a.jsonl"))).status, 0);
  ASSERT_EQ(run(tiny("--set checkpoint.resume=none --set training.log_every=1 --metrics " + path("b.jsonl"))).status, 0);
  const auto a = losses(path("a.jsonl")), b = losses(path("b.jsonl"));
  EXPECT_EQ(a.size(), 30u);
  EXPECT_EQ(a, b);
}

TEST_F(Cli, ResumeAfterSigkillGivesTheUninterruptedLosses) {
  const std::string common =
      "--set training.steps=40 --set training.log_every=1 --set checkpoint.resume=auto ";
  // Uninterrupted: 40 steps.
  ASSERT_EQ(run(tiny(common + "--set checkpoint.resume=none --set checkpoint.dir=" + path("full") +
                     " --metrics " + path("full.jsonl")))
                .status,
            0);
  // Interrupted: checkpoints every 20 steps; SIGKILL once step 20's file exists.
  const std::string cmd = tiny(common + "--set checkpoint.every=20 --metrics " + path("cut.jsonl")) +
                          " > " + path("cut.log") + " 2>&1";
  pid_t pid;
  const char* argv[] = {"/bin/sh", "-c", nullptr, nullptr};
  const std::string exec_cmd = "exec " + cmd;
  argv[2] = exec_cmd.c_str();
  ASSERT_EQ(posix_spawn(&pid, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  const std::string ck20 = path("ckpt/ckpt-00000020.h5");
  for (int i = 0; i < 20000 && !fs::exists(ck20); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_TRUE(fs::exists(ck20));
  kill(pid, SIGKILL);
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(WIFSIGNALED(st)) << "the run finished before it could be killed";
  ASSERT_FALSE(fs::exists(path("ckpt/ckpt-00000040.h5")));
  // The same command resumes from step 20 (appending to the metrics file).
  const Result r = run(tiny(common + "--set checkpoint.every=20 --metrics " + path("cut.jsonl")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  const auto full = losses(path("full.jsonl")), cut = losses(path("cut.jsonl"));
  ASSERT_EQ(full.size(), 40u);
  EXPECT_EQ(full, cut);
  // Each step once: the killed run's lines past step 20 were dropped on resume.
  std::ifstream f(path("cut.jsonl"));
  int step_lines = 0;
  for (std::string line; std::getline(f, line);) step_lines += line.find("\"loss\"") != std::string::npos;
  EXPECT_EQ(step_lines, 40) << r.output;
}

// SIGTERM and SIGHUP (a closed terminal, a scheduler's notice) both finish
// the step, write a checkpoint and exit 0; the resumed run equals an
// uninterrupted one. `echoed`: the signal comes twice 20 ms apart, as
// `timeout` and Slurm deliver it (to the process, then to its group); the
// echo must not end the process before the checkpoint.
void Cli::stop_signal_writes_a_checkpoint(int sig, bool echoed) {
  const std::string common =
      "--set training.steps=200 --set training.log_every=1 --set checkpoint.resume=auto ";
  pid_t pid;
  const std::string exec_cmd = "exec " + tiny(common + "--metrics " + path("cut.jsonl")) + " > " +
                               path("cut.log") + " 2>&1";
  const char* argv[] = {"/bin/sh", "-c", exec_cmd.c_str(), nullptr};
  ASSERT_EQ(posix_spawn(&pid, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  // Wait until a few steps are logged, then ask it to stop.
  for (int i = 0; i < 20000 && losses(path("cut.jsonl")).size() < 5; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  kill(pid, sig);
  if (echoed) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    kill(pid, sig);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(WIFEXITED(st)) << "signal " << sig;
  EXPECT_EQ(WEXITSTATUS(st), 0);
  const size_t done = losses(path("cut.jsonl")).size();
  ASSERT_LT(done, 200u) << "the run finished before SIGTERM";
  std::ifstream log(path("cut.log"));
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("stop requested"), std::string::npos) << text;
  const Result resumed = run(tiny(common + "--metrics " + path("cut.jsonl")));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from"), std::string::npos) << resumed.output;
  ASSERT_EQ(run(tiny(common + "--set checkpoint.resume=none --set checkpoint.dir=" + path("full") +
                     " --metrics " + path("full.jsonl")))
                .status,
            0);
  EXPECT_EQ(losses(path("full.jsonl")), losses(path("cut.jsonl")));
}

TEST_F(Cli, SigtermWritesACheckpointAndResumesExactly) { stop_signal_writes_a_checkpoint(SIGTERM); }
TEST_F(Cli, SighupWritesACheckpointAndResumesExactly) { stop_signal_writes_a_checkpoint(SIGHUP); }
TEST_F(Cli, SigintAndItsEchoWriteACheckpointAndResumeExactly) {
  stop_signal_writes_a_checkpoint(SIGINT, /*echoed*/ true);
}

TEST_F(Cli, EvalAndInspectACheckpoint) {
  ASSERT_EQ(run(tiny("")).status, 0);
  const std::string ck = path("ckpt/ckpt-00000030.h5");
  const Result e = run(kBin + " eval --checkpoint " + ck);
  EXPECT_EQ(e.status, 0) << e.output;
  EXPECT_NE(e.output.find("accuracy"), std::string::npos) << e.output;
  EXPECT_NE(e.output.find("bpc"), std::string::npos) << e.output;
  const Result i = run(kBin + " inspect " + ck);
  EXPECT_EQ(i.status, 0) << i.output;
  EXPECT_NE(i.output.find("layers.0.attn.wqk"), std::string::npos) << i.output;
}

TEST_F(Cli, InspectAndResumeRefuseADamagedCheckpoint) {
  ASSERT_EQ(run(tiny("")).status, 0);
  const std::string ck = path("ckpt/ckpt-00000030.h5");
  // Flip one byte inside the raw data of /model/embed.tokens: find its first
  // values' bytes in the file (datasets are stored uncompressed).
  const reformer::CheckpointState st = reformer::read_checkpoint(ck);
  const auto& t = st.model.front();
  ASSERT_EQ(t.name, "embed.tokens");
  const std::string needle(reinterpret_cast<const char*>(t.data.data()), 32);
  std::fstream f(ck, std::ios::in | std::ios::out | std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t at = bytes.find(needle);
  ASSERT_NE(at, std::string::npos);
  f.clear();
  f.seekp(std::streamoff(at + 9));
  const char flipped = char(bytes[at + 9] ^ 0x5a);
  f.write(&flipped, 1);
  f.close();
  const Result i = run(kBin + " inspect " + ck);
  EXPECT_EQ(i.status, 1) << i.output;
  EXPECT_NE(i.output.find("fails its whole-file checksum"), std::string::npos) << i.output;
  const Result r = run(tiny("--resume " + ck));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("checkpoint refused"), std::string::npos) << r.output;
}

TEST_F(Cli, DuplicationRecipeLearnsTheCopyWithLsh) {
  // The paper's task at CPU size: LSH attention with 4 hash rounds must
  // predict the second copy of held-out sequences with >= 95% accuracy.
  const Result r = run(kBin + " train --config " + kSrc + "/configs/duplication-cpu.yaml" +
                       " --set checkpoint.dir=" + path("ckpt") + " --metrics " + path("m.jsonl"));
  ASSERT_EQ(r.status, 0) << r.output;
  std::ifstream f(path("m.jsonl"));
  std::string line, last_eval;
  while (std::getline(f, line))
    if (line.find("\"eval\": true") != std::string::npos) last_eval = line;
  const std::regex re("\"eval_accuracy\": ([0-9.eE+-]+)");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(last_eval, m, re)) << last_eval;
  EXPECT_GE(std::stod(m[1]), 0.95) << last_eval;
}

TEST_F(Cli, ResumeRefusesACheckpointOfAnotherModelNamingParameterAndShapes) {
  ASSERT_EQ(run(tiny("")).status, 0);
  const std::string ck = path("ckpt/ckpt-00000030.h5");
  const Result key = run(tiny("--set model.d_ff=48 --resume " + ck));
  EXPECT_EQ(key.status, 2) << key.output;
  EXPECT_NE(key.output.find("config error: resuming from " + ck +
                            " with a changed configuration: model.d_ff 64 -> 48"),
            std::string::npos) << key.output;
  // allow_changes lets no shape change through: the load names the key too.
  const Result r = run(tiny("--set model.d_ff=48 --set checkpoint.allow_changes=true --resume " + ck));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("layers.0.ffn.w1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[32, 64]"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[32, 48]"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("(changed in the configuration: model.d_ff 64 -> 48; "), std::string::npos)
      << r.output;
  const Result missing = run(tiny("--resume " + path("ckpt/ckpt-00000999.h5")));
  EXPECT_EQ(missing.status, 1) << missing.output;
  EXPECT_NE(missing.output.find("does not exist"), std::string::npos) << missing.output;
}

// Resuming compares the run's configuration with the checkpoint's, key by key
// (framework/resume_check.h): a learning-rate change is printed as a warning
// and allowed; a seed or batch-size change is refused (status 2, naming each
// key) unless checkpoint.allow_changes, which prints them as warnings.
TEST_F(Cli, ResumeWithAChangedConfigurationPrintsEveryKeyAndRefusesBreakingOnes) {
  ASSERT_EQ(run(tiny("--set training.steps=4")).status, 0);
  const std::string ck = path("ckpt/ckpt-00000004.h5");
  const Result lr = run(tiny("--set training.steps=5 --set optimizer.lr=0.001 --resume " + ck));
  EXPECT_EQ(lr.status, 0) << lr.output;
  EXPECT_NE(lr.output.find("resume: training.steps 4 -> 5\n"), std::string::npos) << lr.output;
  EXPECT_NE(lr.output.find("resume: optimizer.lr 0.003 -> 0.001 (warning: "), std::string::npos)
      << lr.output;
  EXPECT_EQ(lr.output.find("checkpoint.resume"), std::string::npos) << lr.output;  // silent

  const Result seed = run(tiny("--set training.steps=5 --set training.seed=7 "
                               "--set training.batch_size=4 --resume " + ck));
  EXPECT_EQ(seed.status, 2) << seed.output;
  EXPECT_NE(seed.output.find("config error: resuming from " + ck + " with a changed "
                             "configuration: training.batch_size 2 -> 4, training.seed 1 -> 7: "),
            std::string::npos) << seed.output;
  EXPECT_NE(seed.output.find("checkpoint.allow_changes=true"), std::string::npos) << seed.output;

  const Result allowed = run(tiny("--set training.steps=5 --set training.seed=7 "
                                  "--set checkpoint.allow_changes=true --resume " + ck));
  EXPECT_EQ(allowed.status, 0) << allowed.output;
  EXPECT_NE(allowed.output.find("resume: training.seed 1 -> 7 (warning: "), std::string::npos)
      << allowed.output;
  EXPECT_NE(allowed.output.find("resumed from " + ck), std::string::npos) << allowed.output;
}

TEST_F(Cli, MetricsPathFromTheConfigWhenNoFlag) {
  const Result r = run(tiny("--set logging.metrics=" + path("from-config.jsonl")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(losses(path("from-config.jsonl")).size(), 7u);  // steps 1, 5, 10, ..., 30
}

// ---------------------------------------------------------------- hostile input

TEST_F(Cli, ConfigThatIsADirectoryHugeOrTwoDocumentsExitsTwo) {
  const Result dir = run(kBin + " train --config " + dir_);
  EXPECT_EQ(dir.status, 2) << dir.output;
  EXPECT_NE(dir.output.find("is a directory"), std::string::npos) << dir.output;
  const Result zero = run(kBin + " train --config /dev/zero");
  EXPECT_EQ(zero.status, 2) << zero.output;
  EXPECT_NE(zero.output.find("larger than 16 MiB"), std::string::npos) << zero.output;
  const std::string two = write("two.yaml", "model:\n  d_model: 32\n---\ntraining:\n  steps: 1\n");
  const Result docs = run(kBin + " train --config " + two);
  EXPECT_EQ(docs.status, 2) << docs.output;
  EXPECT_NE(docs.output.find("two.yaml:3: a second YAML document"), std::string::npos)
      << docs.output;
}

TEST_F(Cli, BadNumbersOnTheCommandLineExitTwoNamingTheOption) {
  const std::string eval = kBin + " eval --checkpoint " + path("none.h5") + " --batches ";
  for (const char* bad : {"abc", "99999999999", "-3", "0", "2x", ""}) {
    const Result r = run(eval + "'" + bad + "'");
    EXPECT_EQ(r.status, 2) << bad << ": " << r.output;
    EXPECT_NE(r.output.find("--batches"), std::string::npos) << bad << ": " << r.output;
    EXPECT_EQ(r.output.find("stoi"), std::string::npos) << r.output;
  }
  const std::string bench = kBin + " bench --config " + kSrc + "/configs/tiny.yaml ";
  const Result steps = run(bench + "--steps x");
  EXPECT_EQ(steps.status, 2) << steps.output;
  EXPECT_NE(steps.output.find("--steps: 'x' is not a whole number"), std::string::npos)
      << steps.output;
  for (const char* bad : {"0", "-8", "9999999999999", "16,,32", "abc"}) {
    const Result r = run(bench + "--lengths " + bad);
    EXPECT_EQ(r.status, 2) << bad << ": " << r.output;
    EXPECT_NE(r.output.find("--lengths"), std::string::npos) << bad << ": " << r.output;
  }
  // Positive but not a length the model takes (tiny: bucket_size 8); refused
  // before any length runs.
  const Result unfit = run(bench + "--lengths 16,12");
  EXPECT_EQ(unfit.status, 2) << unfit.output;
  EXPECT_NE(unfit.output.find("bench length 12"), std::string::npos) << unfit.output;
  EXPECT_EQ(unfit.output.find("L=16"), std::string::npos) << unfit.output;
}

// The bench table's last column: the layout the step ran with, as fitted
// (on the CPU auto keeps and stashes nothing; set counts stay).
TEST_F(Cli, BenchPrintsTheLayoutItRan) {
  const std::string bench =
      kBin + " bench --config " + kSrc + "/configs/tiny.yaml --lengths 32 --steps 1";
  const Result dflt = run(bench);
  EXPECT_EQ(dflt.status, 0) << dflt.output;
  EXPECT_NE(dflt.output.find(
                "| kept (their attention; feed-forward; x1; LN rows), stashed layers, heads per "
                "pass |"),
            std::string::npos)
      << dflt.output;
  EXPECT_NE(dflt.output.find(" | 0 (state; both; x1; LN rows), 0, 2 |"), std::string::npos)
      << dflt.output;
  const Result set = run(bench + " --set model.kept_layers=1 --set model.stashed_layers=1" +
                         " --set model.attn_heads_per_pass=1 --set model.kept_ffn=pre_activation" +
                         " --set model.kept_x1=rebuilt --set model.kept_ln=rebuilt");
  EXPECT_EQ(set.status, 0) << set.output;
  EXPECT_NE(set.output.find(" | 1 (outputs; pre-activation; x1 rebuilt; LN rows rebuilt), 1, 1 |"),
            std::string::npos)
      << set.output;
}

TEST_F(Cli, PlanPrintsTheBuffersAndTheLongestLengthThatFits) {
  const std::string plan = kBin + " plan --config " + kSrc + "/configs/tiny.yaml ";
  const Result r = run(plan + "--memory 1GiB");
  EXPECT_EQ(r.status, 0) << r.output;
  for (const char* want : {"| x1 | [L, D] = [32, 32] |", "| lse |", "| adamw m |",
                           "peak of a training step (one rank): ",
                           "longest model.max_len that fits in 1.00 GiB: "})
    EXPECT_NE(r.output.find(want), std::string::npos) << want << "\n" << r.output;
  const std::smatch m = [&] {
    std::smatch x;
    std::regex_search(r.output, x, std::regex("fits in 1.00 GiB: (\\d+)"));
    return x;
  }();
  ASSERT_EQ(m.size(), 2u) << r.output;
  EXPECT_GT(std::stoll(m[1]), 32);
  EXPECT_EQ(std::stoll(m[1]) % 8, 0);  // a multiple of attention.bucket_size
  // Sequence parallel: one rank's share.
  const Result sp = run(plan + "--memory 1GiB --sp 2");
  EXPECT_EQ(sp.status, 0) << sp.output;
  EXPECT_NE(sp.output.find("| x1 | [L, D] = [16, 32] |"), std::string::npos) << sp.output;
  // Whole heads per rank: the exchange's sequence side and staging live in
  // operand buffers that hold nothing at the time, so none of their own.
  EXPECT_EQ(sp.output.find("| lqk |"), std::string::npos) << sp.output;
  EXPECT_EQ(sp.output.find("| exchange staging |"), std::string::npos) << sp.output;
  // Ranks sharing a GPU: each plans in its share, so 4 ranks of 4 GiB fit
  // what one rank of 1 GiB does.
  const Result shared = run(plan + "--memory 4GiB --ranks-per-gpu 4");
  EXPECT_EQ(shared.status, 0) << shared.output;
  EXPECT_NE(shared.output.find("4 ranks share the GPU's 4.00 GiB: each rank plans in 1.00 GiB"),
            std::string::npos)
      << shared.output;
  EXPECT_NE(shared.output.find("fits in 1.00 GiB: " + m[1].str() + "\n"), std::string::npos)
      << shared.output;
  // Bad arguments exit 2 naming the option; no GPU and no --memory too.
  for (const char* bad : {"--memory 12X", "--memory", "--memory -1G", "--sp 0", "--sp x",
                          "--ranks-per-gpu 0", "--ranks-per-gpu"}) {
    const Result b = run(plan + bad);
    EXPECT_EQ(b.status, 2) << bad << ": " << b.output;
    EXPECT_NE(b.output.find(std::string(bad).substr(0, 4)), std::string::npos) << b.output;
  }
  // 2 heads x 2 hash rounds: sp 4 attends (head, rounds) pairs, sp 8 is refused.
  const Result pairs = run(plan + "--memory 1GiB --sp 4");
  EXPECT_EQ(pairs.status, 0) << pairs.output;
  EXPECT_NE(pairs.output.find("| comb | [L, n_heads*dh] = [8, 32] |"), std::string::npos)
      << pairs.output;
  const Result heads = run(plan + "--memory 1GiB --sp 8");
  EXPECT_EQ(heads.status, 2) << heads.output;
  EXPECT_NE(heads.output.find("use sp in {1, 2, 4}"), std::string::npos) << heads.output;
  const Result none = run("CUDA_VISIBLE_DEVICES= " + plan);
  EXPECT_EQ(none.status, 2) << none.output;
  EXPECT_NE(none.output.find("--memory SIZE"), std::string::npos) << none.output;
}

TEST_F(Cli, ImpossibleDuplicationLengthIsAConfigError) {
  const Result r = run(tiny("--set model.max_len=2 --set attention.kinds=[full]"));
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("config error"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("model.max_len = 2"), std::string::npos) << r.output;
}

TEST_F(Cli, DataPathThatIsADirectoryIsADataError) {
  fs::create_directory(path("corpus"));
  const Result r = run(tiny("--set data.kind=bytes --set model.vocab_size=256 --set data.path=" +
                            path("corpus")));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("data error: data file '" + path("corpus") + "' is a directory"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("bad_alloc"), std::string::npos) << r.output;
}

// One corrupt byte in a link record (a fractal heap, no checksum of its own)
// used to crash libhdf5 in every command that opened the file.
TEST_F(Cli, DamagedLinkRecordIsRefusedByEveryCommandAndAutoResumeTakesTheOlderFile) {
  ASSERT_EQ(run(tiny("--set training.steps=2 --set checkpoint.every=1")).status, 0);
  const std::string ck = path("ckpt/ckpt-00000002.h5");
  std::string bytes = reformer::testing_ckpt::read_bytes(ck);
  const size_t at = bytes.find("\x0c" "embed.tokens");
  ASSERT_NE(at, std::string::npos);
  bytes[at + 20] = char(bytes[at + 20] ^ 0x30);
  reformer::testing_ckpt::write_bytes(ck, bytes);
  for (const std::string& cmd : {kBin + " inspect " + ck, kBin + " eval --checkpoint " + ck,
                                 tiny("--set training.steps=3 --resume " + ck)}) {
    const Result r = run(cmd);
    EXPECT_EQ(r.status, 1) << cmd << "\n" << r.output;
    EXPECT_NE(r.output.find("fails its whole-file checksum"), std::string::npos) << r.output;
  }
  const Result r = run(tiny("--set training.steps=3 --resume auto"));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("passed over " + ck + ": fails its whole-file checksum"),
            std::string::npos) << r.output;
  EXPECT_NE(r.output.find("resumed from " + path("ckpt/ckpt-00000001.h5")), std::string::npos)
      << r.output;
}

TEST_F(Cli, FullDiskExitsOneWithAMessageAndKeepsOlderCheckpoints) {
  fs::create_directories(path("t"));
  reformer::testing_ckpt::TmpfsMount tmpfs(path("t"), "600k");
  if (!tmpfs.ok()) GTEST_SKIP() << "cannot mount a tmpfs here (needs root)";
  const Result r = run(tiny("--set training.steps=6 --set checkpoint.every=1 "
                            "--set checkpoint.dir=" + path("t/ck")));
  EXPECT_EQ(r.status, 1) << r.output;  // was 139: a crash in HDF5's close path at exit
  EXPECT_NE(r.output.find("No space left on device"), std::string::npos) << r.output;
  EXPECT_EQ(reformer::find_resumable(path("t/ck"), nullptr), path("t/ck/ckpt-00000002.h5"));
}

TEST_F(Cli, SecondRunOnALockedCheckpointDirectoryExitsOne) {
  reformer::CheckpointDirLock lock(path("ckpt"));
  const Result r = run(tiny("--set training.steps=1"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("checkpoint directory " + path("ckpt") + " is in use by another run (pid " +
                          std::to_string(getpid()) + ")"),
            std::string::npos) << r.output;
}
