// reformer: the command-line program.
//
//   reformer train   [--config FILE] [--set key=value]... [--metrics PATH] [--resume auto|none|PATH]
//   reformer eval    --checkpoint PATH [--config FILE] [--set key=value]... [--split valid|test]
//   reformer inspect PATH
//   reformer bench   [--config FILE] [--set key=value]... [--lengths L1,L2,...] [--steps N]
//   reformer plan    [--config FILE] [--set key=value]... [--memory SIZE] [--sp N]
//                    [--ranks-per-gpu N]
//   reformer generate --checkpoint PATH (--prompt TEXT | --prompt-file F) --tokens N [...]
//   reformer plot    METRICS.jsonl... [-o FILE.svg] [--labels A,B,...]
//   reformer export  --checkpoint PATH --format hf --out DIR
//   reformer import  --from DIR --out PATH [--set key=value]...
//
// Exit status: 0 success; 2 bad command line or configuration; 1 any other
// failure (data, checkpoint, runtime). Only this file prints errors and exits.
#include <algorithm>
#include <csignal>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#if defined(REFORMER_HAVE_NCCL)
#include "distributed/nccl_communicator.h"
#endif
#if defined(REFORMER_HAVE_STAGED_MPI)
#include "distributed/mpi_staged_communicator.h"
#endif
#include "framework/checkpoint.h"
#include "framework/config.h"
#include "kernels/errors.h"
#include "framework/logging.h"
#include "framework/memory_plan.h"
#include "framework/plot.h"
#include "framework/device.h"
#include "framework/same_config.h"
#include "framework/trainer.h"
#include "generated/default_config.h"
#include "launch/bench.h"
#include "launch/cli.h"
#include "launch/generate.h"
#include "launch/interop_cmd.h"

using namespace reformer;

