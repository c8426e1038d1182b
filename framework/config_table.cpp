// The configuration's key table: one entry per key gives its dotted name,
// its field (hence its type) and its allowed values; reading and printing a
// value follow from the field's type.
#include "framework/config_table.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "kernels/errors.h"

namespace reformer::config_detail {
namespace {

// KEY(model, d_model) gives the dotted name and the accessor of one field,
// so a key's spelling and its field are written once.
#define KEY(section, member) \
  #section "." #member, +[](Config& c) -> auto& { return c.section.member; }

Key num(std::string name, Accessor f, double lo, double hi) {
  return {std::move(name), f, Range{lo, hi, false, false}};
}
Key num_open(std::string name, Accessor f, double lo, double hi) {
  return {std::move(name), f, Range{lo, hi, false, true}};
}
Key positive(std::string name, Accessor f, double hi) {
  return {std::move(name), f, Range{0, hi, true, false}};
}
Key any(std::string name, Accessor f) { return {std::move(name), f, std::nullopt}; }
// `auto` reads as auto_value (outside [lo, hi] or 0).
Key num_or_auto(std::string name, Accessor f, double lo, double hi, int auto_value = 0) {
  return {std::move(name), f, Range{lo, hi, false, false}, auto_value};
}

constexpr double kMaxSteps = 1e12;

}  // namespace

const std::vector<Key>& keys() {
  static const std::vector<Key> table = {
      num(KEY(model, vocab_size), 2, 1 << 24),
      num(KEY(model, d_model), 1, kMaxWidth),
      num(KEY(model, n_heads), 1, 4096),
      num(KEY(model, d_head), 0, kMaxWidth),
      num(KEY(model, d_ff), 1, 1 << 20),
      num(KEY(model, n_layers), 1, 1024),
      num(KEY(model, max_len), 1, kMaxLength),
      num(KEY(model, axial_shape), 1, kMaxLength),
      num(KEY(model, axial_dims), 1, kMaxWidth),
      any(KEY(model, activation)),
      positive(KEY(model, layernorm_eps), 1),
      num_open(KEY(model, dropout), 0, 1),
      num(KEY(model, ffn_chunk), 0, kMaxLength),
      num(KEY(model, proj_chunk), 0, kMaxLength),
      num(KEY(model, attn_heads_per_pass), 0, 1 << 16),
      num_or_auto(KEY(model, attn_rounds_per_pass), 0, 64),
      num_or_auto(KEY(model, kept_layers), 0, 1024, kKeptLayersAuto),
      num_or_auto(KEY(model, stashed_layers), 0, 1024, kStashedLayersAuto),
      any(KEY(model, kept_attention)),
      any(KEY(model, kept_ffn)),
      any(KEY(model, kept_x1)),
      any(KEY(model, kept_ln)),
      any(KEY(model, lsh_saved)),
      num(KEY(model, loss_chunk), 0, kMaxLength),
      num(KEY(model, init_std), 0, 100),
      num(KEY(model, axial_init_std), 0, 100),

      any(KEY(attention, kinds)),
      num(KEY(attention, bucket_size), 1, 1 << 20),
      num(KEY(attention, n_hashes), 1, 64),
      num(KEY(attention, n_buckets), 0, 1 << 24),
      any(KEY(attention, factorize_buckets)),
      num(KEY(attention, chunks_before), 0, 64),
      num(KEY(attention, chunks_after), 0, 64),
      any(KEY(attention, causal)),
      // bf16: tensor-core attention on CUDA (bf16 products, fp32 softmax and sums); fp32: CUDA cores.
      any(KEY(attention, precision)),

      any(KEY(optimizer, name)),
      num(KEY(optimizer, lr), 0, 10),
      num_open(KEY(optimizer, beta1), 0, 1),
      num_open(KEY(optimizer, beta2), 0, 1),
      num(KEY(optimizer, eps), 0, 1),
      num(KEY(optimizer, weight_decay), 0, 10),
      num(KEY(optimizer, decay_rate), 0, 1),
      num(KEY(optimizer, clip_threshold), 0, 1e6),
      num(KEY(optimizer, grad_clip), 0, 1e6),
      any(KEY(optimizer, schedule)),
      num(KEY(optimizer, warmup_steps), 0, kMaxSteps),
      num(KEY(optimizer, min_lr_ratio), 0, 1),

      num(KEY(training, steps), 0, kMaxSteps),
      num(KEY(training, batch_size), 1, 1 << 20),
      any(KEY(training, seed)),
      any(KEY(training, device)),
      num(KEY(training, log_every), 1, 1e9),
      num(KEY(training, eval_every), 0, 1e9),
      num(KEY(training, eval_batches), 1, 1e6),
      any(KEY(training, on_nonfinite)),

      any(KEY(data, kind)),
      any(KEY(data, path)),
      any(KEY(data, split)),
      num_open(KEY(data, valid_fraction), 0, 1),
      num_open(KEY(data, test_fraction), 0, 1),
      num(KEY(data, dup_symbols), 0, 1 << 24),

      num_or_auto(KEY(parallel, dp), 1, 65536),
      num(KEY(parallel, sp), 1, 65536),
      any(KEY(parallel, backend)),
      any(KEY(parallel, sp_mode)),
      positive(KEY(parallel, timeout_s), 1e9),
      positive(KEY(parallel, bucket_mb), 1 << 20),
      num(KEY(parallel, bucket_lag), 0, 1 << 20),

      any(KEY(checkpoint, dir)),
      num(KEY(checkpoint, every), 0, kMaxSteps),
      num(KEY(checkpoint, keep), 1, 1000),
      any(KEY(checkpoint, resume)),
      any(KEY(checkpoint, allow_changes)),

      any(KEY(logging, metrics)),
      any(KEY(logging, plot)),
      num(KEY(logging, peak_tflops), 0, 1e9),
      any(KEY(logging, per_rank)),
  };
  return table;
}

#undef KEY

std::string section_of(const std::string& dotted) { return dotted.substr(0, dotted.find('.')); }

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

[[noreturn]] void fail(const Where& at, const std::string& message) {
  throw ConfigError(at.str() + ": " + message);
}

int line_of(const YAML::Node& n, int fallback) {
  YAML::Mark m = n.Mark();
  return m.is_null() || m.line < 0 ? fallback : m.line + 1;
}

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string describe(const YAML::Node& n) {
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a map";
  if (n.IsNull()) return "nothing";
  return "'" + n.Scalar() + "'";
}

// ---------------------------------------------------------------- printing values

namespace {

// Shortest text that reads back as exactly `v`.
std::string shortest(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

std::string format_bound(const Key& k, double v) {
  bool integral = !std::holds_alternative<Field<double>>(k.field) || v == std::floor(v);
  return integral ? std::to_string(int64_t(v)) : shortest(v);
}

std::string range_text(const Key& k) {
  const Range& r = *k.range;
  return (r.lo_open ? "(" : "[") + format_bound(k, r.lo) + ", " + format_bound(k, r.hi) +
         (r.hi_open ? ")" : "]") + (k.auto_value ? " (or auto)" : "");
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

template <ConfigEnum E>
std::vector<std::string> enum_names() {
  return {EnumNames<E>::names.begin(), EnumNames<E>::names.end()};
}

struct Printer {
  std::string operator()(const int& v) const { return std::to_string(v); }
  std::string operator()(const int64_t& v) const { return std::to_string(v); }
  std::string operator()(const uint64_t& v) const { return std::to_string(v); }
  std::string operator()(const double& v) const { return format_double(v); }
  std::string operator()(const bool& v) const { return v ? "true" : "false"; }
  std::string operator()(const std::string& v) const { return yaml_string(v); }
  template <ConfigEnum E>
  std::string operator()(const E& v) const { return yaml_string(to_string(v)); }
  template <class T>
  std::string operator()(const std::vector<T>& v) const {
    std::vector<std::string> items;
    for (const T& x : v) items.push_back((*this)(x));
    return "[" + join(items, ", ") + "]";
  }
};

}  // namespace

std::string format_double(double v) {
  std::string text = shortest(v);
  if (text.find('.') == std::string::npos) {
    size_t e = text.find('e');
    text.insert(e == std::string::npos ? text.size() : e, ".0");
  }
  return text;
}

std::string format_list(const std::vector<int>& v) { return Printer{}(v); }

std::string value_text(const Config& c, const Key& key) {
  Config& copy = const_cast<Config&>(c);  // accessors take a mutable Config; nothing is written
  return std::visit(
      [&](auto field) {
        const auto& v = field(copy);
        if constexpr (std::is_same_v<std::decay_t<decltype(v)>, int>)
          if (key.auto_value && v == *key.auto_value) return std::string("auto");
        return Printer{}(v);
      },
      key.field);
}

// ---------------------------------------------------------------- parsing values

namespace {

// Strict scalar grammars, independent of the yaml-cpp version: decimal
// integers with an optional sign; decimal or exponent numbers (no inf, nan,
// hex); YAML 1.1 booleans.
enum class Parsed { ok, bad, overflow };

template <class Num>
Parsed from_chars_all(const std::string& s, Num& v) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ptr != s.data() + s.size()) return Parsed::bad;
  return r.ec == std::errc::result_out_of_range ? Parsed::overflow
         : r.ec == std::errc()                  ? Parsed::ok
                                                : Parsed::bad;
}

Parsed parse_int(std::string s, int64_t& v) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  if (s.empty() || (s[0] == '-' && s.size() == 1)) return Parsed::bad;
  return from_chars_all(s, v);
}

Parsed parse_uint(std::string s, uint64_t& v) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  if (s.empty() || s[0] == '-') return Parsed::bad;
  return from_chars_all(s, v);
}

