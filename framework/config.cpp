// Configuration: one key table drives YAML parsing, `--set` overrides,
// per-key validation and printing; cross-field checks and derived defaults
// follow in validate().
#include "framework/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <variant>

#include "kernels/errors.h"

namespace reformer {
namespace {

// ---------------------------------------------------------------- key table

// A key reaches its field through a capture-less function; the alternative
// held says the key's type, so type and field can never disagree.
template <class T>
using Field = T& (*)(Config&);
using Accessor =
    std::variant<Field<int>, Field<int64_t>, Field<uint64_t>, Field<double>, Field<bool>,
                 Field<std::string>, Field<std::vector<int>>, Field<std::vector<std::string>>>;

// Allowed values of a number (or of each element of a list of integers).
struct Range {
  double lo = 0, hi = 0;
  bool hi_open = false;  // [lo, hi) rather than [lo, hi]
};

struct Key {
  std::string name;                     // dotted: "section.member"
  Accessor field;                       // where the value lives
  std::optional<Range> range;           // numbers, list<int> elements; none: any value
  std::vector<std::string> allowed;     // strings, list<string> elements; empty: any
};

// KEY(model, d_model) gives the dotted name and the accessor of one field,
// so a key's spelling and its field are written once.
#define KEY(section, member) \
  #section "." #member, +[](Config& c) -> auto& { return c.section.member; }

Key num(std::string name, Accessor f, double lo, double hi) {
  return {std::move(name), f, Range{lo, hi, false}, {}};
}
Key num_open(std::string name, Accessor f, double lo, double hi) {
  return {std::move(name), f, Range{lo, hi, true}, {}};
}
Key one_of(std::string name, Accessor f, std::vector<std::string> allowed) {
  return {std::move(name), f, std::nullopt, std::move(allowed)};
}
Key any(std::string name, Accessor f) { return {std::move(name), f, std::nullopt, {}}; }

constexpr double kMaxSteps = 1e12;
constexpr double kMaxLen = 1 << 30;
constexpr double kMaxWidth = 1 << 16;

const std::vector<Key>& keys() {
  static const std::vector<Key> table = {
      num(KEY(model, vocab_size), 2, 1 << 24),
      num(KEY(model, d_model), 1, kMaxWidth),
      num(KEY(model, n_heads), 1, 4096),
      num(KEY(model, d_head), 0, kMaxWidth),
      num(KEY(model, d_ff), 1, 1 << 20),
      num(KEY(model, n_layers), 1, 1024),
      num(KEY(model, max_len), 1, kMaxLen),
      num(KEY(model, axial_shape), 1, kMaxLen),
      num(KEY(model, axial_dims), 1, kMaxWidth),
      one_of(KEY(model, activation), {"gelu", "relu"}),
      num(KEY(model, layernorm_eps), 0, 1),
      num_open(KEY(model, dropout), 0, 1),
      num(KEY(model, ffn_chunk), 0, kMaxLen),
      num(KEY(model, loss_chunk), 0, kMaxLen),
      num(KEY(model, init_std), 0, 100),
      num(KEY(model, axial_init_std), 0, 100),

      one_of(KEY(attention, kinds), {"lsh", "full", "local"}),
      num(KEY(attention, bucket_size), 1, 1 << 20),
      num(KEY(attention, n_hashes), 1, 64),
      num(KEY(attention, n_buckets), 0, 1 << 24),
      any(KEY(attention, factorize_buckets)),
      num(KEY(attention, chunks_before), 0, 64),
      num(KEY(attention, chunks_after), 0, 64),
      any(KEY(attention, causal)),

      one_of(KEY(optimizer, name), {"adamw", "adafactor"}),
      num(KEY(optimizer, lr), 0, 10),
      num_open(KEY(optimizer, beta1), 0, 1),
      num_open(KEY(optimizer, beta2), 0, 1),
      num(KEY(optimizer, eps), 0, 1),
      num(KEY(optimizer, weight_decay), 0, 10),
      num(KEY(optimizer, decay_rate), 0, 1),
      num(KEY(optimizer, clip_threshold), 0, 1e6),
      num(KEY(optimizer, grad_clip), 0, 1e6),
      one_of(KEY(optimizer, schedule), {"rsqrt", "cosine", "constant"}),
      num(KEY(optimizer, warmup_steps), 0, kMaxSteps),
      num(KEY(optimizer, min_lr_ratio), 0, 1),

      num(KEY(training, steps), 0, kMaxSteps),
      num(KEY(training, batch_size), 1, 1 << 20),
      any(KEY(training, seed)),
      one_of(KEY(training, device), {"cpu", "cuda", "auto"}),
      num(KEY(training, log_every), 1, 1e9),
      num(KEY(training, eval_every), 0, 1e9),
      num(KEY(training, eval_batches), 1, 1e6),

      one_of(KEY(data, kind), {"duplication", "bytes"}),
      any(KEY(data, path)),
      one_of(KEY(data, split), {"fractions", "enwik8"}),
      num_open(KEY(data, valid_fraction), 0, 1),
      num_open(KEY(data, test_fraction), 0, 1),
      num(KEY(data, dup_symbols), 0, 1 << 24),

      num(KEY(parallel, dp), 1, 65536),
      num(KEY(parallel, sp), 1, 65536),
      one_of(KEY(parallel, backend), {"local", "mpi", "nccl"}),

      any(KEY(checkpoint, dir)),
      num(KEY(checkpoint, every), 0, kMaxSteps),
      num(KEY(checkpoint, keep), 1, 1000),
      any(KEY(checkpoint, resume)),

      any(KEY(logging, metrics)),
  };
  return table;
}

#undef KEY

std::string section_of(const std::string& dotted) { return dotted.substr(0, dotted.find('.')); }

// Section names in table order.
const std::vector<std::string>& sections() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const Key& k : keys())
      if (std::find(out.begin(), out.end(), section_of(k.name)) == out.end())
        out.push_back(section_of(k.name));
    return out;
  }();
  return names;
}

