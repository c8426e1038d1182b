// The one logger of library code, and the JSON-lines metrics file.
//
// Library code never writes to stdout directly: it calls log_info, which
// writes on rank 0 only (set_log_rank) to the current sink (stdout unless a
// test or program installs another).
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

namespace reformer {

void log_info(const std::string& line);
void set_log_rank(int rank);
void set_log_sink(std::function<void(const std::string&)> sink);  // nullptr: stdout
// Every rank also appends its own lines (rank 0's included) to `path`
// (logging.per_rank). Throws Error when the file cannot be opened.
void set_rank_log_file(const std::string& path);

// printf-style formatting into a std::string.
std::string strfmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Builds one JSON object; numbers are written with enough digits to compare
// runs bit for bit (%.9g for float-valued metrics, %.17g for doubles).
class JsonLine {
 public:
  JsonLine& add(const std::string& key, int64_t v);
  JsonLine& add(const std::string& key, double v);
  JsonLine& add(const std::string& key, bool v);
  JsonLine& add(const std::string& key, const std::string& v);
  std::string str() const { return "{" + body_ + "}"; }

 private:
  void key(const std::string& k);
  std::string body_;
};

// Removes from a metrics file the lines of steps after `step` (written by a
// run that was killed after its last checkpoint), so a resumed run's curve
// stays single-valued. Returns the lines removed (0 when the file does not
// exist). Throws Error when the file cannot be rewritten.
int64_t drop_metrics_after(const std::string& path, int64_t step);

// Appends JSON lines to a file, flushed after each line. A failed write
// (full disk) is reported once through log_info and training goes on. An empty path is a
// writer that drops everything. Throws Error when the file cannot be opened.
class MetricsWriter {
 public:
  MetricsWriter() = default;
  explicit MetricsWriter(const std::string& path, bool append);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  void write(const JsonLine& line);

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
  bool failed_ = false;
};

}  // namespace reformer
