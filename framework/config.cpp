// Configuration documents: YAML files and `--set` overrides applied through
// the key table (config_table.cpp), then cross-field checks and derived
// defaults in validate().
#include "framework/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "framework/config_table.h"
#include "kernels/common/lsh_checks.h"
#include "kernels/errors.h"

namespace reformer {

using namespace config_detail;

namespace {

// ---------------------------------------------------------------- messages

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " (did you mean 'x'?)" for the nearest candidate within edit distance 2,
// else "".
std::string suggestion(const std::string& wrong, const std::vector<std::string>& candidates) {
  const std::string* best = nullptr;
  size_t best_d = 3;
  for (const std::string& c : candidates) {
    size_t d = edit_distance(wrong, c);
    if (d < best_d) best_d = d, best = &c;
  }
  return best ? " (did you mean '" + *best + "'?)" : "";
}

std::string unknown_key_message(const std::string& dotted) {
  std::vector<std::string> names;
  for (const Key& k : keys()) names.push_back(k.name);
  std::string hint = suggestion(dotted, names);
  if (hint.empty()) {  // the right member under another section?
    std::string member = dotted.substr(dotted.find('.') + 1);
    for (const Key& k : keys())
      if (k.name.substr(k.name.find('.') + 1) == member) {
        hint = " (did you mean '" + k.name + "'?)";
        break;
      }
  }
  return "unknown key '" + dotted + "'" + hint;
}

// ---------------------------------------------------------------- documents and overrides

// Where each key's final value was set: "file:line" or "--set ...".
using Origins = std::map<std::string, Where>;

// The line of the `---` that starts the second document of `text`, whose
// first document's content starts at `first` (0: it has none); 0 if unknown.
int second_document_line(const std::string& text, int first) {
  int line = 0, markers = 0;
  for (size_t at = 0; at < text.size(); at = text.find('\n', at) + 1) {
    ++line;
    const bool marker = text.compare(at, 3, "---") == 0 &&
                        (at + 3 == text.size() || std::isspace((unsigned char)text[at + 3]));
    if (marker && (first > 0 ? line > first : ++markers == 2)) return line;
    if (text.find('\n', at) == std::string::npos) break;
  }
  return 0;
}

// The one YAML document of `text`. A second document is refused rather than
// ignored: keys written there would silently not apply.
YAML::Node load_yaml(const std::string& text, const std::string& source) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    fail({source, e.mark.is_null() ? 0 : e.mark.line + 1}, "YAML syntax error: " + e.msg);
  }
  if (docs.size() > 1) {
    int line = second_document_line(text, docs[0].IsNull() ? 0 : line_of(docs[0], 0));
    fail({source, line > 0 ? line : line_of(docs[1], 0)},
         "a second YAML document starts here; a configuration is one document "
         "(remove the '---' line and what follows, or merge it into the first)");
  }
  return docs.empty() ? YAML::Node() : docs[0];
}

void apply_document(Config& c, const YAML::Node& root, const std::string& source,
                    Origins& origins) {
  if (root.IsNull()) return;  // empty file: all defaults
  if (!root.IsMap())
    fail({source, line_of(root, 1)},
         "the top level must be a map of sections (" + join(sections(), ", ") + "), got " +
             describe(root));
  std::map<std::string, int> seen;  // dotted key or section -> line
  for (const auto& sec : root) {  // each element holds its key and value nodes
    const YAML::Node& sname = sec.first;
    Where at{source, line_of(sname, 0)};
    if (!sname.IsScalar()) fail(at, "section names must be plain words, got " + describe(sname));
    const std::string& section = sname.Scalar();
    if (std::find(sections().begin(), sections().end(), section) == sections().end())
      fail(at, "unknown section '" + section + "'" + suggestion(section, sections()) +
                   "; sections are " + join(sections(), ", "));
    if (seen.count(section))
      fail(at, "section '" + section + "' appears twice (first at line " +
                   std::to_string(seen[section]) + ")");
    seen[section] = at.line;
    const YAML::Node& body = sec.second;
    if (body.IsNull()) continue;
    if (!body.IsMap()) fail(at, section + ": expected a map of keys, got " + describe(body));
    for (const auto& kv : body) {
      const YAML::Node& kname = kv.first;
      Where key_at{source, line_of(kname, at.line)};
      if (!kname.IsScalar()) fail(key_at, section + ": keys must be plain words, got " + describe(kname));
      std::string dotted = section + "." + kname.Scalar();
      const Key* key = find_key(dotted);
      if (!key) fail(key_at, unknown_key_message(dotted));
      if (seen.count(dotted))
        fail(key_at, dotted + " appears twice (first at line " + std::to_string(seen[dotted]) + ")");
      seen[dotted] = key_at.line;
      read_value(c, *key, kv.second, key_at);
      origins[dotted] = key_at;
    }
  }
}