const Key* find_key(const std::string& dotted) {
  for (const Key& k : keys())
    if (k.name == dotted) return &k;
  return nullptr;
}

// ---------------------------------------------------------------- messages

// Where a value came from: "file:line" (line 1-based, 0 when unknown) or
// "--set a.b=value".
struct Where {
  std::string source;
  int line = 0;
  std::string str() const {
    return line > 0 ? source + ":" + std::to_string(line) : source;
  }
};

[[noreturn]] void fail(const Where& at, const std::string& message) {
  throw ConfigError(at.str() + ": " + message);
}

int line_of(const YAML::Node& n, int fallback) {
  YAML::Mark m = n.Mark();
  return m.is_null() || m.line < 0 ? fallback : m.line + 1;
}

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

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

// ---------------------------------------------------------------- printing values

// Shortest text that reads back as exactly `v`.
std::string shortest(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

// As a YAML value with a decimal point ("1.0", "1.0e-06"), so that YAML 1.1
// readers too see a float.
std::string format_double(double v) {
  std::string text = shortest(v);
  if (text.find('.') == std::string::npos) {
    size_t e = text.find('e');
    text.insert(e == std::string::npos ? text.size() : e, ".0");
  }
  return text;
}

std::string format_bound(const Key& k, double v) {
  bool integral = !std::holds_alternative<Field<double>>(k.field);
  return integral ? std::to_string(int64_t(v)) : shortest(v);
}

std::string range_text(const Key& k) {
  return "[" + format_bound(k, k.range->lo) + ", " + format_bound(k, k.range->hi) +
         (k.range->hi_open ? ")" : "]");
}

// A string as a YAML scalar: plain where that reads back as the same
// string, double-quoted otherwise.
std::string yaml_string(const std::string& s) {
  static const std::vector<std::string> reserved = {"true", "false", "yes", "no", "on",
                                                    "off",  "null",  "y",   "n"};
  bool plain = !s.empty() && (std::isalpha((unsigned char)s[0]) || s[0] == '_' || s[0] == '/');
  for (char ch : s)
    plain = plain && (std::isalnum((unsigned char)ch) || ch == '_' || ch == '-' || ch == '.' ||
                      ch == '/');
  std::string lower = s;
  for (char& ch : lower) ch = char(std::tolower((unsigned char)ch));
  if (plain && std::find(reserved.begin(), reserved.end(), lower) == reserved.end()) return s;
  std::string out = "\"";
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += char(ch);
    } else if (ch < 0x20 || ch == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    } else {
      out += char(ch);
    }
  }
  return out + "\"";
}

