// `reformer plot`: metrics lines parse into the expected curves (last line of
// a repeated step kept, non-finite values skipped and described), the SVG is
// well-formed with one polyline per curve holding exactly the curve's finite
// points, bad lines are DataErrors naming the line, several runs overlay with
// ids per run and a wall-clock panel, and the program draws a real run's
// metrics file.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "framework/plot.h"
#include "kernels/errors.h"

namespace fs = std::filesystem;
using namespace reformer;

namespace {

// Train lines at steps 1, 5, 10 (step 5 written twice, as a resumed run may),
// evaluations at 5 (without tokens_seen, as older files) and 10.
const char* kMetrics =
    "{\"step\": 1, \"loss\": 2.8, \"bpc\": 4.0, \"lr\": 0.0006, \"tokens_per_s\": 14000, \"tokens_seen\": 64}\n"
    "{\"step\": 5, \"loss\": 2.7, \"bpc\": 3.9, \"lr\": 0.003, \"tokens_per_s\": 19000, \"tokens_seen\": 320}\n"
    "\n"
    "{\"step\": 5, \"eval\": true, \"eval_loss\": 2.6, \"eval_bpc\": 3.8, \"eval_tokens\": 60}\n"
    "{\"step\": 5, \"loss\": 2.5, \"bpc\": 3.6, \"lr\": 0.003, \"tokens_per_s\": 18000, \"tokens_seen\": 320}\n"
    "{\"step\": 10, \"loss\": 2.4, \"bpc\": 3.5, \"lr\": 0.002, \"tokens_per_s\": 17000, \"tokens_seen\": 640}\n"
    "{\"step\": 10, \"eval\": true, \"eval_loss\": 2.3, \"eval_bpc\": 3.3, \"eval_tokens\": 60, \"tokens_seen\": 640}\n";

// Checks that `svg` is well-formed as far as this writer's output goes: tags
// nest and close in order, attribute values are quoted, text has only the
// five XML entities, and there is one root element, <svg> with the SVG
// namespace. Returns "" or what is wrong.
std::string xml_problem(const std::string& svg) {
  std::vector<std::string> open;
  int roots = 0;
  size_t i = 0;
  while (i < svg.size()) {
    if (svg[i] == '&') {
      static const std::regex entity("&(amp|lt|gt|quot|apos);");
      if (!std::regex_search(svg.substr(i, 6), entity, std::regex_constants::match_continuous))
        return "bare & at " + std::to_string(i);
      ++i;
      continue;
    }
    if (svg[i] != '<') { ++i; continue; }
    if (svg.compare(i, 2, "<?") == 0) { i = svg.find("?>", i) + 2; continue; }
    if (svg.compare(i, 4, "<!--") == 0) { i = svg.find("-->", i) + 3; continue; }
    // The tag's end: the first '>' outside a quoted attribute value.
    size_t j = i + 1;
    bool quoted = false;
    for (; j < svg.size() && (quoted || svg[j] != '>'); ++j) {
      if (svg[j] == '"') quoted = !quoted;
      if (!quoted && svg[j] == '<') return "'<' inside a tag at " + std::to_string(j);
    }
    if (j == svg.size()) return "unterminated tag at " + std::to_string(i);
    const std::string tag = svg.substr(i + 1, j - i - 1);
    i = j + 1;
    if (tag[0] == '/') {
      if (open.empty() || open.back() != tag.substr(1))
        return "</" + tag.substr(1) + "> closes " + (open.empty() ? "nothing" : "<" + open.back() + ">");
      open.pop_back();
      continue;
    }
    const std::string name = tag.substr(0, tag.find_first_of(" \t\n/"));
    if (open.empty()) {
      if (++roots > 1) return "a second root element <" + name + ">";
      if (name != "svg" || tag.find("xmlns=\"http://www.w3.org/2000/svg\"") == std::string::npos)
        return "the root is not <svg xmlns=...>: <" + tag + ">";
    }
    if (tag.back() != '/') open.push_back(name);
  }
  if (!open.empty()) return "<" + open.back() + "> is never closed";
  return roots == 1 ? "" : "no root element";
}

// id -> number of points of every <polyline> of `svg`.
std::map<std::string, int> polylines(const std::string& svg) {
  std::map<std::string, int> out;
  static const std::regex re("<polyline id=\"([^\"]+)\"[^>]*points=\"([^\"]*)\"");
  for (std::sregex_iterator it(svg.begin(), svg.end(), re), end; it != end; ++it) {
    std::istringstream pts((*it)[2].str());
    int n = 0;
    for (std::string p; pts >> p;) ++n;
    out[(*it)[1].str()] = n;
  }
  return out;
}

// The polylines `svg` must have for `c`: each non-empty curve in the steps,
// tokens and wall-clock panels with its finite points, ids prefixed with `prefix`.
std::map<std::string, int> expected_polylines(const RunCurves& c, const std::string& prefix = "") {
  std::map<std::string, int> out;
  for (const PlotSeries* s : {&c.train, &c.eval}) {
    if (const int64_t n = s->finite_points(PlotX::steps)) out[prefix + s->name] = int(n);
    if (const int64_t n = s->finite_points(PlotX::tokens)) out[prefix + s->name + "-tokens"] = int(n);
    if (const int64_t n = s->finite_points(PlotX::elapsed)) out[prefix + s->name + "-elapsed"] = int(n);
  }
  if (const int64_t n = c.throughput.finite_points(PlotX::steps)) out[prefix + c.throughput.name] = int(n);
  return out;
}

// Runs the program with `args`, its output to `dir`/out.txt; its exit status.
int run_reformer(const fs::path& dir, const std::string& args) {
  const std::string cmd = std::string("env OMP_NUM_THREADS=1 ") + REFORMER_BINARY + " " + args +
                          " > " + (dir / "out.txt").string() + " 2>&1";
  const int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// Our trainer's lines with elapsed_s: train at steps 2, 4, 6, eval at 4 and
// 6, the eval at 6 without elapsed_s.
const char* kTimed =
    "{\"step\": 2, \"bpc\": 4.0, \"tokens_per_s\": 900, \"tokens_seen\": 64, \"elapsed_s\": 30}\n"
    "{\"step\": 4, \"bpc\": 3.5, \"tokens_per_s\": 950, \"tokens_seen\": 128, \"elapsed_s\": 60}\n"
    "{\"step\": 4, \"eval\": true, \"eval_bpc\": 3.4, \"tokens_seen\": 128, \"elapsed_s\": 66}\n"
    "{\"step\": 6, \"bpc\": 3.0, \"tokens_per_s\": 960, \"tokens_seen\": 192, \"elapsed_s\": 90}\n"
    "{\"step\": 6, \"eval\": true, \"eval_bpc\": 2.9, \"tokens_seen\": 192}\n";

// Another system's run in the same keys, without tokens_seen or tokens_per_s:
// train at steps 100, 200, 300, eval at 200 and 300.
const char* kOther =
    "{\"step\": 100, \"loss\": 2.1, \"bpc\": 3.1, \"elapsed_s\": 20.5}\n"
    "{\"step\": 200, \"loss\": 1.9, \"bpc\": 2.8, \"elapsed_s\": 41}\n"
    "{\"step\": 200, \"eval\": true, \"eval_bpc\": 2.85, \"elapsed_s\": 45}\n"
    "{\"step\": 300, \"loss\": 1.7, \"bpc\": 2.5, \"elapsed_s\": 62}\n"
    "{\"step\": 300, \"eval\": true, \"eval_bpc\": 2.6, \"elapsed_s\": 66}\n";

std::string data_error(const std::string& text) {
  try {
    parse_metrics(text, "m.jsonl");
  } catch (const DataError& e) {
    return e.what();
  }
  return "no DataError";
}

}  // namespace

TEST(Plot, ParsesTrainAndEvalLines) {
  const RunCurves c = parse_metrics(kMetrics, "m.jsonl");
  EXPECT_EQ(c.quantity, "bpc");
  EXPECT_EQ(c.lines, 6);
  EXPECT_EQ(c.repeated, 1);  // the second train line of step 5
  ASSERT_EQ(c.train.points.size(), 3u);
  EXPECT_EQ(c.train.name, "train-bpc");
  EXPECT_EQ(c.train.points[1].step, 5);
  EXPECT_EQ(c.train.points[1].value, 3.6);  // the later line of step 5
  EXPECT_EQ(c.train.points[2].tokens, 640);
  ASSERT_EQ(c.eval.points.size(), 2u);
  EXPECT_EQ(c.eval.name, "eval-bpc");
  EXPECT_EQ(c.eval.points[0].value, 3.8);
  EXPECT_EQ(c.eval.points[0].tokens, 320);  // estimated: 64 tokens per step from step 5's train line
  EXPECT_EQ(c.eval.points[1].tokens, 640);  // its own tokens_seen
  ASSERT_EQ(c.throughput.points.size(), 3u);
  EXPECT_EQ(c.throughput.points[0].value, 14000);
}

TEST(Plot, LossWhereTheLinesCarryNoBpc) {
  const RunCurves c = parse_metrics(
      "{\"step\": 2, \"loss\": 1.5, \"tokens\": 10}\n{\"step\": 2, \"eval\": true, \"eval_loss\": 1.25}\n",
      "old.jsonl");
  EXPECT_EQ(c.quantity, "loss");
  ASSERT_EQ(c.train.points.size(), 1u);
  EXPECT_EQ(c.train.points[0].value, 1.5);
  EXPECT_EQ(c.train.points[0].tokens, 10);
  EXPECT_EQ(c.eval.name, "eval-loss");
  EXPECT_EQ(c.eval.points[0].tokens, 10);
}

TEST(Plot, WellFormednessCheckerFindsFaults) {
  const std::string root = "<svg xmlns=\"http://www.w3.org/2000/svg\">";
  EXPECT_EQ(xml_problem(root + "<g><line x1=\"1\"/></g></svg>"), "");
  EXPECT_NE(xml_problem(root + "<g></svg>"), "");
  EXPECT_NE(xml_problem(root + "<text>a & b</text></svg>"), "");
  EXPECT_NE(xml_problem(root + "</svg><svg></svg>"), "");
  EXPECT_NE(xml_problem("<svg></svg>"), "");  // no namespace
  EXPECT_NE(xml_problem(root), "");
}

TEST(Plot, SvgIsWellFormedWithOnePolylinePerCurve) {
  const RunCurves c = parse_metrics(kMetrics, "m.jsonl");
  const std::string svg = render_svg(c);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("<title>m.jsonl</title>"), std::string::npos);
  const std::map<std::string, int> expected = {{"train-bpc", 3}, {"eval-bpc", 2},
                                               {"train-bpc-tokens", 3}, {"eval-bpc-tokens", 2},
                                               {"tokens-per-s", 3}};
  EXPECT_EQ(polylines(svg), expected);
  EXPECT_EQ(expected_polylines(c), expected);
  EXPECT_NE(svg.find("1 lines repeated a step"), std::string::npos);
  EXPECT_NE(svg.find("No point skipped"), std::string::npos);
  EXPECT_EQ(svg.find("id=\"panel-3\""), std::string::npos);  // no elapsed_s: no wall-clock panel
  EXPECT_NE(svg.find("no wall-clock panel"), std::string::npos);
}