namespace {

const char* kMainHelp =
    "reformer: train Reformer language models on long sequences\n"
    "\n"
    "usage: reformer <command> [options]\n"
    "\n"
    "commands:\n"
    "  train     train a model (resumes from the newest checkpoint by default)\n"
    "  eval      evaluate a checkpoint on the validation or test split\n"
    "  inspect   describe and verify a checkpoint file\n"
    "  bench     time training steps at several sequence lengths\n"
    "  plan      print the memory plan of a configuration and the longest length that fits\n"
    "  generate  continue a prompt byte by byte from a checkpoint\n"
    "  plot      draw the curves of metrics files (one run, or several overlaid) as an SVG file\n"
    "  export    write a checkpoint as a HuggingFace transformers folder (--format hf)\n"
    "  import    read a HuggingFace transformers Reformer folder into a checkpoint\n"
    "\n"
    "Run 'reformer <command> --help' for the options of a command.\n";

const char* kTrainHelp =
    "usage: reformer train [--config FILE] [--set key=value]... [--metrics PATH]\n"
    "                      [--resume auto|none|PATH]\n"
    "\n"
    "  --config FILE     YAML recipe (see configs/); without it, the built-in default:\n"
    "                    the duplication task sized for a CPU (configs/duplication-cpu.yaml)\n"
    "  --set key=value   override one key, e.g. --set training.steps=500 (repeatable)\n"
    "  --metrics PATH    write one JSON object per logged step and evaluation to PATH\n"
    "                    (default: logging.metrics; appended to when resuming)\n"
    "  --resume SPEC     auto: newest valid checkpoint in checkpoint.dir (default);\n"
    "                    none: start fresh; PATH: exactly that checkpoint\n"
    "\n"
    "Ctrl-C (SIGINT), SIGTERM or SIGHUP finishes the current step, writes a checkpoint and exits 0;\n"
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

const char* kBenchHelp =
    "usage: reformer bench [--config FILE] [--set key=value]... [--lengths L1,L2,...]\n"
    "                      [--steps N] [--breakdown]\n"
    "\n"
    "Times N training steps (forward, backward, optimizer; batch 1, random bytes) after\n"
    "one warm-up step, for each sequence length (default: the config's model.max_len),\n"
    "and prints a table of ms/step, tokens/s and peak memory. --breakdown also times every\n"
    "op of the real step and prints, per length, a table of op, calls, ms and % of step.\n";

const char* kPlanHelp =
    "usage: reformer plan [--config FILE] [--set key=value]... [--memory SIZE] [--sp N]\n"
    "                     [--ranks-per-gpu N]\n"
    "\n"
    "Prints, without running anything, the buffers one rank holds for a training step at\n"
    "the config's model.max_len (fp32) and their total, and the longest max_len whose step\n"
    "fits in SIZE (e.g. 141GiB, 80G; default: the memory of the visible GPU, required where\n"
    "there is none). --sp N plans one rank of N sequence-parallel ranks (default parallel.sp).\n"
    "--ranks-per-gpu N plans each rank in SIZE / N, for N ranks sharing one GPU\n"
    "(parallel.backend mpi with training.device cuda; default 1).\n";

const char* kPlotHelp =
    "usage: reformer plot METRICS.jsonl [-o FILE.svg]\n"
    "       reformer plot A.jsonl B.jsonl... -o FILE.svg [--labels a,b,...]\n"
    "\n"
    "Draws the metrics file of 'reformer train --metrics' as one SVG file (default: METRICS.svg):\n"
    "train and eval bpc (or loss) against steps, against tokens seen and against wall-clock\n"
    "minutes (where the lines carry elapsed_s), and tokens/s. Several files are overlaid, one\n"
    "colour per run, and need -o; --labels names the runs in the legends, one label per file\n"
    "in order (default: each file's name without .jsonl).\n";

struct Args {
  std::string config, metrics, resume, checkpoint, split = "valid", positional;
  std::vector<int64_t> lengths;  // bench; empty: the config's model.max_len
  int steps = 3;
  std::vector<std::string> sets;
  int batches = 0;  // eval; 0: the config's training.eval_batches
  bool help = false;
  bool breakdown = false;
  std::string memory;  // plan: --memory SIZE
  std::string output;  // plot: -o FILE.svg
  std::vector<std::string> files;   // plot: the metrics files
  std::optional<std::string> labels;  // plot: --labels a,b,...
  int sp = 0;          // plan: --sp N; 0: the config's parallel.sp
  int sharers = 1;     // plan: --ranks-per-gpu N
};


// "L1,L2,...": sequence lengths, each in [1, kMaxLength].
std::vector<int64_t> lengths_list(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');)
    out.push_back(parse_number<int64_t>("--lengths", item, 1, kMaxLength));
  if (out.empty()) throw UsageError("--lengths: expected L1,L2,..., got '" + text + "'");
  return out;
}

Args parse_args(const std::string& cmd, int argc, char** argv) {
  Args a;
  auto value = [&](int& i, const char* flag) { return option_value(argc, argv, i, flag); };
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--help" || s == "-h") a.help = true;
    else if (s == "--config") a.config = value(i, "--config");
    else if (s == "--set") a.sets.push_back(value(i, "--set"));
    else if (s == "--metrics" && cmd == "train") a.metrics = value(i, "--metrics");
    else if (s == "--resume" && cmd == "train") a.resume = value(i, "--resume");
    else if (s == "--checkpoint" && cmd == "eval") a.checkpoint = value(i, "--checkpoint");
    else if (s == "--split" && cmd == "eval") a.split = value(i, "--split");
    else if (s == "--batches" && cmd == "eval")
      a.batches = int(parse_number<int64_t>("--batches", value(i, "--batches"), 1, 1000000));
    else if (s == "--lengths" && cmd == "bench") a.lengths = lengths_list(value(i, "--lengths"));
    else if (s == "--steps" && cmd == "bench")
      a.steps = int(parse_number<int64_t>("--steps", value(i, "--steps"), 1, 1000000));
    else if (s == "--breakdown" && cmd == "bench") a.breakdown = true;
    else if ((s == "-o" || s == "--output") && cmd == "plot") a.output = value(i, "-o");
    else if (s == "--labels" && cmd == "plot") a.labels = value(i, "--labels");
    else if (s.rfind("--", 0) != 0 && cmd == "plot") a.files.push_back(s);
    else if (s == "--memory" && cmd == "plan") a.memory = value(i, "--memory");
    else if (s == "--sp" && cmd == "plan")
      a.sp = int(parse_number<int64_t>("--sp", value(i, "--sp"), 1, 1 << 20));
    else if (s == "--ranks-per-gpu" && cmd == "plan")
      a.sharers = int(parse_number<int64_t>("--ranks-per-gpu", value(i, "--ranks-per-gpu"), 1,
                                            1 << 16));
    else if (s.rfind("--", 0) != 0 && a.positional.empty()) a.positional = s;
    else throw UsageError("unknown argument '" + s + "' for 'reformer " + cmd + "'");
  }
  return a;
}

