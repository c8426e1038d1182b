#include "framework/plot.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "framework/logging.h"
#include "kernels/errors.h"

namespace reformer {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ------------------------------------------------------------------ parsing

// One line's numbers; NaN where the line has null, a non-finite number or
// no such key.
struct Entry {
  double tokens = kNaN, loss = kNaN, bpc = kNaN, tokens_per_s = kNaN, elapsed = kNaN;
};

// The number at `key` of `line`: nullopt when absent, NaN when null. Reads
// nan / inf as well; anything else that is not a number is a DataError.
std::optional<double> number(const YAML::Node& line, const char* key, const std::string& where) {
  const YAML::Node v = line[key];
  if (!v) return std::nullopt;
  if (v.IsNull()) return kNaN;
  if (v.IsScalar()) {
    const std::string& s = v.Scalar();
    char* end = nullptr;
    const double x = std::strtod(s.c_str(), &end);
    if (!s.empty() && end == s.c_str() + s.size()) return x;
  }
  throw DataError(where + ": \"" + key + "\" is not a number");
}

double number_or_nan(const YAML::Node& line, const char* key, const std::string& where) {
  return number(line, key, where).value_or(kNaN);
}

// The first of `keys` the line carries, else NaN.
double first_number(const YAML::Node& line, std::initializer_list<const char*> keys,
                    const std::string& where) {
  for (const char* k : keys)
    if (const auto x = number(line, k, where)) return *x;
  return kNaN;
}

bool is_eval_line(const YAML::Node& line) {
  const YAML::Node v = line["eval"];
  return v && v.IsScalar() && v.Scalar() == "true";
}

// Tokens seen at `step` estimated from the train line nearest before it (else
// the first after it) that has tokens: tokens grow in proportion to steps.
double estimate_tokens(const std::map<int64_t, Entry>& train, int64_t step) {
  const std::map<int64_t, Entry>::value_type* best = nullptr;
  for (const auto& kv : train) {
    if (kv.first <= 0 || !std::isfinite(kv.second.tokens)) continue;
    if (kv.first <= step || !best) best = &kv;
    if (kv.first > step) break;
  }
  return best ? double(step) * best->second.tokens / double(best->first) : kNaN;
}

PlotSeries series(std::string name, std::string label, const std::map<int64_t, Entry>& entries,
                  double Entry::*value) {
  PlotSeries s{std::move(name), std::move(label), {}};
  for (const auto& [step, e] : entries) s.points.push_back({step, e.tokens, e.*value, e.elapsed});
  return s;
}

// Makes elapsed seconds run on across restarts: in step order (a step's
// train line before its eval line, as the trainer writes them), where the
// seconds fall below those of the line before, the seconds reached before the
// fall are added to that line and every later one.
void join_restarts(std::map<int64_t, Entry>& train, std::map<int64_t, Entry>& eval) {
  std::vector<double*> order;
  auto t = train.begin();
  auto e = eval.begin();
  while (t != train.end() || e != eval.end()) {
    const bool take_train = e == eval.end() || (t != train.end() && t->first <= e->first);
    order.push_back(take_train ? &(t++)->second.elapsed : &(e++)->second.elapsed);
  }
  double offset = 0, last = kNaN;  // `last`: the previous finite seconds as written
  for (double* x : order) {
    if (!std::isfinite(*x)) continue;
    if (*x < last) offset += last;
    last = *x;
    *x += offset;
  }
}

// The curves of metrics lines fed one by one.
class CurveBuilder {
 public:
  // Adds line `number` of `source` (DataError naming both when it does not read).
  void add(std::string line, int64_t number, const std::string& source);
  RunCurves curves(const std::string& title) const;

