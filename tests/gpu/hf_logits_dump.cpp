// hf_logits_dump CHECKPOINT TOKENS OUT: the logits our CPU model (fp32, the
// reference path) gives for one sequence, for tests/gpu/hf_logits.py to
// compare with transformers'. TOKENS holds model.max_len int32 token ids
// (little-endian); OUT receives [max_len, vocab_size] float32 logits,
// row-major. The LSH rotations are keyed by the checkpoint's step.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "framework/generator.h"
#include "framework/model.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/errors.h"

int main(int argc, char** argv) {
  using namespace reformer;
  if (argc != 4) {
    std::fprintf(stderr, "usage: hf_logits_dump CHECKPOINT TOKENS OUT\n");
    return 2;
  }
  try {
    const GenerationModel g = read_generation_model(argv[1], {"training.device=cpu"});
    std::ifstream in(argv[2], std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const int64_t L = g.cfg.model.max_len;
    if (int64_t(bytes.size()) != 4 * L)
      throw DataError(std::string(argv[2]) + ": expected " + std::to_string(L) + " int32 tokens");
    std::vector<int32_t> tokens(static_cast<size_t>(L));
    std::memcpy(tokens.data(), bytes.data(), bytes.size());
    CpuOps<float> ops;
    ReformerModel<float> model(g.cfg, ops);
    ops.from_host(model.params(), g.params.data(), model.num_params());
    std::vector<float> logits;
    model.forward_logits(tokens.data(), uint64_t(g.step), &logits);
    std::ofstream out(argv[3], std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * 4));
    if (!out) throw DataError(std::string(argv[3]) + ": cannot write");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hf_logits_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}
