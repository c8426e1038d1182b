// The model's parameter layout and named views into it.
//
// One table lists every parameter (name, shape, init) back to back in one flat
// buffer; the names are the checkpoint's dataset names. Views bind each field
// by name, so model code never does positional arithmetic, and binding checks
// that every table entry is reached by exactly one field (as llm.c guards its
// ParameterTensors). The same views over the gradient buffer give the
// gradients.
#pragma once

#include <cstdint>
#include <vector>

#include "framework/config.h"
#include "framework/params.h"

namespace reformer {

template <class T>
struct LayerTensors {
  T* ln_a_w;  // [D]      LayerNorm before attention
  T* ln_a_b;  // [D]
  T* wqk;     // [D, H*dh] shared query/key projection
  T* wv;      // [D, H*dh]
  T* wo;      // [H*dh, D]
  T* ln_f_w;  // [D]      LayerNorm before the feed-forward
  T* ln_f_b;  // [D]
  T* w1;      // [D, F]
  T* b1;      // [F]
  T* w2;      // [F, D]
  T* b2;      // [D]
};

template <class T>
struct ModelTensors {
  T* tokens;  // [V, D]
  T* axial1;  // [a1, d1]
  T* axial2;  // [a2, D - d1]
  std::vector<LayerTensors<T>> layers;
  T* ln_out_w;  // [2D]
  T* ln_out_b;  // [2D]
  T* head_w;    // [2D, V]
  T* head_b;    // [V]
};

// A contiguous run of the flat buffer, in elements.
struct ParamRange {
  int64_t offset = 0;
  int64_t count = 0;
};

// The parameter layout of the model a validated config describes:
// embeddings, then each layer's tensors together, then the output head.
ParamTable model_param_table(const Config& cfg);

// Views of `base` (a flat buffer laid out by `table`). Throws ShapeError when
// a field's name is missing from the table or a table entry is left unbound.
template <class T>
ModelTensors<T> bind_tensors(const ParamTable& table, T* base, int n_layers);

// Where each part's parameters lie in the flat buffer.
ParamRange layer_range(const ParamTable& table, int layer);
ParamRange embedding_range(const ParamTable& table);
ParamRange head_range(const ParamTable& table);

}  // namespace reformer