 private:
  std::map<int64_t, Entry> train_, eval_;  // by step; a later line replaces an earlier one
  bool has_bpc_ = false;
  int64_t lines_ = 0, repeated_ = 0;
};

void CurveBuilder::add(std::string line, int64_t number_of_line, const std::string& source) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  const size_t first = line.find_first_not_of(" \t");
  if (first == std::string::npos) return;
  const std::string where = source + " line " + std::to_string(number_of_line);
  const std::string shown = line.size() > 60 ? line.substr(0, 60) + "..." : line;
  YAML::Node n;
  try {
    n = YAML::Load(line);
  } catch (const YAML::Exception& e) {
    throw DataError(where + ": not a JSON object (" + e.msg + "): " + shown);
  }
  if (line[first] != '{' || !n.IsMap()) throw DataError(where + ": not a JSON object: " + shown);
  const auto step = number(n, "step", where);
  if (!step || !std::isfinite(*step) || *step < 0 || *step != std::floor(*step) || *step > 1e15)
    throw DataError(where + ": no \"step\" that is a whole number >= 0: " + shown);
  ++lines_;
  const bool is_eval = is_eval_line(n);
  Entry e;
  e.tokens = first_number(n, {"tokens_seen", "tokens"}, where);
  e.loss = number_or_nan(n, is_eval ? "eval_loss" : "loss", where);
  const auto bpc = number(n, is_eval ? "eval_bpc" : "bpc", where);
  has_bpc_ = has_bpc_ || bpc.has_value();
  e.bpc = bpc.value_or(kNaN);
  if (!is_eval) e.tokens_per_s = number_or_nan(n, "tokens_per_s", where);
  e.elapsed = number_or_nan(n, "elapsed_s", where);
  auto& kind = is_eval ? eval_ : train_;
  repeated_ += int64_t(kind.count(int64_t(*step)));
  kind[int64_t(*step)] = e;
}

RunCurves CurveBuilder::curves(const std::string& title) const {
  RunCurves c;
  c.title = title;
  c.lines = lines_;
  c.repeated = repeated_;
  std::map<int64_t, Entry> train = train_, eval = eval_;
  for (auto& [step, e] : eval)
    if (!std::isfinite(e.tokens)) e.tokens = estimate_tokens(train_, step);
  join_restarts(train, eval);
  c.quantity = has_bpc_ ? "bpc" : "loss";
  double Entry::*q = has_bpc_ ? &Entry::bpc : &Entry::loss;
  c.train = series("train-" + c.quantity, "train " + c.quantity, train, q);
  c.eval = series("eval-" + c.quantity, "eval " + c.quantity, eval, q);
  c.throughput = series("tokens-per-s", "train tokens/s", train, &Entry::tokens_per_s);
  return c;
}

std::string file_name(const std::string& path) { return std::filesystem::path(path).filename().string(); }

}  // namespace

int64_t PlotSeries::finite_points(PlotX x) const {
  return std::count_if(points.begin(), points.end(), [&](const PlotPoint& p) {
    return std::isfinite(p.value) && (x != PlotX::tokens || std::isfinite(p.tokens)) &&
           (x != PlotX::elapsed || std::isfinite(p.elapsed));
  });
}

int64_t PlotSeries::finite_points(bool by_tokens) const {
  return finite_points(by_tokens ? PlotX::tokens : PlotX::steps);
}

RunCurves parse_metrics(const std::string& text, const std::string& source) {
  CurveBuilder b;
  std::istringstream in(text);
  std::string line;
  for (int64_t number_of_line = 1; std::getline(in, line); ++number_of_line)
    b.add(std::move(line), number_of_line, source);
  return b.curves(source);
}

RunCurves read_metrics(const std::string& path) { return MetricsFollower(path).update(); }

struct MetricsFollower::State {
  CurveBuilder builder;
  std::streamoff offset = 0;  // bytes of the file read (whole lines)
  int64_t lines_read = 0;     // lines of the file read, blank ones included
};

MetricsFollower::MetricsFollower(std::string path)
    : path_(std::move(path)), state_(std::make_unique<State>()) {}
MetricsFollower::~MetricsFollower() = default;

RunCurves MetricsFollower::update() {
  std::ifstream in(path_, std::ios::binary);
  if (!in) throw DataError("cannot open metrics file '" + path_ + "'");
  in.seekg(0, std::ios::end);
  if (in.tellg() < state_->offset) *state_ = State{};  // rewritten shorter: read it again
  in.seekg(state_->offset);
  std::ostringstream tail;
  tail << in.rdbuf();
  if (in.bad()) throw DataError("cannot read metrics file '" + path_ + "'");
  const std::string text = tail.str();
  size_t begin = 0;
  for (size_t end; (end = text.find('\n', begin)) != std::string::npos; begin = end + 1) {
    state_->builder.add(text.substr(begin, end - begin), state_->lines_read + 1, path_);
    ++state_->lines_read;
    state_->offset += std::streamoff(end + 1 - begin);
  }
  // A last line without its newline: a whole file may end so; in a file
  // being written it may be half a line, left out until it reads.
  State at_end = *state_;
  if (begin < text.size()) {
    try {
      at_end.builder.add(text.substr(begin), state_->lines_read + 1, path_);
    } catch (const DataError&) {
      at_end = *state_;
    }
  }
  return at_end.builder.curves(file_name(path_));
}