TEST(Plot, WallClockPanelWhereLinesCarryElapsed) {
  const RunCurves c = parse_metrics(kTimed, "timed.jsonl");
  EXPECT_EQ(c.train.points[1].elapsed, 60);
  const std::string svg = render_svg(c);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("id=\"panel-3\""), std::string::npos);
  EXPECT_NE(svg.find("minutes of training"), std::string::npos);
  const std::map<std::string, int> expected = {
      {"train-bpc", 3}, {"eval-bpc", 2}, {"train-bpc-tokens", 3}, {"eval-bpc-tokens", 2},
      {"tokens-per-s", 3}, {"train-bpc-elapsed", 3}, {"eval-bpc-elapsed", 1}};
  EXPECT_EQ(polylines(svg), expected);
  EXPECT_EQ(expected_polylines(c), expected);
  EXPECT_NE(svg.find("1 points without elapsed_s are left out of the wall-clock panel"),
            std::string::npos);
}

// A resumed run counts elapsed_s from 0 again: the plot adds the seconds
// reached before, so the wall clock runs on (train before eval at a step).
TEST(Plot, ElapsedRunsOnAcrossARestart) {
  const RunCurves c = parse_metrics(
      "{\"step\": 1, \"bpc\": 4, \"elapsed_s\": 10}\n"
      "{\"step\": 2, \"bpc\": 3, \"elapsed_s\": 20}\n"
      "{\"step\": 2, \"eval\": true, \"eval_bpc\": 3, \"elapsed_s\": 25}\n"
      "{\"step\": 3, \"bpc\": 2, \"elapsed_s\": 4}\n"
      "{\"step\": 4, \"bpc\": 1, \"elapsed_s\": 9}\n"
      "{\"step\": 5, \"bpc\": 1, \"elapsed_s\": 2}\n",
      "resumed.jsonl");
  ASSERT_EQ(c.train.points.size(), 5u);
  EXPECT_EQ(c.train.points[1].elapsed, 20);
  EXPECT_EQ(c.eval.points[0].elapsed, 25);
  EXPECT_EQ(c.train.points[2].elapsed, 29);
  EXPECT_EQ(c.train.points[3].elapsed, 34);
  EXPECT_EQ(c.train.points[4].elapsed, 36);  // a second restart: 25 + 9 before it
}

