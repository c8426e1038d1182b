#include "framework/safetensors.h"

#include <fcntl.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "kernels/errors.h"

namespace fs = std::filesystem;

namespace reformer {

namespace {

// The largest header read (the safetensors library's own limit).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// IEEE half to float, exactly (subnormals, infinities and NaN included).
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(mant), -24);  // zero or subnormal
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(float(mant | 0x400), exp - 25);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

uint64_t read_le64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | uint8_t(p[i]);
  return v;
}

void put_le64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(char((v >> (8 * i)) & 0xff));
}

// Reads a whole number strictly from a YAML scalar; false when it is not one.
bool whole(const YAML::Node& n, int64_t* out) {
  if (!n.IsScalar()) return false;
  const std::string& s = n.Scalar();
  const auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return !s.empty() && r.ec == std::errc() && r.ptr == s.data() + s.size();
}

struct Entry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t begin = 0, end = 0;
};

// One tensor's header entry, validated on its own.
Entry parse_entry(const std::string& name, const YAML::Node& v, const std::string& where) {
  const std::string at = where + ": tensor '" + name + "': ";
  if (!v.IsMap()) throw CheckpointError(at + "header entry is not an object");
  Entry e;
  e.name = name;
  const YAML::Node dtype = v["dtype"], shape = v["shape"], offs = v["data_offsets"];
  if (!dtype || !dtype.IsScalar()) throw CheckpointError(at + "no dtype");
  e.dtype = dtype.Scalar();
  if (e.dtype != "F32" && e.dtype != "F16" && e.dtype != "BF16")
    throw CheckpointError(at + "dtype " + e.dtype + " is not supported (F32, F16, BF16)");
  if (!shape || !shape.IsSequence()) throw CheckpointError(at + "no shape list");
  for (const YAML::Node& d : shape) {
    int64_t x = 0;
    if (!whole(d, &x) || x < 0) throw CheckpointError(at + "shape holds a value that is not a dim >= 0");
    e.shape.push_back(x);
  }
  if (!offs || !offs.IsSequence() || offs.size() != 2 || !whole(offs[0], &e.begin) ||
      !whole(offs[1], &e.end) || e.begin < 0 || e.end < e.begin)
    throw CheckpointError(at + "data_offsets is not [begin, end] with 0 <= begin <= end");
  const int64_t width = e.dtype == "F32" ? 4 : 2;
  int64_t n = 1;
  for (int64_t d : e.shape) {
    if (d != 0 && n > (int64_t(1) << 60) / d) throw CheckpointError(at + "shape is too large");
    n *= d;
  }
  if (e.end - e.begin != n * width)
    throw CheckpointError(at + "holds " + std::to_string(e.end - e.begin) + " bytes but shape " +
                          shape_text(e.shape) + " of " + e.dtype + " needs " +
                          std::to_string(n * width));
  return e;
}

}  // namespace

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  const auto fail = [&](const std::string& what) {
    const int err = errno;
    std::error_code ec;
    fs::remove(tmp, ec);
    throw CheckpointError(path + ": " + what + ": " + std::strerror(err));
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create " + tmp);
  for (size_t done = 0; done < bytes.size();) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      if (w == 0) errno = EIO;
      ::close(fd);
      fail("cannot write " + tmp);
    }
    done += size_t(w);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    fail("fsync of " + tmp + " failed");
  }
  if (::close(fd) != 0) fail("closing " + tmp + " failed");
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename " + tmp + " onto it");
  const fs::path parent = fs::path(path).parent_path();
  const int dfd = ::open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_safetensors(const std::string& path, const std::vector<SafeTensor>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::set<std::string> names;
  std::string header = "{";
  int64_t offset = 0;
  for (const SafeTensor& t : tensors) {
    const std::string at = path + ": refusing to write tensor '" + t.name + "': ";
    if (t.name.empty() || t.name == "__metadata__") throw CheckpointError(at + "reserved or empty name");
    if (!names.insert(t.name).second) throw CheckpointError(at + "duplicate name");
    if (std::any_of(t.shape.begin(), t.shape.end(), [](int64_t d) { return d < 0; }))
      throw CheckpointError(at + "negative dim in " + shape_text(t.shape));
    if (int64_t(t.data.size()) != numel(t.shape))
      throw CheckpointError(at + std::to_string(t.data.size()) + " values for shape " +
                            shape_text(t.shape));
    const int64_t bytes = int64_t(t.data.size()) * 4;
    header += json_quote(t.name) + ":{\"dtype\":\"F32\",\"shape\":" + shape_text(t.shape) +
              ",\"data_offsets\":[" + std::to_string(offset) + "," +
              std::to_string(offset + bytes) + "]},";
    offset += bytes;
  }
  header += "\"__metadata__\":{";
  for (size_t i = 0; i < metadata.size(); ++i) {
    if (i) header += ",";
    header += json_quote(metadata[i].first) + ":" + json_quote(metadata[i].second);
  }
  header += "}}";
  while (header.size() % 8 != 0) header += ' ';
  std::string out;
  out.reserve(8 + header.size() + size_t(offset));
  put_le64(out, header.size());
  out += header;
  for (const SafeTensor& t : tensors)
    for (const float v : t.data) {  // little-endian, whatever the host
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      for (int i = 0; i < 4; ++i) out.push_back(char((bits >> (8 * i)) & 0xff));
    }
  write_file_atomically(path, out);
}

