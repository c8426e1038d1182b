#include "framework/logging.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
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

MetricsWriter::MetricsWriter(const std::string& path, bool append) : path_(path) {
  if (path.empty()) return;
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (!f_) throw Error("cannot open metrics file '" + path + "' for writing");
}

int64_t drop_metrics_after(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return 0;
  std::string kept, line;
  int64_t dropped = 0;
  const std::string key = "{\"step\": ";
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0 && std::strtoll(line.c_str() + key.size(), nullptr, 10) > step) {
      ++dropped;
      continue;
    }
    kept += line + "\n";
  }
  in.close();
  if (dropped == 0) return 0;
  const std::string tmp = path + ".tmp";
  std::ofstream out(tmp, std::ios::trunc);
  out << kept;
  out.close();
  if (!out || std::rename(tmp.c_str(), path.c_str()) != 0)
    throw Error("cannot rewrite metrics file '" + path + "' without the lines past step " +
                std::to_string(step));
  return dropped;
}
MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}
void MetricsWriter::write(const JsonLine& line) {
  if (!f_) return;
  const std::string s = line.str() + "\n";
  const bool ok = std::fputs(s.c_str(), f_) >= 0 && std::fflush(f_) == 0;
  if (!ok && !failed_) {
    failed_ = true;
    log_info("metrics: writing " + path_ + " failed (" + std::strerror(errno) +
             "); training goes on, later lines may be missing");
  }
}

}  // namespace reformer