// Two runs, ours and another system's without tokens: one polyline per run
// and curve with the run's index in its id, the other run left out of the
// tokens and throughput panels, legends named by the labels.
TEST(Plot, TwoRunsOverlaid) {
  const std::vector<RunCurves> runs = {parse_metrics(kTimed, "ours.jsonl"),
                                       parse_metrics(kOther, "dir/theirs.jsonl")};
  const std::string svg = render_svg(runs, {});
  EXPECT_EQ(xml_problem(svg), "");
  std::map<std::string, int> expected = expected_polylines(runs[0], "run1-");
  const std::map<std::string, int> second = expected_polylines(runs[1], "run2-");
  expected.insert(second.begin(), second.end());
  EXPECT_EQ(polylines(svg), expected);
  EXPECT_EQ(expected.size(), 7u + 4u);
  EXPECT_EQ(expected.at("run1-eval-bpc"), 2);
  EXPECT_EQ(expected.at("run2-train-bpc"), 3);
  EXPECT_EQ(expected.at("run2-eval-bpc-elapsed"), 2);
  EXPECT_EQ(expected.count("run2-train-bpc-tokens"), 0u);  // no tokens_seen
  EXPECT_EQ(expected.count("run2-tokens-per-s"), 0u);
  EXPECT_NE(svg.find("<title>ours vs theirs</title>"), std::string::npos);  // default labels: stems
  EXPECT_NE(svg.find(">theirs eval</text>"), std::string::npos);
  EXPECT_NE(svg.find("left out of the tokens panel"), std::string::npos);

  const std::string named = render_svg(runs, {"reformer", "a & b"});
  EXPECT_EQ(xml_problem(named), "");
  EXPECT_EQ(polylines(named), expected);  // ids do not carry labels
  EXPECT_NE(named.find(">reformer train</text>"), std::string::npos);
  EXPECT_NE(named.find(">a &amp; b eval</text>"), std::string::npos);
  EXPECT_THROW(render_svg(runs, {"one"}), ConfigError);
  EXPECT_EQ(polylines(render_svg({runs[0]}, {"x"})), expected_polylines(runs[0]));  // one run: plain ids
}