void apply_override(Config& c, const std::string& text, Origins& origins) {
  Where at{"--set " + text, 0};
  size_t eq = text.find('=');
  if (eq == std::string::npos) fail(at, "expected KEY=VALUE, e.g. model.d_model=256");
  auto trim = [](std::string s) {
    const char* ws = " \t";
    s.erase(0, s.find_first_not_of(ws));
    s.erase(s.find_last_not_of(ws) + 1);
    return s;
  };
  std::string dotted = trim(text.substr(0, eq));
  std::string value = text.substr(eq + 1);
  const Key* key = find_key(dotted);
  if (!key) fail(at, unknown_key_message(dotted));
  YAML::Node n;
  try {
    n = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    fail(at, dotted + ": cannot read '" + value + "' as a YAML value: " + e.msg);
  }
  read_value(c, *key, n, at);
  origins[dotted] = at;
}

// ---------------------------------------------------------------- cross-field validation

int64_t pow2_at_least(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// Checks the configuration as a whole and fills derived defaults. Messages
// start with the file and, where the first key named came from it, the line.
void validate(Config& c, const std::string& source, const Origins& origins) {
  auto fail_at = [&](const std::string& first_key, const std::string& message) {
    auto it = origins.find(first_key);
    int line = it != origins.end() && it->second.source == source ? it->second.line : 0;
    fail({source, line}, message);
  };
  auto s = [](auto v) { return std::to_string(v); };
  auto list_text = format_list;

  ModelConfig& m = c.model;
  AttentionConfig& a = c.attention;

  // Values whose arithmetic cannot stay finite (model.layernorm_eps > 0 is per key).
  if (c.optimizer.name == OptimizerKind::adamw && c.optimizer.eps <= 0)
    fail_at("optimizer.eps", "optimizer.eps = " + format_double(c.optimizer.eps) +
                                 " must be positive with optimizer.name = adamw (the update "
                                 "divides by sqrt(v) + eps, and v is 0 where gradients are)");

  // Heads.
  if (m.d_head == 0 && m.d_model % m.n_heads != 0)
    fail_at("model.d_model", "model.d_model = " + s(m.d_model) +
                                 " is not divisible by model.n_heads = " + s(m.n_heads) +
                                 " (model.d_head = 0 means d_model / n_heads)");
  if (m.d_head > 0 && int64_t(m.d_head) * m.n_heads > int64_t(kMaxWidth))
    fail_at("model.d_head", "model.d_head * model.n_heads = " + s(int64_t(m.d_head) * m.n_heads) +
                                " is larger than " + s(int64_t(kMaxWidth)));

  // Axial positions: derive, then check.
  if (m.axial_shape.empty()) {
    int64_t a2 = 1;
    while (a2 * a2 < m.max_len) a2 *= 2;
    m.axial_shape = {int((m.max_len + a2 - 1) / a2), int(a2)};
  }
  if (m.axial_dims.empty()) m.axial_dims = {m.d_model / 2, m.d_model - m.d_model / 2};
  if (m.axial_shape.size() != 2)
    fail_at("model.axial_shape", "model.axial_shape must have 2 entries, got " +
                                     list_text(m.axial_shape));
  if (int64_t(m.axial_shape[0]) * m.axial_shape[1] < m.max_len)
    fail_at("model.axial_shape",
            "model.axial_shape = " + list_text(m.axial_shape) + " covers " +
                s(int64_t(m.axial_shape[0]) * m.axial_shape[1]) +
                " positions, fewer than model.max_len = " + s(m.max_len));
  if (m.axial_dims.size() != 2)
    fail_at("model.axial_dims", "model.axial_dims must have 2 entries, got " +
                                    list_text(m.axial_dims));
  if (m.axial_dims[0] + m.axial_dims[1] != m.d_model)
    fail_at("model.axial_dims", "model.axial_dims = " + list_text(m.axial_dims) + " sums to " +
                                    s(m.axial_dims[0] + m.axial_dims[1]) +
                                    ", not model.d_model = " + s(m.d_model));

  if (m.kept_layers > m.n_layers)
    fail_at("model.kept_layers", "model.kept_layers = " + s(m.kept_layers) +
                                     " exceeds model.n_layers = " + s(m.n_layers) +
                                     " (0 .. n_layers, or auto)");
  if (m.stashed_layers > m.n_layers - std::max(m.kept_layers, 0))
    fail_at("model.stashed_layers",
            "model.stashed_layers = " + s(m.stashed_layers) + " exceeds the " +
                s(m.n_layers - std::max(m.kept_layers, 0)) +
                " layers below the kept ones (0 .. n_layers - kept_layers, or auto)");

  // Attention.
  if (a.kinds.empty()) fail_at("attention.kinds", "attention.kinds must name at least one kind");
  for (int layer = 0; layer < m.n_layers; ++layer) {
    const AttentionKind kind = c.attention_kind(layer);
    if (kind != AttentionKind::full && m.max_len % a.bucket_size != 0)
      fail_at("model.max_len", "model.max_len = " + s(m.max_len) +
                                   " is not a multiple of attention.bucket_size = " +
                                   s(a.bucket_size) + " (layer " + s(layer) + " uses " + to_string(kind) +
                                   " attention, see attention.kinds)");
  }
  if (a.n_buckets % 2 != 0)
    fail_at("attention.n_buckets", "attention.n_buckets = " + s(a.n_buckets) +
                                       " must be even (0 chooses it from max_len / bucket_size)");
  if (a.factorize_buckets && a.n_buckets >= 4 && (a.n_buckets & (a.n_buckets - 1)) != 0)
    fail_at("attention.n_buckets", "attention.n_buckets = " + s(a.n_buckets) +
                                       " must be a power of two when attention.factorize_buckets"
                                       " is true (0 chooses one from max_len / bucket_size)");
  if (a.causal && a.chunks_after != 0)
    fail_at("attention.chunks_after", "attention.chunks_after = " + s(a.chunks_after) +
                                          " must be 0 when attention.causal is true");
  const bool lsh = std::find(a.kinds.begin(), a.kinds.end(), AttentionKind::lsh) != a.kinds.end();
  if (lsh && m.lsh_saved == LshSaved::buckets && c.buckets() > kMaxPackedBuckets)
    fail_at("model.lsh_saved", "model.lsh_saved = buckets keeps 16-bit bucket ids, but LSH "
                               "layers hash into " + s(c.buckets()) + " buckets at model.max_len = " +
                               s(m.max_len) + " (at most " + s(kMaxPackedBuckets) +
                               "; use orders or auto)");

  // Data.
  const DataConfig& d = c.data;
  if (d.kind == DataKind::bytes && d.path.empty())
    fail_at("data.kind", "data.kind = bytes needs data.path (the file of bytes)");
  if (d.kind == DataKind::bytes && m.vocab_size < 256)
    fail_at("model.vocab_size", "model.vocab_size = " + s(m.vocab_size) +
                                    " is too small for data.kind = bytes (needs 256)");
  if (d.kind == DataKind::duplication) {
    if (m.max_len % 2 != 0 || m.max_len < 4)
      fail_at("model.max_len", "model.max_len = " + s(m.max_len) +
                                   " must be even and at least 4 for data.kind = duplication"
                                   " (0 w 0 w with w at least one symbol)");
    if (d.dup_symbols > m.vocab_size)
      fail_at("data.dup_symbols", "data.dup_symbols = " + s(d.dup_symbols) +
                                      " exceeds model.vocab_size = " + s(m.vocab_size));
    int symbols = d.dup_symbols > 0 ? d.dup_symbols : m.vocab_size;
    if (symbols < 3)
      fail_at("data.dup_symbols", "data.dup_symbols = " + s(symbols) +
                                      " must be at least 3 (0 means model.vocab_size)");
  }
  if (d.valid_fraction + d.test_fraction >= 1)
    fail_at("data.valid_fraction", "data.valid_fraction + data.test_fraction = " +
                                       format_double(d.valid_fraction + d.test_fraction) +
                                       " must be less than 1");

  // Parallelism and batch.
  const ParallelConfig& p = c.parallel;
  if (p.dp > 0 && c.training.batch_size % p.dp != 0)
    fail_at("training.batch_size", "training.batch_size = " + s(c.training.batch_size) +
                                       " is not divisible by parallel.dp = " + s(p.dp));
  if (m.max_len % p.sp != 0)
    fail_at("model.max_len", "model.max_len = " + s(m.max_len) +
                                 " is not divisible by parallel.sp = " + s(p.sp));
  if (p.backend == CommBackend::local && int64_t(p.dp) * p.sp > 1)
    fail_at("parallel.backend", "parallel.dp * parallel.sp = " + s(int64_t(p.dp) * p.sp) +
                                    " needs parallel.backend = mpi or nccl, not local");
  if (p.backend == CommBackend::local && p.sp > 1)  // dp = auto: the product is not known yet
    fail_at("parallel.backend", "parallel.sp = " + s(p.sp) +
                                    " needs parallel.backend = mpi or nccl, not local");
  if (p.backend == CommBackend::nccl && c.training.device == DeviceKind::cpu)
    fail_at("parallel.backend", "parallel.backend = nccl needs training.device = cuda or auto");
}

}  // namespace