std::vector<SafeTensor> read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(path + ": cannot open: " + std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw CheckpointError(path + ": cannot read");
  if (bytes.size() < 8)
    throw CheckpointError(path + ": truncated (" + std::to_string(bytes.size()) +
                          " bytes, shorter than the 8-byte header length)");
  const uint64_t n = read_le64(bytes.data());
  if (n > kMaxHeaderBytes || n > bytes.size() - 8)
    throw CheckpointError(path + ": header length " + std::to_string(n) +
                          " is beyond the file's " + std::to_string(bytes.size()) +
                          " bytes (or over 100 MB): truncated or not a safetensors file");
  YAML::Node root;
  try {
    root = YAML::Load(bytes.substr(8, n));
  } catch (const YAML::Exception& e) {
    throw CheckpointError(path + ": header is not valid JSON: " + e.what());
  }
  if (!root.IsMap()) throw CheckpointError(path + ": header is not a JSON object");
  const int64_t buffer = int64_t(bytes.size() - 8 - n);
  std::vector<Entry> entries;
  std::set<std::string> names;
  for (const auto& kv : root) {
    if (!kv.first.IsScalar()) throw CheckpointError(path + ": header has a key that is not a string");
    const std::string name = kv.first.Scalar();
    if (name == "__metadata__") continue;
    if (!names.insert(name).second) throw CheckpointError(path + ": tensor '" + name + "' appears twice");
    entries.push_back(parse_entry(name, kv.second, path));
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  int64_t covered = 0;
  for (const Entry& e : entries) {
    if (e.end > buffer)
      throw CheckpointError(path + ": tensor '" + e.name + "': data_offsets [" +
                            std::to_string(e.begin) + ", " + std::to_string(e.end) +
                            "] run past the data buffer's " + std::to_string(buffer) +
                            " bytes (truncated?)");
    if (e.begin != covered)
      throw CheckpointError(path + ": tensor '" + e.name + "': data starts at " +
                            std::to_string(e.begin) + " but the previous tensor ends at " +
                            std::to_string(covered) + " (overlap or gap)");
    covered = e.end;
  }
  if (covered != buffer)
    throw CheckpointError(path + ": the data buffer has " + std::to_string(buffer) +
                          " bytes but the tensors claim " + std::to_string(covered));
  std::vector<SafeTensor> out;
  out.reserve(entries.size());
  for (const Entry& e : entries) {
    SafeTensor t{e.name, e.shape, std::vector<float>(size_t(numel(e.shape)))};
    const char* p = bytes.data() + 8 + n + e.begin;
    for (size_t i = 0; i < t.data.size(); ++i) {
      if (e.dtype == "F32") {
        uint32_t bits = 0;
        for (int b = 3; b >= 0; --b) bits = (bits << 8) | uint8_t(p[4 * i + size_t(b)]);
        std::memcpy(&t.data[i], &bits, 4);
      } else {
        const auto h = uint16_t(uint8_t(p[2 * i]) | (uint16_t(uint8_t(p[2 * i + 1])) << 8));
        t.data[i] = e.dtype == "F16" ? half_to_float(h) : bf16_to_float(h);
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace reformer