Parsed parse_double(std::string s, double& v) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  bool digit = false;
  for (char ch : s) {
    if (std::isdigit((unsigned char)ch)) digit = true;
    else if (ch != '.' && ch != 'e' && ch != 'E' && ch != '+' && ch != '-') return Parsed::bad;
  }
  if (!digit) return Parsed::bad;
  return from_chars_all(s, v);
}

std::optional<bool> parse_bool(const std::string& s) {
  std::string lower = s;
  for (char& ch : lower) ch = char(std::tolower((unsigned char)ch));
  if (lower == "true" || lower == "yes" || lower == "on") return true;
  if (lower == "false" || lower == "no" || lower == "off") return false;
  return std::nullopt;
}

// Reads one YAML value into one key's field, checking its type and its
// per-key range or names. `at` locates the value for messages.
class ValueReader {
 public:
  ValueReader(const Key& key, const Where& at) : key_(key), at_(at) {}

  void read(Config& c, const YAML::Node& n) const {
    std::visit([&](auto field) { store(field(c), n); }, key_.field);
  }

 private:
  [[noreturn]] void expect(const std::string& name, const std::string& what, const YAML::Node& n,
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
    bool ok = std::isfinite(v) && (r.lo_open ? v > r.lo : v >= r.lo) &&
              (r.hi_open ? v < r.hi : v <= r.hi);
    if (!ok) out_of_range(name, text, at);
  }
  // List elements report their own line; `--set` values have none.
  Where at_element(const YAML::Node& n) const {
    return at_.line > 0 ? Where{at_.source, line_of(n, at_.line)} : at_;
  }