TEST(Plot, NonFiniteValuesAreSkippedAndDescribed) {
  // null (how the trainer writes NaN), an overflowing number (inf) and nan.
  const RunCurves c = parse_metrics(
      "{\"step\": 1, \"bpc\": 4.0, \"tokens_per_s\": 100, \"tokens_seen\": 8}\n"
      "{\"step\": 2, \"bpc\": null, \"tokens_per_s\": 1e999, \"tokens_seen\": 16}\n"
      "{\"step\": 3, \"bpc\": nan, \"tokens_per_s\": 120, \"tokens_seen\": 24}\n"
      "{\"step\": 4, \"bpc\": 3.0, \"tokens_per_s\": 130, \"tokens_seen\": 32}\n",
      "nan & co.jsonl");
  EXPECT_EQ(c.train.points.size(), 4u);
  EXPECT_EQ(c.train.finite_points(false), 2);
  EXPECT_EQ(c.throughput.finite_points(false), 3);
  const std::string svg = render_svg(c);
  EXPECT_EQ(xml_problem(svg), "");  // the file name's & is escaped
  EXPECT_EQ(polylines(svg), expected_polylines(c));
  EXPECT_EQ(polylines(svg).count("eval-bpc"), 0u);  // no eval lines: no eval curve
  EXPECT_NE(svg.find("Skipped 3 points"), std::string::npos) << svg.substr(0, 600);
  EXPECT_NE(svg.find("train bpc: 2 (steps 2, 3)"), std::string::npos);
}

