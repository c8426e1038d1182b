#include "framework/logging.h"

#include <cmath>
#include <cstdarg>
#include <mutex>

#include "kernels/errors.h"

namespace reformer {

namespace {
int g_rank = 0;
std::function<void(const std::string&)> g_sink;
std::mutex g_mutex;
std::FILE* g_rank_file = nullptr;
}  // namespace

void set_rank_log_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (!f) throw Error("cannot open the per-rank log " + path + " for appending");
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_rank_file) std::fclose(g_rank_file);
  g_rank_file = f;
}

void set_log_rank(int rank) { g_rank = rank; }
void set_log_sink(std::function<void(const std::string&)> sink) { g_sink = std::move(sink); }

void log_info(const std::string& line) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_rank_file) {
    std::fputs(line.c_str(), g_rank_file);
    std::fputc('\n', g_rank_file);
    std::fflush(g_rank_file);
  }
  if (g_rank != 0) return;
  if (g_sink) {
    g_sink(line);
  } else {
    std::fputs(line.c_str(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
}

std::string strfmt(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  va_list ap2;
  va_copy(ap2, ap);
  const int n = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string s(size_t(n > 0 ? n : 0), '\0');
  std::vsnprintf(s.data(), s.size() + 1, fmt, ap2);
  va_end(ap2);
  return s;
}

void JsonLine::key(const std::string& k) {
  if (!body_.empty()) body_ += ", ";
  body_ += "\"" + k + "\": ";
}
JsonLine& JsonLine::add(const std::string& k, int64_t v) {
  key(k);
  body_ += std::to_string(v);
  return *this;
}
JsonLine& JsonLine::add(const std::string& k, double v) {
  key(k);
  body_ += std::isfinite(v) ? strfmt("%.9g", v) : std::string("null");
  return *this;
}
JsonLine& JsonLine::add(const std::string& k, bool v) {
  key(k);
  body_ += v ? "true" : "false";
  return *this;
}
JsonLine& JsonLine::add(const std::string& k, const std::string& v) {
  key(k);
  std::string e;
  for (char c : v) {
    if (c == '"' || c == '\\') e += '\\';
    if (c == '\n') { e += "\\n"; continue; }
    e += c;
  }
  body_ += "\"" + e + "\"";
  return *this;
}

MetricsWriter::MetricsWriter(const std::string& path, bool append) {
  if (path.empty()) return;
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (!f_) throw Error("cannot open metrics file '" + path + "' for writing");
}
MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}
void MetricsWriter::write(const JsonLine& line) {
  if (!f_) return;
  const std::string s = line.str() + "\n";
  std::fputs(s.c_str(), f_);
  std::fflush(f_);
}

}  // namespace reformer
