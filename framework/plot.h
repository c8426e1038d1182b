// Curves of a training run as one self-contained SVG file, read from the
// JSON-lines metrics file that `reformer train --metrics` writes
// (framework/logging.h). No plotting library: the SVG is written as text.
//
// Panels: training and evaluation loss against steps, the same against
// tokens seen, throughput (tokens/s) against steps, and the loss against
// wall-clock minutes (elapsed_s) where the lines carry it. The loss is drawn in
// bits per character (bpc) where the lines carry it, else as the natural-log
// loss. Several metrics files can be drawn overlaid, one colour per run, to
// compare runs (also runs of other systems written with the same keys).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace reformer {

// One point of a curve. A value that is not finite (written as null, or as
// nan/inf) is kept here and skipped when drawn.
struct PlotPoint {
  int64_t step = 0;  // optimizer steps taken
  double tokens = 0;  // tokens seen by then; NaN where neither the line nor a train line says
  double value = 0;   // the curve's quantity at that step
  double elapsed = 0; // seconds of training by then (elapsed_s); NaN where the line has none
};

// What a panel's x axis is: optimizer steps, tokens seen, or wall-clock
// minutes (PlotPoint::elapsed / 60).
enum class PlotX { steps, tokens, elapsed };

// A curve, ordered by step, one point per step (a later line for a step
// replaces an earlier one: a resumed run may repeat steps).
struct PlotSeries {
  std::string name;   // SVG id of its polyline in the steps panel, e.g. "train-bpc"
  std::string label;  // legend text, e.g. "train bpc"
  std::vector<PlotPoint> points;

  // Points whose value and x are finite: the ones a panel against `x` draws.
  int64_t finite_points(PlotX x) const;
  // finite_points(PlotX::tokens) with `by_tokens`, else finite_points(PlotX::steps).
  int64_t finite_points(bool by_tokens) const;
};

// What one metrics file gives to plot.
struct RunCurves {
  std::string title;       // the metrics file's name, shown at the top
  std::string quantity;    // "bpc" or "loss": the y of the train and eval curves
  PlotSeries train;        // from lines without "eval": true
  PlotSeries eval;         // from lines with "eval": true (empty when none)
  PlotSeries throughput;   // tokens_per_s of the train lines
  int64_t lines = 0;       // non-blank lines read
  int64_t repeated = 0;    // lines replaced by a later line for the same step and kind
};

// Parses the metrics text `text` read from `source` (named in errors and the
// title). Every non-blank line must be one JSON object with an integer
// "step"; train lines give "bpc" (or "loss"), "tokens_seen" (or "tokens") and
// "tokens_per_s"; eval lines ("eval": true) give "eval_bpc" (or "eval_loss")
// and, when they carry it, "tokens_seen" (else it is estimated from the
// nearest train line, tokens growing in proportion to steps). Both kinds may
// give "elapsed_s", seconds since the training loop started; a resumed run
// starts counting again, so where elapsed_s falls from one line to the next
// in step order the seconds before the fall are added to the lines after it
// (the run's training time, the pause between its processes left out). Any
// of these keys may be absent: the points just lack that x. Other keys are
// ignored. Throws DataError naming `source` and the line number for a line
// that is not a JSON object or whose step or numbers do not read.
RunCurves parse_metrics(const std::string& text, const std::string& source);

// parse_metrics of the file at `path`, titled with its file name; DataError
// when it cannot be read. A last line without its newline is read where it
// reads, else left out (a line still being written by a running training).
RunCurves read_metrics(const std::string& path);

// Reads a metrics file as it grows (the trainer redraws its plot after every
// evaluation): update() parses only the whole lines appended since the
// previous call, so a long run's redraw costs its new lines rather than the
// whole file. A file that shrank (rewritten) is read again from its start.
class MetricsFollower {
 public:
  explicit MetricsFollower(std::string path);
  ~MetricsFollower();
  MetricsFollower(const MetricsFollower&) = delete;
  MetricsFollower& operator=(const MetricsFollower&) = delete;
  // The curves of the file so far, as read_metrics gives them; throws as it
  // does (a bad line is met again by every later call).
  RunCurves update();

 private:
  struct State;
  std::string path_;
  std::unique_ptr<State> state_;
};

// The SVG document of `curves`: a root <svg> with three panels (four when
// some line carries elapsed_s), axes with ticks at round values, a legend per
// panel, one <polyline> per non-empty curve and panel with ids
// "<train|eval>-<quantity>" (steps), "<train|eval>-<quantity>-tokens"
// (tokens), "tokens-per-s" (throughput) and "<train|eval>-<quantity>-elapsed"
// (wall clock), and a <desc> that says how many points were skipped as not
// finite and how many lines repeated a step. Never throws for any `curves`.
std::string render_svg(const RunCurves& curves);

// Several runs overlaid on the same panels, one colour per run; legend
// entries "<label> train" and "<label> eval" ("<label> tokens/s" for
// throughput). `labels` holds one label per run, or is empty for each run's
// file stem (its title without the extension). Polyline ids are those of
// render_svg(curves) prefixed with "run<k>-", k = 1, 2, ... the run's place in
// `runs` (e.g. "run1-eval-bpc", "run2-train-bpc-tokens", "run2-tokens-per-s",
// "run1-eval-bpc-elapsed"): labels are free text, so ids never carry them.
// With one run it is render_svg(runs[0]) (the single-run ids), titled with the
// label when one is given. The wall-clock panel is drawn when a line of any
// run carries elapsed_s. Throws ConfigError when `labels` is neither empty nor
// one per run; never otherwise.
std::string render_svg(const std::vector<RunCurves>& runs, const std::vector<std::string>& labels);

// Where the plot of a metrics file goes by default: `metrics_path` with its
// ".jsonl" extension replaced by ".svg" (".svg" appended when it has another).
std::string plot_path_for(const std::string& metrics_path);

// Writes `svg` to `svg_path` atomically (a temporary file renamed over it),
// so a viewer never sees half a plot. Throws Error when it cannot.
void write_svg(const std::string& svg, const std::string& svg_path);

// Reads the metrics file and writes its SVG to `svg_path` (write_svg).
// Throws DataError for the metrics file, Error when the SVG cannot be written.
void write_plot(const std::string& metrics_path, const std::string& svg_path);

// Reads every metrics file and writes their overlay (render_svg of the runs)
// to `svg_path`. Empty `labels`: each file's stem, or, when two files share a
// stem, each path as given without its ".jsonl". Throws as the one-file
// write_plot does, and ConfigError when `labels` is neither empty nor one per
// file.
void write_plot(const std::vector<std::string>& metrics_paths, const std::vector<std::string>& labels,
                const std::string& svg_path);

}  // namespace reformer