// ---------------------------------------------------------------- public interface

int Config::buckets() const {
  if (attention.n_buckets > 0) return attention.n_buckets;
  int64_t wanted = (2 * int64_t(model.max_len) + attention.bucket_size - 1) / attention.bucket_size;
  return int(pow2_at_least(std::max<int64_t>(wanted, 2)));
}

int Config::bucket_factor0() const {
  const int nb = buckets();
  if (!attention.factorize_buckets || nb < 4) return 0;
  int k = 0;
  while ((int64_t(1) << (k + 1)) <= nb) ++k;  // nb = 2^k (validated)
  return 1 << (k / 2);
}

void validate_config(Config& c, const std::string& source_name) {
  // Per-key types and ranges, as if each value had been read from YAML.
  for (const Key& k : keys()) {
    Config scratch;
    read_value(scratch, k, YAML::Load(value_text(c, k)), {source_name, 0});
  }
  validate(c, source_name, Origins{});
}

std::vector<std::string> config_keys() {
  std::vector<std::string> names;
  for (const Key& k : keys()) names.push_back(k.name);
  return names;
}

Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides) {
  Config c;
  Origins origins;
  apply_document(c, load_yaml(yaml_text, source_name), source_name, origins);
  for (const std::string& o : overrides) apply_override(c, o, origins);
  validate(c, source_name, origins);
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw ConfigError("config file '" + path + "' is a directory, not a YAML file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open config file '" + path + "'");
  // Read at most one byte past the cap, so that /dev/zero or a wrong,
  // huge file is refused instead of filling memory.
  std::string text(size_t(kMaxConfigBytes) + 1, '\0');
  in.read(text.data(), std::streamsize(text.size()));
  if (in.bad()) throw ConfigError("cannot read config file '" + path + "'");
  text.resize(size_t(in.gcount()));
  if (int64_t(text.size()) > kMaxConfigBytes)
    throw ConfigError("config file '" + path + "' is larger than " +
                      std::to_string(kMaxConfigBytes >> 20) +
                      " MiB; a configuration is a few kilobytes of YAML (is it the right file?)");
  return parse_config(text, path, overrides);
}