// ------------------------------------------------------------------ rendering

namespace {

// Page geometry, in SVG user units (pixels).
constexpr double kWidth = 900;       // page width
constexpr double kTitleH = 50;       // band above the panels
constexpr double kPanelH = 290;      // one panel, caption and axis labels included
constexpr double kLeft = 85, kRight = 25, kTop = 35, kBottom = 50;  // plot area inside a panel

struct Axis {
  double lo = 0, hi = 1, step = 0.2;  // range [lo, hi], ticks every `step` from lo
};

// A tick spacing of 1, 2 or 5 times a power of ten giving about `target`
// intervals over `span`.
double nice_step(double span, int target) {
  const double raw = span / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

// The axis over data in [lo, hi] (lo > hi: no data): widened to whole ticks,
// from 0 when `from_zero` and the data are positive, ticks at least 1 apart
// when `integer`; a single value gets room around it.
Axis nice_axis(double lo, double hi, bool from_zero, bool integer) {
  if (!(lo <= hi)) lo = 0, hi = 1;
  if (from_zero) lo = std::min(lo, 0.0);
  if (hi - lo <= std::max(std::abs(hi), std::abs(lo)) * 1e-12) {
    const double pad = integer ? 1.0 : (lo == 0 ? 1.0 : std::abs(lo) * 0.1);
    hi += pad;
    if (!(from_zero && lo == 0)) lo -= pad;
  }
  Axis a;
  a.step = nice_step(hi - lo, 5);
  if (integer) a.step = std::max(a.step, 1.0);
  a.lo = std::floor(lo / a.step + 1e-9) * a.step;
  a.hi = std::ceil(hi / a.step - 1e-9) * a.step;
  return a;
}

// A tick's label: K/M/G for large ranges, as many decimals as the spacing needs.
std::string tick_label(double v, const Axis& a) {
  const double big = std::max(std::abs(a.lo), std::abs(a.hi));
  double scale = 1;
  const char* suffix = "";
  if (big >= 1e9) scale = 1e9, suffix = "G";
  else if (big >= 1e6) scale = 1e6, suffix = "M";
  else if (big >= 1e4) scale = 1e3, suffix = "K";
  const double s = a.step / scale;
  const int decimals = s >= 1 ? 0 : std::min(9, int(std::ceil(-std::log10(s) - 1e-9)));
  if (std::abs(v) < a.step * 1e-9) return "0";
  return strfmt("%.*f%s", decimals, v / scale, suffix);
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += ch;
    }
  }
  return out;
}

// One curve of a panel.
struct Curve {
  const PlotSeries* series;
  std::string id;      // the polyline's id
  std::string kind;    // its class: train, eval or throughput
  std::string legend;  // its legend text
  std::string color;
  std::string style;   // further stroke attributes, on the polyline and its legend line
  bool markers;        // a dot at every point (eval curves have few)
};

// One panel: the plot area, ticks, labels, curves and legend.
struct Panel {
  std::string caption, x_label, y_label;
  PlotX x = PlotX::steps;
  bool y_from_zero = false;
  std::vector<Curve> curves;
};

double x_of(const PlotPoint& p, PlotX x) {
  return x == PlotX::tokens ? p.tokens : x == PlotX::elapsed ? p.elapsed / 60 : double(p.step);
}

bool drawn(const PlotPoint& p, PlotX x) { return std::isfinite(p.value) && std::isfinite(x_of(p, x)); }

