#include "framework/model_tensors.h"

#include <string>

#include "kernels/errors.h"

namespace reformer {

namespace {

const char* const kLayerNames[] = {"ln_a.weight", "ln_a.bias",   "attn.wqk", "attn.wv",
                                   "attn.wo",     "ln_f.weight", "ln_f.bias", "ffn.w1",
                                   "ffn.b1",      "ffn.w2",      "ffn.b2"};

std::string layer_prefix(int l) { return "layers." + std::to_string(l) + "."; }

// Index of `name` in the table; throws ShapeError when absent.
size_t find(const ParamTable& table, const std::string& name) {
  const auto& ps = table.params();
  for (size_t k = 0; k < ps.size(); ++k)
    if (ps[k].name == name) return k;
  throw ShapeError("parameter table has no tensor named '" + name + "'");
}

// Offset range from the first to the last (inclusive) of the named tensors,
// which must be adjacent in the table.
ParamRange span(const ParamTable& table, const std::string& first, const std::string& last) {
  const auto& ps = table.params();
  const size_t a = find(table, first), b = find(table, last);
  return {ps[a].offset, ps[b].offset + ps[b].size - ps[a].offset};
}

}  // namespace

ParamTable model_param_table(const Config& cfg) {
  const ModelConfig& m = cfg.model;
  const int64_t D = m.d_model, HD = int64_t(m.n_heads) * cfg.head_dim(), F = m.d_ff,
                V = m.vocab_size;
  const int64_t d1 = m.axial_dims[0];
  const double sd = m.init_std;
  ParamTable t;
  t.add("embed.tokens", {V, D}, InitKind::normal, sd, false);
  t.add("embed.axial1", {m.axial_shape[0], d1}, InitKind::normal, m.axial_init_std, false);
  t.add("embed.axial2", {m.axial_shape[1], D - d1}, InitKind::normal, m.axial_init_std, false);
  for (int l = 0; l < m.n_layers; ++l) {
    const std::string p = layer_prefix(l);
    t.add(p + "ln_a.weight", {D}, InitKind::ones, 0, false);
    t.add(p + "ln_a.bias", {D}, InitKind::zeros, 0, false);
    t.add(p + "attn.wqk", {D, HD}, InitKind::normal, sd, true);
    t.add(p + "attn.wv", {D, HD}, InitKind::normal, sd, true);
    t.add(p + "attn.wo", {HD, D}, InitKind::normal, sd, true);
    t.add(p + "ln_f.weight", {D}, InitKind::ones, 0, false);
    t.add(p + "ln_f.bias", {D}, InitKind::zeros, 0, false);
    t.add(p + "ffn.w1", {D, F}, InitKind::normal, sd, true);
    t.add(p + "ffn.b1", {F}, InitKind::zeros, 0, false);
    t.add(p + "ffn.w2", {F, D}, InitKind::normal, sd, true);
    t.add(p + "ffn.b2", {D}, InitKind::zeros, 0, false);
  }
  t.add("ln_out.weight", {2 * D}, InitKind::ones, 0, false);
  t.add("ln_out.bias", {2 * D}, InitKind::zeros, 0, false);
  t.add("head.weight", {2 * D, V}, InitKind::normal, sd, true);
  t.add("head.bias", {V}, InitKind::zeros, 0, false);
  return t;
}

template <class T>
ModelTensors<T> bind_tensors(const ParamTable& table, T* base, int n_layers) {
  const auto& ps = table.params();
  std::vector<int> bound(ps.size(), 0);
  auto at = [&](const std::string& name) {
    const size_t k = find(table, name);
    ++bound[k];
    return base + ps[k].offset;
  };
  ModelTensors<T> v;
  v.tokens = at("embed.tokens");
  v.axial1 = at("embed.axial1");
  v.axial2 = at("embed.axial2");
  v.layers.resize(size_t(n_layers));
  for (int l = 0; l < n_layers; ++l) {
    const std::string p = layer_prefix(l);
    T** fields[] = {&v.layers[size_t(l)].ln_a_w, &v.layers[size_t(l)].ln_a_b,
                    &v.layers[size_t(l)].wqk,    &v.layers[size_t(l)].wv,
                    &v.layers[size_t(l)].wo,     &v.layers[size_t(l)].ln_f_w,
                    &v.layers[size_t(l)].ln_f_b, &v.layers[size_t(l)].w1,
                    &v.layers[size_t(l)].b1,     &v.layers[size_t(l)].w2,
                    &v.layers[size_t(l)].b2};
    static_assert(std::size(kLayerNames) == sizeof(LayerTensors<T>) / sizeof(T*),
                  "every LayerTensors field has a name");
    for (size_t f = 0; f < std::size(kLayerNames); ++f) *fields[f] = at(p + kLayerNames[f]);
  }
  v.ln_out_w = at("ln_out.weight");
  v.ln_out_b = at("ln_out.bias");
  v.head_w = at("head.weight");
  v.head_b = at("head.bias");
  for (size_t k = 0; k < ps.size(); ++k)
    REFORMER_REQUIRE(bound[k] == 1, ShapeError,
                     "parameter '" + ps[k].name + "' is bound by " + std::to_string(bound[k]) +
                         " views (expected exactly one)");
  return v;
}

ParamRange layer_range(const ParamTable& table, int layer) {
  const std::string p = layer_prefix(layer);
  return span(table, p + kLayerNames[0], p + kLayerNames[std::size(kLayerNames) - 1]);
}
ParamRange embedding_range(const ParamTable& table) {
  return span(table, "embed.tokens", "embed.axial2");
}
ParamRange head_range(const ParamTable& table) { return span(table, "ln_out.weight", "head.bias"); }

template ModelTensors<float> bind_tensors(const ParamTable&, float*, int);
template ModelTensors<double> bind_tensors(const ParamTable&, double*, int);

}  // namespace reformer
