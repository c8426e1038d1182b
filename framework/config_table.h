// The configuration's key table and the reading and printing of one key's
// value. Internal to the configuration (config.cpp, config_table.cpp).
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "framework/config.h"

namespace reformer::config_detail {

// A key reaches its field through a capture-less function; the alternative
// held says the key's type, so type and field can never disagree.
template <class T>
using Field = T& (*)(Config&);
using Accessor =
    std::variant<Field<int>, Field<int64_t>, Field<uint64_t>, Field<double>, Field<bool>,
                 Field<std::string>, Field<std::vector<int>>, Field<Activation>,
                 Field<std::vector<AttentionKind>>, Field<OptimizerKind>, Field<Schedule>,
                 Field<DeviceKind>, Field<OnNonFinite>, Field<DataKind>, Field<ByteSplit>,
                 Field<CommBackend>, Field<SpMode>, Field<AttentionPrecision>,
                 Field<LshSaved>, Field<KeptAttention>, Field<KeptFfn>,
                 Field<KeptPart>>;

// Allowed values of a number (or of each element of a list of integers).
struct Range {
  double lo = 0, hi = 0;
  bool lo_open = false;  // (lo, ...] rather than [lo, ...]
  bool hi_open = false;  // [..., hi) rather than [..., hi]
};

struct Key {
  std::string name;            // dotted: "section.member"
  Accessor field;              // where the value lives
  std::optional<Range> range;  // numbers, list<int> elements; none: any value of the type
  std::optional<int> auto_value = std::nullopt;  // integers: the word `auto` stands for this value and prints back so
};

constexpr int kMaxWidth = 1 << 16;  // largest model.d_model, d_head * n_heads

// Every key, in the order to_yaml prints them. Enum keys take the names of
// EnumNames<E>.
const std::vector<Key>& keys();
const Key* find_key(const std::string& dotted);
std::string section_of(const std::string& dotted);
const std::vector<std::string>& sections();  // in table order

// Where a value came from: "file:line" (line 1-based, 0 when unknown) or
// "--set a.b=value".
struct Where {
  std::string source;
  int line = 0;
  std::string str() const { return line > 0 ? source + ":" + std::to_string(line) : source; }
};

// Throws ConfigError("<where>: <message>").
[[noreturn]] void fail(const Where& at, const std::string& message);

// The 1-based line of `n`, or `fallback` when the node has none.
int line_of(const YAML::Node& n, int fallback);
std::string join(const std::vector<std::string>& items, const char* sep);
// "a list", "a map", "nothing" or the quoted scalar.
std::string describe(const YAML::Node& n);
// As a YAML float ("1.0", "1.0e-06"): the shortest text that reads back exactly.
std::string format_double(double v);
std::string format_list(const std::vector<int>& v);  // "[1, 2]"

// Reads `n` into `key`'s field of `c`, checking its type and per-key range or
// names; `at` locates the value for messages. Throws ConfigError.
void read_value(Config& c, const Key& key, const YAML::Node& n, const Where& at);

// `key`'s value in `c` as to_yaml prints it; it reads back as the same value.
std::string value_text(const Config& c, const Key& key);

}  // namespace reformer::config_detail