// Draws `panel` at `y0` on the page, `height` tall.
void render_panel(std::string& out, const Panel& panel, int index, double y0, double height) {
  double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
  for (const Curve& c : panel.curves)
    for (const PlotPoint& p : c.series->points)
      if (drawn(p, panel.x)) {
        xlo = std::min(xlo, x_of(p, panel.x));
        xhi = std::max(xhi, x_of(p, panel.x));
        ylo = std::min(ylo, p.value);
        yhi = std::max(yhi, p.value);
      }
  const bool empty = !(xlo <= xhi);
  const Axis xa = nice_axis(xlo, xhi, /*from_zero*/ true, /*integer*/ panel.x == PlotX::steps);
  const Axis ya = nice_axis(ylo, yhi, panel.y_from_zero, /*integer*/ false);
  const double left = kLeft, right = kWidth - kRight, top = y0 + kTop, bottom = y0 + height - kBottom;
  auto X = [&](double v) { return left + (v - xa.lo) / (xa.hi - xa.lo) * (right - left); };
  auto Y = [&](double v) { return bottom - (v - ya.lo) / (ya.hi - ya.lo) * (bottom - top); };

  out += strfmt("<g id=\"panel-%d\" class=\"panel\">\n", index);
  out += strfmt("<text x=\"%.1f\" y=\"%.1f\" font-size=\"15\" font-weight=\"bold\">%s</text>\n", left,
                top - 12, xml_escape(panel.caption).c_str());
  out += strfmt("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
                "stroke=\"#444\"/>\n", left, top, right - left, bottom - top);
  // Ticks with grid lines and labels; the count is bounded by nice_step's target.
  for (int k = 0; xa.lo + k * xa.step <= xa.hi + xa.step * 1e-9; ++k) {
    const double v = xa.lo + k * xa.step, x = X(v);
    out += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x,
                  top, x, bottom);
    out += strfmt("<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\">%s</text>\n",
                  x, bottom + 16, tick_label(v, xa).c_str());
  }
  for (int k = 0; ya.lo + k * ya.step <= ya.hi + ya.step * 1e-9; ++k) {
    const double v = ya.lo + k * ya.step, y = Y(v);
    out += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left,
                  y, right, y);
    out += strfmt("<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"end\">%s</text>\n",
                  left - 6, y + 4, tick_label(v, ya).c_str());
  }
  out += strfmt("<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\">%s</text>\n",
                (left + right) / 2, bottom + 38, xml_escape(panel.x_label).c_str());
  out += strfmt("<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\" "
                "transform=\"rotate(-90 %.1f %.1f)\">%s</text>\n", left - 60, (top + bottom) / 2,
                left - 60, (top + bottom) / 2, xml_escape(panel.y_label).c_str());
  if (empty)
    out += strfmt("<text x=\"%.1f\" y=\"%.1f\" font-size=\"14\" text-anchor=\"middle\" "
                  "fill=\"#888\">no data</text>\n", (left + right) / 2, (top + bottom) / 2);

  // Curves, then the legend over them (top right, on a white ground, as wide
  // as its longest text at about 7 units a character).
  size_t longest = 0;
  for (const Curve& c : panel.curves) longest = std::max(longest, c.legend.size());
  const double legend_w = std::max(150.0, 40.0 + 7.0 * double(longest));
  const double lx = right - legend_w - 10;
  std::string legend;
  int legend_rows = 0;
  for (const Curve& c : panel.curves) {
    const int64_t n = c.series->finite_points(panel.x);
    if (n == 0) continue;
    std::string pts, dots;
    for (const PlotPoint& p : c.series->points) {
      if (!drawn(p, panel.x)) continue;
      const double x = X(x_of(p, panel.x)), y = Y(p.value);
      pts += strfmt("%s%.2f,%.2f", pts.empty() ? "" : " ", x, y);
      if (c.markers || n == 1)
        dots += strfmt("<circle cx=\"%.2f\" cy=\"%.2f\" r=\"3\" fill=\"%s\"/>\n", x, y, c.color.c_str());
    }
    out += strfmt("<polyline id=\"%s\" class=\"series %s\" fill=\"none\" stroke=\"%s\" "
                  "stroke-width=\"1.8\" stroke-linejoin=\"round\"%s points=\"%s\"/>\n",
                  c.id.c_str(), c.kind.c_str(), c.color.c_str(), c.style.c_str(), pts.c_str());
    out += dots;
    const double ly = top + 22 + 18 * legend_rows++;
    legend += strfmt("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                     "stroke-width=\"3\"%s/>\n", lx, ly - 4, lx + 24, ly - 4, c.color.c_str(),
                     c.style.c_str());
    legend += strfmt("<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\">%s</text>\n", lx + 30, ly,
                     xml_escape(c.legend).c_str());
  }
  if (legend_rows > 0)
    out += strfmt("<g class=\"legend\">\n<rect x=\"%.1f\" y=\"%.1f\" width=\"%.0f\" height=\"%d\" "
                  "fill=\"white\" fill-opacity=\"0.85\" stroke=\"#bbb\"/>\n%s</g>\n",
                  lx - 8, top + 6, legend_w, 18 * legend_rows + 6, legend.c_str());
  out += "</g>\n";
}

