#include "launch/interop_cmd.h"

#include <cstdio>
#include <string>
#include <vector>

#include "framework/hf_interop.h"

namespace reformer {

namespace {

const char* kExportHelp =
    "usage: reformer export --checkpoint PATH --format hf --out DIR\n"
    "\n"
    "Writes DIR/config.json and DIR/model.safetensors (fp32), a folder that\n"
    "transformers' ReformerModelWithLMHead.from_pretrained(DIR) loads. Models with\n"
    "full or local layers over more than one chunk are refused: HF has no such\n"
    "attention. The head bias is folded into the final LayerNorm's bias and\n"
    "lm_head.bias written as zeros, so transformers versions that add no head bias\n"
    "(5.x) give the same logits; where it cannot be folded (vocab_size > 2 d_model)\n"
    "it stays in lm_head.bias, with a note (docs/hf-interop.md).\n";

const char* kImportHelp =
    "usage: reformer import --from DIR --out PATH [--set key=value]...\n"
    "\n"
    "Reads a transformers Reformer folder (DIR/config.json, DIR/model.safetensors in\n"
    "F32, F16 or BF16) and writes a checkpoint at PATH: step 0, a fresh optimizer\n"
    "state. --set overrides keys of the resulting configuration (training.*, data.*,\n"
    "optimizer.*, ...); `reformer train --resume PATH` then continues from it.\n";

struct InteropArgs {
  std::string checkpoint, format, out, from;
  std::vector<std::string> sets;
  bool help = false;
};

InteropArgs parse(const std::string& cmd, int argc, char** argv) {
  InteropArgs a;
  auto value = [&](int& i, const char* flag) { return option_value(argc, argv, i, flag); };
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--help" || s == "-h") a.help = true;
    else if (s == "--out") a.out = value(i, "--out");
    else if (s == "--checkpoint" && cmd == "export") a.checkpoint = value(i, "--checkpoint");
    else if (s == "--format" && cmd == "export") a.format = value(i, "--format");
    else if (s == "--from" && cmd == "import") a.from = value(i, "--from");
    else if (s == "--set" && cmd == "import") a.sets.push_back(value(i, "--set"));
    else throw UsageError("unknown argument '" + s + "' for 'reformer " + cmd + "'");
  }
  return a;
}

}  // namespace

int cmd_export(int argc, char** argv) {
  const InteropArgs a = parse("export", argc, argv);
  if (a.help) return std::fputs(kExportHelp, stdout), 0;
  if (a.checkpoint.empty()) throw UsageError("reformer export needs --checkpoint PATH");
  if (a.out.empty()) throw UsageError("reformer export needs --out DIR");
  if (a.format != "hf")
    throw UsageError("reformer export needs --format hf (the one format it writes)" +
                            (a.format.empty() ? std::string() : ", not '" + a.format + "'"));
  export_hf(a.checkpoint, a.out);
  std::printf("reformer: exported %s to %s/config.json and %s/model.safetensors\n",
              a.checkpoint.c_str(), a.out.c_str(), a.out.c_str());
  return 0;
}

int cmd_import(int argc, char** argv) {
  const InteropArgs a = parse("import", argc, argv);
  if (a.help) return std::fputs(kImportHelp, stdout), 0;
  if (a.from.empty()) throw UsageError("reformer import needs --from DIR");
  if (a.out.empty()) throw UsageError("reformer import needs --out PATH");
  import_hf(a.from, a.out, a.sets);
  std::printf("reformer: imported %s into %s (step 0)\n", a.from.c_str(), a.out.c_str());
  return 0;
}

}  // namespace reformer
