#include "framework/same_config.h"

#include <cstdint>
#include <sstream>
#include <vector>

#include "kernels/errors.h"

namespace reformer {

namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

// Rank `root`'s `text` on every rank.
std::string broadcast_text(Communicator& host, std::string text, int root) {
  uint64_t n = text.size();
  host.broadcast(&n, sizeof n, root);
  text.resize(size_t(n));
  if (n > 0) host.broadcast(text.data(), int64_t(n), root);
  return text;
}

// The value of dotted `key` ("model.d_model") in `yaml`, as to_yaml prints it.
std::string yaml_value(const std::string& yaml, const std::string& key) {
  const std::string section = key.substr(0, key.find('.')) + ":";
  const std::string field = "  " + key.substr(key.find('.') + 1) + ": ";
  std::istringstream in(yaml);
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line[0] != ' ') inside = line == section;
    else if (inside && line.rfind(field, 0) == 0) return line.substr(field.size());
  }
  return "?";
}

}  // namespace

std::string build_identity() {
  return std::string("reformer ") + REFORMER_VERSION + " built " + __DATE__ + " " + __TIME__;
}

void require_same_config(const Config& cfg, Communicator& world) {
  Communicator& host = world.host();
  if (host.size() == 1) return;
  const std::string build = build_identity();
  const std::string yaml = to_yaml(cfg);
  const uint64_t mine[2] = {fnv1a(build), config_digest(cfg)};
  std::vector<uint64_t> all(2 * size_t(host.size()));
  host.allgather(mine, all.data(), sizeof mine);
  int odd = 0;  // the first rank that differs from rank 0
  for (int r = host.size() - 1; r > 0; --r)
    if (all[2 * r] != all[0] || all[2 * r + 1] != all[1]) odd = r;
  if (odd == 0) return;
  // Every rank saw the same digests: all take part in the broadcasts and all
  // throw the same message, whichever of them ends the job first.
  const std::string build0 = broadcast_text(host, build, 0);
  const std::string yaml0 = broadcast_text(host, yaml, 0);
  const std::string build_odd = broadcast_text(host, build, odd);
  const std::string yaml_odd = broadcast_text(host, yaml, odd);
  const std::string rank = "rank " + std::to_string(odd);
  if (build_odd != build0)
    throw ConfigError("ranks run different builds: " + rank + " runs " + build_odd +
                      ", rank 0 runs " + build0 + " (start every rank from the same binary)");
  const std::string key = first_difference(parse_config(yaml_odd, rank + "'s configuration"),
                                           parse_config(yaml0, "rank 0's configuration"));
  if (key.empty())
    throw ConfigError("ranks run different configurations: " + rank + "'s differs from rank 0's");
  throw ConfigError("ranks run different configurations: " + rank + " has " + key + " = " +
                    yaml_value(yaml_odd, key) + ", rank 0 has " + yaml_value(yaml0, key));
}

}  // namespace reformer