// The steps of the points of `s` a panel skips, for the <desc>.
std::string skipped_steps(const PlotSeries& s, int64_t& count) {
  std::string steps;
  int64_t n = 0;
  for (const PlotPoint& p : s.points) {
    if (drawn(p, PlotX::steps)) continue;
    if (++n <= 8) steps += (steps.empty() ? "" : ", ") + std::to_string(p.step);
  }
  count += n;
  if (n > 8) steps += ", ...";
  return n == 0 ? "" : strfmt("%s: %lld (steps %s)", s.label.c_str(), (long long)n, steps.c_str());
}

// Points of `c`'s train and eval curves with a finite value but no `x`.
int64_t without_x(const RunCurves& c, PlotX x) {
  int64_t n = 0;
  for (const PlotSeries* s : {&c.train, &c.eval})
    for (const PlotPoint& p : s->points) n += std::isfinite(p.value) && !std::isfinite(x_of(p, x));
  return n;
}

// What the <desc> says of one run; `elapsed_panel`: whether the page has the wall-clock panel.
std::string description(const RunCurves& c, bool elapsed_panel) {
  std::string d = strfmt("%s: %lld metrics lines; %zu train points, %zu eval points, %s.",
                         c.title.c_str(), (long long)c.lines, c.train.points.size(),
                         c.eval.points.size(), c.quantity.c_str());
  int64_t skipped = 0;
  std::string which;
  for (const PlotSeries* s : {&c.train, &c.eval, &c.throughput}) {
    const std::string w = skipped_steps(*s, skipped);
    if (!w.empty()) which += (which.empty() ? "" : "; ") + w;
  }
  d += skipped == 0 ? " No point skipped."
                    : strfmt(" Skipped %lld points whose value is not finite or absent: %s.",
                             (long long)skipped, which.c_str());
  if (const int64_t n = without_x(c, PlotX::tokens))
    d += strfmt(" %lld points without tokens seen are left out of the tokens panel.", (long long)n);
  if (const int64_t n = elapsed_panel ? without_x(c, PlotX::elapsed) : 0)
    d += strfmt(" %lld points without elapsed_s are left out of the wall-clock panel.", (long long)n);
  if (c.repeated > 0)
    d += strfmt(" %lld lines repeated a step; the last line of each step is drawn.",
                (long long)c.repeated);
  return d;
}

// Colours of runs overlaid, in order (then again from the first).
constexpr const char* kRunColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                      "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};

// The page of `runs` named `labels` (one each). `overlay`: ids prefixed with
// "run<k>-", legends with the label, and one colour per run; else the
// single-run page of runs[0].
std::string render_page(const std::vector<RunCurves>& runs, const std::vector<std::string>& labels,
                        const std::string& title, bool overlay) {
  std::string q = runs.empty() ? "loss" : runs[0].quantity;
  for (const RunCurves& c : runs)
    if (c.quantity != q) q = "bpc or loss";
  if (q.empty()) q = "loss";
  const std::string y_label = q == "bpc"    ? "bits per character"
                              : q == "loss" ? "loss (nats)"
                                            : "bits per character, else loss (nats)";
  bool any_elapsed = false;
  for (const RunCurves& c : runs)
    for (const PlotSeries* s : {&c.train, &c.eval})
      for (const PlotPoint& p : s->points) any_elapsed = any_elapsed || std::isfinite(p.elapsed);
  Panel panels[4] = {
      {q + " against steps", "step", y_label, PlotX::steps, false, {}},
      {q + " against tokens seen", "tokens seen", y_label, PlotX::tokens, false, {}},
      {"throughput", "step", "tokens/s", PlotX::steps, true, {}},
      {q + " against wall-clock time", "minutes of training", y_label, PlotX::elapsed, false, {}},
  };
  const char* suffix[4] = {"", "-tokens", "", "-elapsed"};
  for (size_t k = 0; k < runs.size(); ++k) {
    const RunCurves& c = runs[k];
    const std::string prefix = overlay ? strfmt("run%zu-", k + 1) : "";
    const std::string who = overlay ? labels[k] + " " : "";
    const std::string color = kRunColors[k % std::size(kRunColors)];
    // Overlaid, a run's train curve is its colour made faint and its eval curve full.
    const Curve train{&c.train, "", "train", overlay ? who + "train" : c.train.label,
                      overlay ? color : "#1f77b4", overlay ? " stroke-opacity=\"0.45\"" : "", false};
    const Curve eval{&c.eval, "", "eval", overlay ? who + "eval" : c.eval.label,
                     overlay ? color : "#d62728", "", true};
    for (int i : {0, 1, 3}) {
      panels[i].curves.push_back(train);
      panels[i].curves.back().id = prefix + c.train.name + suffix[i];
      panels[i].curves.push_back(eval);
      panels[i].curves.back().id = prefix + c.eval.name + suffix[i];
    }
    panels[2].curves.push_back({&c.throughput, prefix + c.throughput.name, "throughput",
                                overlay ? who + "tokens/s" : c.throughput.label,
                                overlay ? color : "#2ca02c", "", false});
  }
  const int n_panels = any_elapsed ? 4 : 3;
  // A panel is tall enough for a legend row per curve.
  size_t rows = 0;
  for (int i = 0; i < n_panels; ++i) rows = std::max(rows, panels[i].curves.size());
  const double panel_h = std::max(kPanelH, kTop + kBottom + 60 + 18.0 * double(rows));
  const double height = kTitleH + n_panels * panel_h;
  std::string out = strfmt(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
      "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\">\n",
      kWidth, height, kWidth, height);
  out += "<title>" + xml_escape(title) + "</title>\n";
  std::string desc;
  for (size_t k = 0; k < runs.size(); ++k) {
    if (overlay) desc += strfmt("%srun%zu (%s), ", k ? " " : "", k + 1, labels[k].c_str());
    desc += description(runs[k], any_elapsed);
  }
  if (!any_elapsed) desc += " No line carries elapsed_s: no wall-clock panel.";
  out += "<desc>" + xml_escape(desc) + "</desc>\n";
  out += strfmt("<rect width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", kWidth, height);
  out += strfmt("<text x=\"%.1f\" y=\"32\" font-size=\"20\" text-anchor=\"middle\">%s</text>\n",
                kWidth / 2, xml_escape(title).c_str());
  for (int i = 0; i < n_panels; ++i) render_panel(out, panels[i], i, kTitleH + i * panel_h, panel_h);
  out += "</svg>\n";
  return out;
}