struct Printer {
  std::string operator()(const int& v) const { return std::to_string(v); }
  std::string operator()(const int64_t& v) const { return std::to_string(v); }
  std::string operator()(const uint64_t& v) const { return std::to_string(v); }
  std::string operator()(const double& v) const { return format_double(v); }
  std::string operator()(const bool& v) const { return v ? "true" : "false"; }
  std::string operator()(const std::string& v) const { return yaml_string(v); }
  std::string operator()(const std::vector<int>& v) const {
    std::vector<std::string> items;
    for (int x : v) items.push_back(std::to_string(x));
    return "[" + join(items, ", ") + "]";
  }
  std::string operator()(const std::vector<std::string>& v) const {
    std::vector<std::string> items;
    for (const std::string& x : v) items.push_back(yaml_string(x));
    return "[" + join(items, ", ") + "]";
  }
};

// ---------------------------------------------------------------- parsing values

std::string describe(const YAML::Node& n) {
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a map";
  if (n.IsNull()) return "nothing";
  return "'" + n.Scalar() + "'";
}

// Strict scalar grammars, independent of the yaml-cpp version: decimal
// integers with an optional sign; decimal or exponent numbers (no inf, nan,
// hex); YAML 1.1 booleans.
enum class Parsed { ok, bad, overflow };

Parsed parse_int(std::string s, int64_t& v) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  if (s.empty() || (s[0] == '-' && s.size() == 1)) return Parsed::bad;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ptr != s.data() + s.size()) return Parsed::bad;
  return r.ec == std::errc::result_out_of_range ? Parsed::overflow
         : r.ec == std::errc()                  ? Parsed::ok
                                                : Parsed::bad;
}

Parsed parse_uint(std::string s, uint64_t& v) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  if (s.empty() || s[0] == '-') return Parsed::bad;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ptr != s.data() + s.size()) return Parsed::bad;
  return r.ec == std::errc::result_out_of_range ? Parsed::overflow
         : r.ec == std::errc()                  ? Parsed::ok
                                                : Parsed::bad;
}

Parsed parse_double(std::string s, double& v) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  bool digit = false;
  for (char ch : s) {
    if (std::isdigit((unsigned char)ch)) digit = true;
    else if (ch != '.' && ch != 'e' && ch != 'E' && ch != '+' && ch != '-') return Parsed::bad;
  }
  if (!digit) return Parsed::bad;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ptr != s.data() + s.size()) return Parsed::bad;
  return r.ec == std::errc::result_out_of_range ? Parsed::overflow
         : r.ec == std::errc()                  ? Parsed::ok
                                                : Parsed::bad;
}

std::optional<bool> parse_bool(const std::string& s) {
  std::string lower = s;
  for (char& ch : lower) ch = char(std::tolower((unsigned char)ch));
  if (lower == "true" || lower == "yes" || lower == "on") return true;
  if (lower == "false" || lower == "no" || lower == "off") return false;
  return std::nullopt;
}

// Reads one YAML value into one key's field, checking its type and its
// per-key range or allowed set. `at` locates the value for messages.
class ValueReader {
 public:
  ValueReader(Config& c, const Key& key, const Where& at) : c_(c), key_(key), at_(at) {}