Config load(const Args& a) {
  if (!a.config.empty()) return load_config(a.config, a.sets);
  return parse_config(kDefaultConfigYaml, "<built-in default>", a.sets);
}

// The first stop signal asks for a checkpoint at the end of the step. A
// second one ends the process at once, unless it comes within a second of the
// first: `timeout`, Slurm and mpirun deliver one request to the process and
// again to its process group, and that echo must not cost the checkpoint.
double monotonic_seconds() {  // async-signal-safe
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
volatile std::sig_atomic_t g_signals = 0;
double g_first_signal_s = 0;

void on_signal(int sig) {
  if (g_signals == 0) {
    g_signals = 1;
    g_first_signal_s = monotonic_seconds();
    request_stop();
    return;
  }
  if (monotonic_seconds() - g_first_signal_s < 1.0) return;
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// The backend named by the (validated) configuration.
CommOptions comm_options(const Config& cfg) {
  CommOptions o;
  o.timeout_s = cfg.parallel.timeout_s;
  return o;
}

// The number of processes the MPI launcher started, read from the environment
// it gives each one: OMPI_COMM_WORLD_SIZE (Open MPI) or PMI_SIZE (MPICH,
// Intel MPI); 1 when neither is set.
int launched_processes() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
    if (const char* v = std::getenv(name)) return std::max(1, std::atoi(v));
  return 1;
}

// parallel.backend local under mpirun -np N > 1 would train N independent
// models racing on one checkpoint directory: refused with a ConfigError.
void refuse_local_under_mpirun(const Config& cfg) {
  const int n = launched_processes();
  if (cfg.parallel.backend == CommBackend::local && n > 1)
    throw ConfigError("parallel.backend is local but mpirun started " + std::to_string(n) +
                      " processes: use parallel.backend: mpi (CPU) or nccl (GPU)");
}

// Starts the job's communicator into `comm`: every rank of a GPU job first
// says which GPU it took; the log is rank 0's (and, with logging.per_rank,
// every rank's own file rank-R.log beside the checkpoints); every rank checks
// that it runs rank 0's build and configuration; dp: auto is filled in from
// the number of processes.
void start_communicator(Config& cfg, std::unique_ptr<Communicator>& comm) {
  refuse_local_under_mpirun(cfg);
  const bool gpu = cfg.training.device == DeviceKind::cuda ||
                   (cfg.training.device == DeviceKind::auto_ && cuda_available());
  comm = make_communicator(cfg.parallel.backend, comm_options(cfg), gpu);
#if defined(REFORMER_HAVE_NCCL)
  if (const auto* nccl = dynamic_cast<const NcclCommunicator*>(comm.get()))
    std::printf("reformer: %s\n", nccl->description().c_str());
#endif
#if defined(REFORMER_HAVE_STAGED_MPI)
  if (const auto* staged = dynamic_cast<const StagedMpiCommunicator*>(comm.get()))
    std::printf("reformer: %s\n", staged->description().c_str());
#endif
  std::fflush(stdout);
  set_log_rank(comm->rank());
  if (cfg.logging.per_rank) {
    std::filesystem::create_directories(cfg.checkpoint.dir);
    set_rank_log_file(cfg.checkpoint.dir + "/rank-" + std::to_string(comm->rank()) + ".log");
  }
  require_same_config(cfg, *comm);
  resolve_world_size(cfg, comm->size());
}

// The communicator of the run lives in main() (cmd_* create it into `comm`),
// so that main's error handling can end every rank of a multi-process job.
int cmd_train(const Args& a, std::unique_ptr<Communicator>& comm) {
  std::vector<std::string> sets = a.sets;
  if (!a.resume.empty()) sets.push_back("checkpoint.resume=" + a.resume);
  Args b = a;
  b.sets = sets;
  Config cfg = load(b);
  start_communicator(cfg, comm);
  log_info("config (resolved):\n" + to_yaml(cfg));
  Trainer trainer(cfg, *comm, a.metrics.empty() ? cfg.logging.metrics : a.metrics);
  trainer.resume();
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGHUP, on_signal);
  const TrainResult r = trainer.train();
  if (r.interrupted) log_info("stopped at step " + std::to_string(r.step) + "; run the same command to resume");
  return 0;
}

