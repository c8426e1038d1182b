// Named views into one flat parameter buffer (and its gradient twin).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace reformer {

enum class InitKind { normal, ones, zeros };

struct ParamInfo {
  std::string name;             // e.g. "layers.0.attn.wqk"
  std::vector<int64_t> shape;   // row-major
  int64_t offset = 0;           // first element in the flat buffer
  int64_t size = 0;             // product(shape)
  InitKind init = InitKind::normal;
  double init_std = 0.0;        // for InitKind::normal
  bool decay = false;           // weight decay applies (matrices only)
  // [rows, cols] view for factored optimizers: last dim is cols, the rest rows.
  int64_t rows() const { return shape.size() < 2 ? 1 : size / shape.back(); }
  int64_t cols() const { return shape.empty() ? 1 : shape.back(); }
};

// Lays parameters out back to back in declaration order.
class ParamTable {
 public:
  // Appends a parameter; returns its offset.
  int64_t add(std::string name, std::vector<int64_t> shape, InitKind init, double init_std,
              bool decay) {
    ParamInfo p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    p.size = 1;
    for (int64_t d : p.shape) p.size *= d;
    p.offset = total_;
    p.init = init;
    p.init_std = init_std;
    p.decay = decay;
    total_ += p.size;
    params_.push_back(std::move(p));
    return params_.back().offset;
  }
  const std::vector<ParamInfo>& params() const { return params_; }
  int64_t total() const { return total_; }

 private:
  std::vector<ParamInfo> params_;
  int64_t total_ = 0;
};

}  // namespace reformer