std::string stem(const std::string& title) { return std::filesystem::path(title).stem().string(); }

// `path` without its ".jsonl" extension; as it is when it has another or is only ".jsonl".
std::string without_jsonl(const std::string& path) {
  const std::string ext = ".jsonl";
  const bool has = path.size() > ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0;
  return has ? path.substr(0, path.size() - ext.size()) : path;
}

}  // namespace

std::string render_svg(const RunCurves& c) { return render_page({c}, {c.title}, c.title, false); }

std::string render_svg(const std::vector<RunCurves>& runs, const std::vector<std::string>& labels) {
  if (!labels.empty() && labels.size() != runs.size())
    throw ConfigError(strfmt("%zu plot labels for %zu runs: give one label per metrics file",
                             labels.size(), runs.size()));
  std::vector<std::string> names = labels;
  if (names.empty())
    for (const RunCurves& c : runs) names.push_back(stem(c.title));
  if (runs.size() == 1) return render_page(runs, names, labels.empty() ? runs[0].title : names[0], false);
  std::string title;
  for (const std::string& n : names) title += (title.empty() ? "" : " vs ") + n;
  return render_page(runs, names, title, true);
}

std::string plot_path_for(const std::string& metrics_path) { return without_jsonl(metrics_path) + ".svg"; }

void write_plot(const std::string& metrics_path, const std::string& svg_path) {
  write_svg(render_svg(read_metrics(metrics_path)), svg_path);
}

void write_plot(const std::vector<std::string>& metrics_paths, const std::vector<std::string>& labels,
                const std::string& svg_path) {
  if (!labels.empty() && labels.size() != metrics_paths.size())
    throw ConfigError(strfmt("%zu plot labels for %zu metrics files: give one label per file",
                             labels.size(), metrics_paths.size()));
  std::vector<RunCurves> runs;
  std::vector<std::string> names = labels;
  for (const std::string& path : metrics_paths) {
    runs.push_back(read_metrics(path));
    if (labels.empty()) names.push_back(stem(path));
  }
  // Stems alike (runs/a/m.jsonl, runs/b/m.jsonl): the paths tell the runs apart.
  if (labels.empty() && std::set<std::string>(names.begin(), names.end()).size() < names.size())
    for (size_t k = 0; k < names.size(); ++k) names[k] = without_jsonl(metrics_paths[k]);
  write_svg(render_svg(runs, names), svg_path);
}

void write_svg(const std::string& svg, const std::string& svg_path) {
  const std::string tmp = svg_path + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  out << svg;
  out.close();
  if (!out || std::rename(tmp.c_str(), svg_path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("cannot write the plot '" + svg_path + "'");
  }
}

}  // namespace reformer
