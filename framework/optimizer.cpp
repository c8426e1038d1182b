#include "framework/optimizer.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "kernels/errors.h"

namespace reformer {

double learning_rate(const OptimizerConfig& c, int64_t step, int64_t total_steps) {
  const double s = double(std::max<int64_t>(step, 1));
  const double w = double(std::max<int64_t>(c.warmup_steps, 0));
  const double warm = w > 0 ? std::min(1.0, s / w) : 1.0;
  switch (c.schedule) {
    case Schedule::rsqrt:
      return c.lr * warm * (w > 0 ? std::sqrt(w / std::max(s, w)) : 1 / std::sqrt(s));
    case Schedule::cosine: {
      if (s <= w) return c.lr * warm;
      const double span = std::max(1.0, double(total_steps) - w);
      const double progress = std::min(1.0, (s - w) / span);
      const double cosv = 0.5 * (1 + std::cos(M_PI * progress));
      return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * cosv);
    }
    case Schedule::constant:
      return c.lr * warm;
  }
  throw ConfigError("optimizer.schedule: unknown value " + std::to_string(int(c.schedule)));
}

namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Element count, or -1 for a negative dim or an int64 overflow.
int64_t count_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return -1;
  return n;
}

}  // namespace

std::vector<std::string> optimizer_state_shape_problems(
    const std::vector<std::pair<std::string, std::vector<NamedShape>>>& states_in,
    const std::vector<std::pair<std::string, std::vector<int64_t>>>& params) {
  std::vector<std::string> problems;
  std::map<std::string, const std::vector<int64_t>*> want;
  for (const auto& [name, shape] : params) want[name] = &shape;
  std::map<std::string, std::map<std::string, const NamedShape*>> states;
  for (const auto& [sname, tensors] : states_in) {
    auto& m = states[sname];
    for (const auto& t : tensors) {
      if (!m.emplace(t.name, &t).second)
        problems.push_back("optimizer state " + sname + ": tensor " + t.name + " appears twice");
      else if (!want.count(t.name))
        problems.push_back("extra dataset /optimizer/" + sname + "/" + t.name + ": " + t.name +
                           " is not a parameter of the model");
    }
  }
  const auto* vc_state = states.count("vc") ? &states["vc"] : nullptr;
  for (const auto& [sname, m] : states) {
    if (sname == "vc") continue;  // checked together with vr
    for (const auto& [name, shape] : params) {
      auto it = m.find(name);
      if (it == m.end()) {
        problems.push_back("missing dataset /optimizer/" + sname + "/" + name +
                           ": optimizer state " + sname + " has no tensor for parameter " + name);
        continue;
      }
      const NamedShape& t = *it->second;
      if (sname != "vr") {
        if (t.shape != shape)
          problems.push_back("optimizer state " + sname + ": parameter " + name + " has shape " +
                             shape_text(t.shape) + " in the checkpoint but " + shape_text(shape) +
                             " in the model");
        continue;
      }
      // Adafactor second moment: vr [rows] x vc [cols] factored, else vr holds all of it.
      const NamedShape* vc = nullptr;
      if (vc_state) {
        auto jt = vc_state->find(name);
        if (jt != vc_state->end() && count_of(jt->second->shape) > 0) vc = jt->second;
      }
      const int64_t n = count_of(shape), r = count_of(t.shape);
      const int64_t cols = vc ? count_of(vc->shape) : 1;
      int64_t prod = 0;
      if (r < 0 || cols < 0 || __builtin_mul_overflow(r, cols, &prod) || prod != n)
        problems.push_back("optimizer state vr" + std::string(vc ? "/vc" : "") + ": parameter " +
                           name + " has shape " + shape_text(t.shape) +
                           (vc ? " x " + shape_text(vc->shape) : "") +
                           " in the checkpoint, which does not factor its shape " +
                           shape_text(shape) + " in the model");
    }
  }
  if (vc_state && !states.count("vr"))
    problems.push_back("optimizer state vc is present without vr");
  return problems;
}