  template <class Int>
  Int integer(const std::string& name, const YAML::Node& n, const Where& at) const {
    const std::string what = key_.auto_value ? "an integer or auto" : "an integer";
    if (!n.IsScalar()) expect(name, what, n, at);
    if (key_.auto_value && n.Scalar() == "auto") return Int(*key_.auto_value);
    int64_t v = 0;
    Parsed p = parse_int(n.Scalar(), v);
    if (p == Parsed::bad) expect(name, what, n, at);
    if (p == Parsed::overflow) out_of_range(name, n.Scalar(), at);
    check_range(name, double(v), n.Scalar(), at);
    return Int(v);
  }

  template <ConfigEnum E>
  E word(const std::string& name, const YAML::Node& n, const Where& at) const {
    const std::string names = join(enum_names<E>(), ", ");
    if (!n.IsScalar()) expect(name, "one of " + names, n, at);
    std::optional<E> e = parse_enum<E>(n.Scalar());
    if (!e) fail(at, name + ": '" + n.Scalar() + "' is not one of " + names);
    return *e;
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
  void store(std::string& f, const YAML::Node& n) const {
    if (n.IsNull()) f = "";  // `key:` with no value, `~`, `null`
    else if (!n.IsScalar()) expect(key_.name, "a string", n, at_);
    else f = n.Scalar();
  }
  template <ConfigEnum E>
  void store(E& f, const YAML::Node& n) const {
    f = word<E>(key_.name, n, at_);
  }
  void store(std::vector<int>& f, const YAML::Node& n) const {
    f = list<int>(n, "a list of integers", [&](const std::string& name, const YAML::Node& e,
                                               const Where& at) { return integer<int>(name, e, at); });
  }
  template <ConfigEnum E>
  void store(std::vector<E>& f, const YAML::Node& n) const {
    f = list<E>(n, "a list of strings", [&](const std::string& name, const YAML::Node& e,
                                          const Where& at) { return word<E>(name, e, at); });
  }

  const Key& key_;
  Where at_;
};

}  // namespace

void read_value(Config& c, const Key& key, const YAML::Node& n, const Where& at) {
  ValueReader(key, at).read(c, n);
}

}  // namespace reformer::config_detail