int cmd_eval(const Args& a, std::unique_ptr<Communicator>& comm) {
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
  start_communicator(cfg, comm);
  Trainer trainer(cfg, *comm, "");
  trainer.load(a.checkpoint, /*full*/ false);
  const int batches = a.batches > 0 ? a.batches : cfg.training.eval_batches;
  const EvalResult e = trainer.evaluate(a.split == "test" ? Split::test : Split::valid, batches);
  std::string line = strfmt("eval %s | %s | tokens %lld | loss %.9g | bpc %.4f", a.split.c_str(),
                            a.checkpoint.c_str(), (long long)e.tokens, e.loss, e.bpc);
  if (cfg.data.kind == DataKind::duplication) line += strfmt(" | accuracy %.4f", e.accuracy);
  log_info(line);
  return 0;
}

// Under mpirun (parallel.backend mpi or nccl) every rank runs the layout's
// training step and rank 0 prints the multi-rank table.
int cmd_bench_parallel(const Args& a, Config cfg, std::unique_ptr<Communicator>& comm) {
  start_communicator(cfg, comm);
  cfg.checkpoint.resume = "none";
  if (!a.lengths.empty()) {
    if (a.lengths.size() > 1) throw UsageError("under mpirun, bench takes one --lengths value");
    cfg.model.max_len = int(a.lengths[0]);
    cfg.model.axial_shape.clear();  // re-derived for this length
    cfg.attention.n_buckets = 0;
    validate_config(cfg, a.config + " (bench length " + std::to_string(a.lengths[0]) + ")");
  }
  const ParallelBenchRow row = run_parallel_bench(cfg, *comm, a.steps, a.breakdown);
  if (comm->rank() == 0) {
    std::fputs(format_parallel_bench(row, comm->size()).c_str(), stdout);
    if (a.breakdown) std::fputs(("\n" + format_parallel_breakdown(row)).c_str(), stdout);
  }
  return 0;
}

int cmd_bench(const Args& a, std::unique_ptr<Communicator>& comm) {
  const Config cfg = load(a);
  if (cfg.parallel.backend != CommBackend::local) return cmd_bench_parallel(a, cfg, comm);
  refuse_local_under_mpirun(cfg);
  std::vector<int64_t> lengths = a.lengths;
  if (lengths.empty()) lengths.push_back(cfg.model.max_len);
  const auto rows = run_bench(cfg, lengths, a.steps,
                              a.config.empty() ? "<built-in default>" : a.config, a.breakdown);
  std::fputs(format_bench(rows).c_str(), stdout);
  if (a.breakdown)
    for (const BenchRow& r : rows) std::fputs(("\n" + format_breakdown(r)).c_str(), stdout);
  return 0;
}

int cmd_plan(const Args& a) {
  const Config cfg = load(a);
  const int sp = a.sp > 0 ? a.sp : cfg.parallel.sp;
  int64_t budget = device_memory_bytes();
  if (!a.memory.empty()) {
    try {
      budget = parse_bytes(a.memory, "--memory");
    } catch (const ConfigError& e) {
      throw UsageError(e.what());
    }
  }
  if (budget <= 0) throw UsageError("reformer plan needs --memory SIZE where no GPU is visible");
  const int64_t gpu = budget;
  budget /= a.sharers;  // ranks sharing the GPU split its memory, as the trainer's do
  if (a.sharers > 1)
    std::printf("%d ranks share the GPU's %s: each rank plans in %s\n\n", a.sharers,
                format_bytes(gpu).c_str(), format_bytes(budget).c_str());
  Config fitted = cfg;  // planned for a device (memory_plan.h, kept_ffn_cols)
  if (fitted.training.device == DeviceKind::auto_) fitted.training.device = DeviceKind::cuda;
  fitted = fit_to_device(fitted, sp, budget);
  const MemoryPlan plan = plan_memory(fitted, sp);
  std::printf("memory plan at model.max_len %lld, one rank of sp %d, fp32, %d of %d layers kept"
              " (model.kept_layers%s) with their attention %s (model.kept_attention%s),"
              " feed-forward %s (model.kept_ffn%s), x1 %s (model.kept_x1%s) and LayerNorm rows"
              " %s (model.kept_ln%s), %d stashed (model.stashed_layers%s), %d heads per"
              " pass:\n\n%s",
              (long long)cfg.model.max_len, sp, kept_layer_count(fitted), cfg.model.n_layers,
              cfg.model.kept_layers == kKeptLayersAuto ? ": auto" : "",
              kept_attention_text(fitted, sp),
              cfg.model.kept_attention == KeptAttention::auto_ ? ": auto" : "",
              kept_ffn_text(fitted), cfg.model.kept_ffn == KeptFfn::auto_ ? ": auto" : "",
              keeps_x1(fitted) ? "kept" : "rebuilt",
              cfg.model.kept_x1 == KeptPart::auto_ ? ": auto" : "",
              keeps_ln(fitted) ? "kept" : "rebuilt",
              cfg.model.kept_ln == KeptPart::auto_ ? ": auto" : "",
              stashed_layer_count(fitted, sp),
              cfg.model.stashed_layers == kStashedLayersAuto ? ": auto" : "",
              attention_heads_per_pass(fitted, sp), format_plan(plan).c_str());
  const int64_t fits = longest_length_that_fits(cfg, sp, budget);
  std::printf("longest model.max_len that fits in %s: %s\n", format_bytes(budget).c_str(),
              fits > 0 ? std::to_string(fits).c_str() : "none (the model alone does not fit)");
  return 0;
}

