// reformer: the command-line program.
//
//   reformer train   [--config FILE] [--set key=value]... [--metrics PATH] [--resume auto|none|PATH]
//   reformer eval    --checkpoint PATH [--config FILE] [--set key=value]... [--split valid|test]
//   reformer inspect PATH
//
// Exit status: 0 success; 2 bad command line or configuration; 1 any other
// failure (data, checkpoint, runtime). Only this file prints errors and exits.
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/errors.h"
#include "framework/logging.h"
#include "framework/trainer.h"
#include "generated/default_config.h"

using namespace reformer;

namespace {

struct UsageError : Error {
  using Error::Error;
};

const char* kMainHelp =
    "reformer: train Reformer language models on long sequences\n"
    "\n"
    "usage: reformer <command> [options]\n"
    "\n"
    "commands:\n"
    "  train     train a model (resumes from the newest checkpoint by default)\n"
    "  eval      evaluate a checkpoint on the validation or test split\n"
    "  inspect   describe and verify a checkpoint file\n"
    "\n"
    "Run 'reformer <command> --help' for the options of a command.\n";

const char* kTrainHelp =
    "usage: reformer train [--config FILE] [--set key=value]... [--metrics PATH]\n"
    "                      [--resume auto|none|PATH]\n"
    "\n"
    "  --config FILE     YAML recipe (see configs/); without it, the built-in default:\n"
    "                    the duplication task sized for a CPU (configs/duplication-cpu.yaml)\n"
    "  --set key=value   override one key, e.g. --set training.steps=500 (repeatable)\n"
    "  --metrics PATH    append one JSON object per logged step and evaluation to PATH\n"
    "  --resume SPEC     auto: newest valid checkpoint in checkpoint.dir (default);\n"
    "                    none: start fresh; PATH: exactly that checkpoint\n"
    "\n"
    "Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits 0;\n"
    "the same command then resumes where it stopped.\n";

const char* kEvalHelp =
    "usage: reformer eval --checkpoint PATH [--config FILE] [--set key=value]...\n"
    "                     [--split valid|test] [--batches N]\n"
    "\n"
    "Loads the checkpoint's parameters and reports loss, bits per character and, for the\n"
    "duplication task, accuracy on the second copy. Without --config the configuration\n"
    "stored in the checkpoint is used.\n";

const char* kInspectHelp =
    "usage: reformer inspect PATH\n"
    "\n"
    "Prints the checkpoint's format version, step, tokens, configuration summary,\n"
    "parameter count and its datasets with their checksum status. Exits 1 if the file\n"
    "is not a valid checkpoint.\n";

struct Args {
  std::string config, metrics, resume, checkpoint, split = "valid", positional;
  std::vector<std::string> sets;
  int batches = 0;
  bool help = false;
};

Args parse_args(const std::string& cmd, int argc, char** argv) {
  Args a;
  auto value = [&](int& i, const char* flag) -> std::string {
    if (i + 1 >= argc) throw UsageError(std::string(flag) + " needs a value");
    return argv[++i];
  };
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--help" || s == "-h") a.help = true;
    else if (s == "--config") a.config = value(i, "--config");
    else if (s == "--set") a.sets.push_back(value(i, "--set"));
    else if (s == "--metrics" && cmd == "train") a.metrics = value(i, "--metrics");
    else if (s == "--resume" && cmd == "train") a.resume = value(i, "--resume");
    else if (s == "--checkpoint" && cmd == "eval") a.checkpoint = value(i, "--checkpoint");
    else if (s == "--split" && cmd == "eval") a.split = value(i, "--split");
    else if (s == "--batches" && cmd == "eval") a.batches = std::stoi(value(i, "--batches"));
    else if (s.rfind("--", 0) != 0 && a.positional.empty()) a.positional = s;
    else throw UsageError("unknown argument '" + s + "' for 'reformer " + cmd + "'");
  }
  return a;
}

Config load(const Args& a) {
  if (!a.config.empty()) return load_config(a.config, a.sets);
  return parse_config(kDefaultConfigYaml, "<built-in default>", a.sets);
}

void on_signal(int sig) {
  request_stop();
  std::signal(sig, SIG_DFL);  // a second signal ends the process at once
}

int cmd_train(const Args& a) {
  std::vector<std::string> sets = a.sets;
  if (!a.resume.empty()) sets.push_back("checkpoint.resume=" + a.resume);
  Args b = a;
  b.sets = sets;
  const Config cfg = load(b);
  auto comm = make_communicator(cfg.parallel.backend);
  set_log_rank(comm->rank());
  log_info("config (resolved):\n" + to_yaml(cfg));
  Trainer trainer(cfg, *comm, a.metrics);
  trainer.resume();
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  const TrainResult r = trainer.train();
  if (r.interrupted) log_info("stopped at step " + std::to_string(r.step) + "; run the same command to resume");
  return 0;
}

int cmd_eval(const Args& a) {
  if (a.checkpoint.empty()) throw UsageError("reformer eval needs --checkpoint PATH");
  Config cfg;
  if (!a.config.empty()) {
    cfg = load_config(a.config, a.sets);
  } else {
    const CheckpointState st = read_checkpoint(a.checkpoint);
    cfg = parse_config(st.config_text, a.checkpoint + " (stored config)", a.sets);
  }
  if (a.split != "valid" && a.split != "test")
    throw UsageError("--split must be valid or test, not '" + a.split + "'");
  auto comm = make_communicator(cfg.parallel.backend);
  set_log_rank(comm->rank());
  Trainer trainer(cfg, *comm, "");
  trainer.load(a.checkpoint, /*full*/ false);
  const int batches = a.batches > 0 ? a.batches : cfg.training.eval_batches;
  const EvalResult e = trainer.evaluate(a.split == "test" ? Split::test : Split::valid, batches);
  std::string line = strfmt("eval %s | %s | tokens %lld | loss %.9g | bpc %.4f", a.split.c_str(),
                            a.checkpoint.c_str(), (long long)e.tokens, e.loss, e.bpc);
  if (cfg.data.kind == "duplication") line += strfmt(" | accuracy %.4f", e.accuracy);
  log_info(line);
  return 0;
}

int cmd_inspect(const Args& a) {
  if (a.positional.empty()) throw UsageError("reformer inspect needs a checkpoint PATH");
  return inspect_checkpoint(a.positional, std::cout) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd.empty() || cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kMainHelp, cmd.empty() ? stderr : stdout);
    return cmd.empty() ? 2 : 0;
  }
  try {
    if (cmd != "train" && cmd != "eval" && cmd != "inspect")
      throw UsageError("unknown command '" + cmd + "' (try 'reformer --help')");
    const Args a = parse_args(cmd, argc, argv);
    if (a.help) {
      std::fputs(cmd == "train" ? kTrainHelp : cmd == "eval" ? kEvalHelp : kInspectHelp, stdout);
      return 0;
    }
    if (cmd == "train") return cmd_train(a);
    if (cmd == "eval") return cmd_eval(a);
    return cmd_inspect(a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "reformer: %s\n", e.what());
    return 2;
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "reformer: config error: %s\n", e.what());
    return 2;
  } catch (const CheckpointError& e) {
    std::fprintf(stderr, "reformer: checkpoint refused: %s\n", e.what());
    return 1;
  } catch (const DataError& e) {
    std::fprintf(stderr, "reformer: data error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "reformer: error: %s\n", e.what());
    return 1;
  }
}