  void read(const YAML::Node& n) {
    std::visit([&](auto field) { store(field(c_), n); }, key_.field);
  }

 private:
  [[noreturn]] void expect(const std::string& name, const char* what, const YAML::Node& n,
              const Where& at) const {
    fail(at, name + ": expected " + what + ", got " + describe(n));
  }
  [[noreturn]] void out_of_range(const std::string& name, const std::string& text, const Where& at) const {
    fail(at, name + " = " + text + " is out of range " + range_text(key_));
  }
  void check_range(const std::string& name, double v, const std::string& text,
                   const Where& at) const {
    if (!key_.range) return;
    const Range& r = *key_.range;
    bool ok = std::isfinite(v) && v >= r.lo && (r.hi_open ? v < r.hi : v <= r.hi);
    if (!ok) out_of_range(name, text, at);
  }
  // List elements report their own line; `--set` values have none.
  Where at_element(const YAML::Node& n) const {
    return at_.line > 0 ? Where{at_.source, line_of(n, at_.line)} : at_;
  }

  template <class Int>
  Int integer(const std::string& name, const YAML::Node& n, const Where& at) const {
    if (!n.IsScalar()) expect(name, "an integer", n, at);
    int64_t v = 0;
    Parsed p = parse_int(n.Scalar(), v);
    if (p == Parsed::bad) expect(name, "an integer", n, at);
    if (p == Parsed::overflow) out_of_range(name, n.Scalar(), at);
    check_range(name, double(v), n.Scalar(), at);
    return Int(v);
  }

  std::string string(const std::string& name, const YAML::Node& n, const Where& at) const {
    if (n.IsNull()) return "";  // `key:` with no value, `~`, `null`
    if (!n.IsScalar()) expect(name, "a string", n, at);
    const std::string& s = n.Scalar();
    if (!key_.allowed.empty() &&
        std::find(key_.allowed.begin(), key_.allowed.end(), s) == key_.allowed.end())
      fail(at, name + ": '" + s + "' is not one of " + join(key_.allowed, ", "));
    return s;
  }

  // A list key accepts a sequence, a single scalar (one element) or nothing
  // (empty list).
  template <class T, class Elem>
  std::vector<T> list(const YAML::Node& n, const char* what, Elem elem) const {
    std::vector<T> out;
    if (n.IsNull()) return out;
    if (n.IsMap()) expect(key_.name, what, n, at_);
    if (n.IsScalar()) return {elem(key_.name, n, at_)};
    for (size_t i = 0; i < n.size(); ++i)
      out.push_back(elem(key_.name + "[" + std::to_string(i) + "]", n[i], at_element(n[i])));
    return out;
  }

  void store(int& f, const YAML::Node& n) const { f = integer<int>(key_.name, n, at_); }
  void store(int64_t& f, const YAML::Node& n) const { f = integer<int64_t>(key_.name, n, at_); }
  void store(uint64_t& f, const YAML::Node& n) const {
    const char* what = "a non-negative integer";
    if (!n.IsScalar()) expect(key_.name, what, n, at_);
    Parsed p = parse_uint(n.Scalar(), f);
    if (p == Parsed::bad) expect(key_.name, what, n, at_);
    if (p == Parsed::overflow) fail(at_, key_.name + " = " + n.Scalar() + " does not fit 64 bits");
  }
  void store(double& f, const YAML::Node& n) const {
    if (!n.IsScalar()) expect(key_.name, "a number", n, at_);
    Parsed p = parse_double(n.Scalar(), f);
    if (p == Parsed::bad) expect(key_.name, "a number", n, at_);
    if (p == Parsed::overflow) out_of_range(key_.name, n.Scalar(), at_);
    check_range(key_.name, f, n.Scalar(), at_);
  }
  void store(bool& f, const YAML::Node& n) const {
    std::optional<bool> b = n.IsScalar() ? parse_bool(n.Scalar()) : std::nullopt;
    if (!b) expect(key_.name, "true or false", n, at_);
    f = *b;
  }
  void store(std::string& f, const YAML::Node& n) const { f = string(key_.name, n, at_); }
  void store(std::vector<int>& f, const YAML::Node& n) const {
    f = list<int>(n, "a list of integers", [&](const std::string& name, const YAML::Node& e,
                                               const Where& at) { return integer<int>(name, e, at); });
  }
  void store(std::vector<std::string>& f, const YAML::Node& n) const {
    f = list<std::string>(n, "a list of strings",
                          [&](const std::string& name, const YAML::Node& e, const Where& at) {
                            return string(name, e, at);
                          });
  }