int cmd_plot(const Args& a) {
  if (a.files.empty()) throw UsageError("reformer plot needs a metrics file METRICS.jsonl");
  if (a.files.size() > 1 && a.output.empty())
    throw UsageError("reformer plot of several metrics files needs -o FILE.svg");
  std::vector<std::string> labels;
  if (a.labels) {
    std::stringstream ss(*a.labels);
    for (std::string label; std::getline(ss, label, ',');) labels.push_back(label);
    if (!a.labels->empty() && a.labels->back() == ',') labels.emplace_back();
    if (labels.size() != a.files.size())
      throw UsageError("--labels: " + std::to_string(labels.size()) + " labels for " +
                       std::to_string(a.files.size()) + " metrics files");
    if (std::find(labels.begin(), labels.end(), "") != labels.end())
      throw UsageError("--labels: a label is empty in '" + *a.labels + "'");
  }
  const std::string out = a.output.empty() ? plot_path_for(a.files[0]) : a.output;
  write_plot(a.files, labels, out);
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

int cmd_inspect(const Args& a) {
  if (a.positional.empty()) throw UsageError("reformer inspect needs a checkpoint PATH");
  return inspect_checkpoint(a.positional, std::cout) ? 0 : 1;
}

// Reports an error that reached main and returns `status`. In a job of more
// than one rank the message names the rank and the whole job is ended
// (MPI_Abort): returning would leave the other ranks waiting in a collective
// (and this one in MPI_Finalize).
int fail(const std::unique_ptr<Communicator>& comm, int status, const char* kind, const char* what) {
  const bool many = comm && comm->size() > 1;
  const std::string rank = many ? "[rank " + std::to_string(comm->rank()) + "] " : "";
  std::fprintf(stderr, "reformer: %s%s%s\n", rank.c_str(), kind, what);
  std::fflush(stderr);
  if (many) comm->abort(status);
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd.empty() || cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kMainHelp, cmd.empty() ? stderr : stdout);
    return cmd.empty() ? 2 : 0;
  }
  std::unique_ptr<Communicator> comm;
  try {
    if (cmd == "generate") return cmd_generate(argc, argv);
    if (cmd == "export") return cmd_export(argc, argv);
    if (cmd == "import") return cmd_import(argc, argv);
    if (cmd != "train" && cmd != "eval" && cmd != "inspect" && cmd != "bench" &&
        cmd != "plan" && cmd != "plot")
      throw UsageError("unknown command '" + cmd + "' (try 'reformer --help')");
    const Args a = parse_args(cmd, argc, argv);
    if (a.help) {
      std::fputs(cmd == "train"  ? kTrainHelp
                 : cmd == "eval" ? kEvalHelp
                 : cmd == "bench" ? kBenchHelp
                 : cmd == "plan"  ? kPlanHelp
                 : cmd == "plot"  ? kPlotHelp
                                 : kInspectHelp,
                 stdout);
      return 0;
    }
    if (cmd == "train") return cmd_train(a, comm);
    if (cmd == "eval") return cmd_eval(a, comm);
    if (cmd == "bench") return cmd_bench(a, comm);
    if (cmd == "plan") return cmd_plan(a);
    if (cmd == "plot") return cmd_plot(a);
    return cmd_inspect(a);
  } catch (const UsageError& e) {
    return fail(comm, 2, "", e.what());
  } catch (const ConfigError& e) {
    return fail(comm, 2, "config error: ", e.what());
  } catch (const CheckpointError& e) {
    return fail(comm, 1, "checkpoint refused: ", e.what());
  } catch (const DataError& e) {
    return fail(comm, 1, "data error: ", e.what());
  } catch (const std::exception& e) {
    return fail(comm, 1, "error: ", e.what());
  }
}