TEST(Plot, OnePointAndNoPoints) {
  const RunCurves one = parse_metrics(
      "{\"step\": 7, \"bpc\": 2.5, \"tokens_per_s\": 50, \"tokens_seen\": 70}\n", "one.jsonl");
  const std::string svg = render_svg(one);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_EQ(polylines(svg), expected_polylines(one));
  EXPECT_EQ(polylines(svg).at("train-bpc"), 1);
  EXPECT_NE(svg.find("<circle"), std::string::npos);  // a lone point is drawn as a dot

  const RunCurves none = parse_metrics("\n", "empty.jsonl");
  const std::string blank = render_svg(none);
  EXPECT_EQ(xml_problem(blank), "");
  EXPECT_TRUE(polylines(blank).empty());
  EXPECT_NE(blank.find("no data"), std::string::npos);
}

TEST(Plot, BadLinesAreDataErrorsNamingTheLine) {
  EXPECT_NE(data_error("{\"step\": 1, \"bpc\": 2}\n\n{\"step\": 2, \"bpc\"\n").find("m.jsonl line 3"),
            std::string::npos);
  EXPECT_NE(data_error("{\"step\": 1}\nnot json\n").find("m.jsonl line 2: not a JSON object"),
            std::string::npos);
  EXPECT_NE(data_error("[1, 2]\n").find("line 1: not a JSON object"), std::string::npos);
  EXPECT_NE(data_error("{\"bpc\": 2}\n").find("line 1: no \"step\""), std::string::npos);
  EXPECT_NE(data_error("{\"step\": 1.5}\n").find("line 1: no \"step\""), std::string::npos);
  EXPECT_NE(data_error("{\"step\": 1, \"bpc\": \"high\"}\n").find("line 1: \"bpc\" is not a number"),
            std::string::npos);
  EXPECT_THROW(read_metrics("/nonexistent/metrics.jsonl"), DataError);
}

// The trainer's reader: each update reads the lines added since the last, a
// line without its newline yet is read but not consumed, and a file rewritten
// shorter is read again from its start.
TEST(Plot, FollowerReadsAGrowingFile) {
  const std::string path = ::testing::TempDir() + "reformer_plot_follow.jsonl";
  const std::string a = "{\"step\": 1, \"bpc\": 4, \"tokens_seen\": 8}\n";
  const std::string b = "{\"step\": 2, \"bpc\": 3, \"tokens_seen\": 16}\n";
  std::ofstream(path) << a;
  MetricsFollower f(path);
  EXPECT_EQ(f.update().train.points.size(), 1u);
  std::ofstream(path, std::ios::app) << b.substr(0, 20);  // half a line: left out
  EXPECT_EQ(f.update().train.points.size(), 1u);
  std::ofstream(path, std::ios::app) << b.substr(20, b.size() - 21);  // no newline yet
  EXPECT_EQ(f.update().train.points.size(), 2u);
  std::ofstream(path, std::ios::app) << "\n{\"step\": 2, \"eval\": true, \"eval_bpc\": 3.5}\n";
  RunCurves c = f.update();
  EXPECT_EQ(c.train.points.size(), 2u);
  EXPECT_EQ(c.repeated, 0);  // step 2's train line counted once
  EXPECT_EQ(c.eval.points.size(), 1u);
  EXPECT_EQ(c.title, "reformer_plot_follow.jsonl");
  std::ofstream(path, std::ios::trunc) << b;  // rewritten shorter
  c = f.update();
  EXPECT_EQ(c.train.points.size(), 1u);
  EXPECT_EQ(c.train.points[0].step, 2);
  EXPECT_TRUE(c.eval.points.empty());
  std::ofstream(path, std::ios::app) << "oops\n";
  try {
    f.update();
    ADD_FAILURE() << "no DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("reformer_plot_follow.jsonl line 2"), std::string::npos)
        << e.what();
  }
  fs::remove(path);
}