  Config& c_;
  const Key& key_;
  Where at_;
};

// ---------------------------------------------------------------- documents and overrides

// Where each key's final value was set: "file:line" or "--set ...".
using Origins = std::map<std::string, Where>;

YAML::Node load_yaml(const std::string& text, const std::string& source) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail({source, e.mark.is_null() ? 0 : e.mark.line + 1}, "YAML syntax error: " + e.msg);
  }
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
      ValueReader(c, *key, key_at).read(kv.second);
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
  ValueReader(c, *key, at).read(n);
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
  auto list_text = [](const std::vector<int>& v) { return Printer{}(v); };

  ModelConfig& m = c.model;
  AttentionConfig& a = c.attention;

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

  // Attention.
  if (a.kinds.empty()) fail_at("attention.kinds", "attention.kinds must name at least one kind");
  for (int layer = 0; layer < m.n_layers; ++layer) {
    const std::string& kind = a.kinds[size_t(layer) % a.kinds.size()];
    if ((kind == "lsh" || kind == "local") && m.max_len % a.bucket_size != 0)
      fail_at("model.max_len", "model.max_len = " + s(m.max_len) +
                                   " is not a multiple of attention.bucket_size = " +
                                   s(a.bucket_size) + " (layer " + s(layer) + " uses " + kind +
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

  // Data.
  const DataConfig& d = c.data;
  if (d.kind == "bytes" && d.path.empty())
    fail_at("data.kind", "data.kind = bytes needs data.path (the file of bytes)");
  if (d.kind == "bytes" && m.vocab_size < 256)
    fail_at("model.vocab_size", "model.vocab_size = " + s(m.vocab_size) +
                                    " is too small for data.kind = bytes (needs 256)");
  if (d.kind == "duplication") {
    if (m.max_len % 2 != 0)
      fail_at("model.max_len", "model.max_len = " + s(m.max_len) +
                                   " must be even for data.kind = duplication");
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
  if (c.training.batch_size % p.dp != 0)
    fail_at("training.batch_size", "training.batch_size = " + s(c.training.batch_size) +
                                       " is not divisible by parallel.dp = " + s(p.dp));
  if (m.max_len % p.sp != 0)
    fail_at("model.max_len", "model.max_len = " + s(m.max_len) +
                                 " is not divisible by parallel.sp = " + s(p.sp));
  if (p.backend == "local" && int64_t(p.dp) * p.sp > 1)
    fail_at("parallel.backend", "parallel.dp * parallel.sp = " + s(int64_t(p.dp) * p.sp) +
                                    " needs parallel.backend = mpi or nccl, not local");
  if (p.backend == "nccl" && c.training.device == "cpu")
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
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open config file '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw ConfigError("cannot read config file '" + path + "'");
  return parse_config(text.str(), path, overrides);
}

std::string to_yaml(const Config& c) {
  Config copy = c;  // accessors take a mutable Config
  std::string out, section;
  for (const Key& k : keys()) {
    if (section_of(k.name) != section) {
      section = section_of(k.name);
      out += section + ":\n";
    }
    std::string value = std::visit([&](auto field) { return Printer{}(field(copy)); }, k.field);
    out += "  " + k.name.substr(k.name.find('.') + 1) + ": " + value + "\n";
  }
  return out;
}

}  // namespace reformer