template <class T>
Optimizer<T>::Optimizer(const OptimizerConfig& cfg, const ParamTable& table, Ops<T>& ops)
    : cfg_(cfg), table_(table), ops_(ops) {
  auto add = [&](const std::string& state, size_t param, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    buffers_.emplace_back(ops, n);
    ops.fill(buffers_.back().data(), T(0), n);
    state_.push_back(StateTensor{state, param, std::move(shape), buffers_.back().data(), n});
  };
  const auto& ps = table.params();
  // AdamW's moments lie as the parameters do, each in one buffer [P], so
  // that consecutive tensors with the same hyperparameters update in one
  // call (step).
  T* moments[2] = {nullptr, nullptr};
  if (cfg.name == OptimizerKind::adamw) {
    for (T*& b : moments) {
      buffers_.emplace_back(ops, table.total());
      ops.fill(buffers_.back().data(), T(0), table.total());
      b = buffers_.back().data();
    }
  }
  for (size_t k = 0; k < ps.size(); ++k) {
    const ParamInfo& p = ps[k];
    if (cfg.name == OptimizerKind::adamw) {
      state_.push_back(StateTensor{"m", k, p.shape, moments[0] + p.offset, p.size});
      state_.push_back(StateTensor{"v", k, p.shape, moments[1] + p.offset, p.size});
    } else if (cfg.name == OptimizerKind::adafactor) {
      const bool factored = p.rows() > 1 && p.cols() > 1;
      if (factored) {
        add("vr", k, {p.rows()});
        add("vc", k, {p.cols()});
      } else {
        add("vr", k, p.shape);
      }
      if (cfg.beta1 > 0) add("m", k, p.shape);
    } else {
      throw ConfigError("optimizer.name: unknown value " + std::to_string(int(cfg.name)));
    }
  }
}

template <class T>
void Optimizer<T>::step(T* params, const T* grads, int64_t step, double lr) {
  const auto& ps = table_.params();
  if (ps.empty()) return;
  if (cfg_.name == OptimizerKind::adamw) {
    // One call per run of consecutive tensors with the same weight decay
    // (every tensor's, one call, without decay): the moments lie as the
    // parameters do (the constructor), and the update is elementwise.
    AdamWParams a;
    a.lr = float(lr);
    a.beta1 = float(cfg_.beta1);
    a.beta2 = float(cfg_.beta2);
    a.eps = float(cfg_.eps);
    a.step = step;
    T* m = state_[0].data;
    T* v = state_[1].data;
    for (size_t k = 0; k < ps.size();) {
      const float wd = ps[k].decay ? float(cfg_.weight_decay) : 0.0f;
      size_t e = k + 1;
      while (e < ps.size() && (ps[e].decay ? float(cfg_.weight_decay) : 0.0f) == wd) ++e;
      const int64_t o = ps[k].offset, n = ps[e - 1].offset + ps[e - 1].size - o;
      a.weight_decay = wd;
      ops_.adamw_update(params + o, grads + o, m + o, v + o, n, a);
      k = e;
    }
    return;
  }
  // State tensors are laid out per parameter in constructor order.
  size_t si = 0;
  for (size_t k = 0; k < ps.size(); ++k) {
    const ParamInfo& p = ps[k];
    T* w = params + p.offset;
    const T* g = grads + p.offset;
    AdafactorParams a;
    a.lr = float(lr);
    a.beta1 = float(cfg_.beta1);
    a.decay_rate = float(cfg_.decay_rate);
    a.clip_threshold = float(cfg_.clip_threshold);
    a.weight_decay = p.decay ? float(cfg_.weight_decay) : 0.0f;
    a.step = step;
    const bool factored = p.rows() > 1 && p.cols() > 1;
    T* vr = state_[si++].data;
    T* vc = factored ? state_[si++].data : nullptr;
    T* m = cfg_.beta1 > 0 ? state_[si++].data : nullptr;
    ops_.adafactor_update(w, g, m, vr, vc, p.rows(), p.cols(), a);
  }
}

template <class T>
double clip_grad_norm(Ops<T>& ops, T* grads, int64_t n, double max_norm) {
  const double norm = std::sqrt(ops.sum_squares(grads, n));
  if (max_norm > 0 && norm > max_norm) ops.scale(grads, T(max_norm / (norm + 1e-6)), n);
  return norm;
}

template class Optimizer<float>;
template class Optimizer<double>;
template double clip_grad_norm<float>(Ops<float>&, float*, int64_t, double);
template double clip_grad_norm<double>(Ops<double>&, double*, int64_t, double);

}  // namespace reformer