TEST(Plot, PathBesideTheMetrics) {
  EXPECT_EQ(plot_path_for("runs/a.jsonl"), "runs/a.svg");
  EXPECT_EQ(plot_path_for("runs/a.json"), "runs/a.json.svg");
  EXPECT_EQ(plot_path_for(".jsonl"), ".jsonl.svg");
}

// The program: a few steps of tiny.yaml draw the plot beside the metrics
// (logging.plot), and `reformer plot` draws the same file where -o says.
TEST(PlotCli, TrainThenPlot) {
  const fs::path dir = fs::path(::testing::TempDir()) / "reformer_plot_cli";
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto run = [&](const std::string& args) { return run_reformer(dir, args); };
  const std::string metrics = (dir / "run.jsonl").string();
  ASSERT_EQ(run("train --config " REFORMER_SOURCE_DIR "/configs/tiny.yaml --set training.steps=4 "
                "--set training.log_every=1 --set training.eval_every=2 --set training.eval_batches=1 "
                "--set checkpoint.resume=none --set checkpoint.dir=" + (dir / "ckpt").string() +
                " --metrics " + metrics), 0);
  EXPECT_TRUE(fs::exists(dir / "run.svg"));  // logging.plot is on by default
  const std::string out = (dir / "drawn.svg").string();
  ASSERT_EQ(run("plot " + metrics + " -o " + out), 0);
  std::ifstream in(out);
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_TRUE(svg.rfind("<svg", 0) == 0 || svg.rfind("<?xml", 0) == 0);
  EXPECT_EQ(xml_problem(svg), "");
  const auto lines = polylines(svg);
  EXPECT_EQ(lines.at("train-bpc"), 4);  // steps 1..4
  EXPECT_EQ(lines.at("eval-bpc"), 2);   // steps 2 and 4
  EXPECT_EQ(run("plot " + (dir / "absent.jsonl").string()), 1);
  fs::remove_all(dir);
}

// Several files: drawn where -o says, labels one per file; without -o or
// with a label count that differs, a usage error (status 2).
TEST(PlotCli, SeveralFiles) {
  const fs::path dir = fs::path(::testing::TempDir()) / "reformer_plot_several";
  fs::remove_all(dir);
  fs::create_directories(dir / "other");
  const std::string a = (dir / "m.jsonl").string(), b = (dir / "other" / "m.jsonl").string();
  std::ofstream(a) << kTimed;
  std::ofstream(b) << kOther;
  const std::string out = (dir / "both.svg").string();
  ASSERT_EQ(run_reformer(dir, "plot " + a + " " + b + " -o " + out), 0);
  std::ifstream in(out);
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_EQ(polylines(svg).at("run2-eval-bpc-elapsed"), 2);
  EXPECT_NE(svg.find(">" + (dir / "other" / "m").string() + " eval</text>"), std::string::npos);
  EXPECT_EQ(run_reformer(dir, "plot " + a + " " + b + " -o " + out + " --labels x,y"), 0);
  EXPECT_EQ(run_reformer(dir, "plot " + a + " " + b + " -o " + out + " --labels x"), 2);
  EXPECT_EQ(run_reformer(dir, "plot " + a + " " + b + " -o " + out + " --labels x,y,z"), 2);
  EXPECT_EQ(run_reformer(dir, "plot " + a + " " + b), 2);
  EXPECT_FALSE(fs::exists(dir / "m.svg"));
  fs::remove_all(dir);
}