std::string to_yaml(const Config& c) {
  std::string out, section;
  for (const Key& k : keys()) {
    if (section_of(k.name) != section) {
      section = section_of(k.name);
      out += section + ":\n";
    }
    out += "  " + k.name.substr(k.name.find('.') + 1) + ": " + value_text(c, k) + "\n";
  }
  return out;
}

std::string first_difference(const Config& a, const Config& b) {
  for (const Key& k : keys())
    if (value_text(a, k) != value_text(b, k)) return k.name;
  return "";
}

std::vector<ConfigChange> config_changes(const Config& before, const Config& after) {
  std::vector<ConfigChange> out;
  for (const Key& k : keys()) {
    std::string a = value_text(before, k), b = value_text(after, k);
    if (a != b) out.push_back({k.name, std::move(a), std::move(b)});
  }
  return out;
}

uint64_t config_digest(const Config& c) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a, 64 bits
  for (unsigned char ch : to_yaml(c)) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

void resolve_world_size(Config& c, int world_size) {
  ParallelConfig& p = c.parallel;
  const std::string world = std::to_string(world_size);
  if (p.dp == 0) {
    if (world_size % p.sp != 0)
      throw ConfigError("parallel.dp = auto: the " + world + " processes are not divisible by "
                        "parallel.sp = " + std::to_string(p.sp));
    p.dp = world_size / p.sp;
  }
  if (int64_t(p.dp) * p.sp != world_size)
    throw ConfigError("parallel.dp * parallel.sp = " + std::to_string(int64_t(p.dp) * p.sp) +
                      " must equal the number of processes (" + world + ")");
  if (c.training.batch_size % p.dp != 0)
    throw ConfigError("training.batch_size = " + std::to_string(c.training.batch_size) +
                      " is not divisible by parallel.dp = " + std::to_string(p.dp) +
                      " (from " + world + " processes)");
}

}  // namespace reformer
