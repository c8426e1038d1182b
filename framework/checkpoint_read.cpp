// The validating checkpoint reader (docs/checkpoint-format.md, "Reading and
// validation") and check_matches.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>

#include "framework/checkpoint_hdf5.h"
#include "framework/checkpoint_read.h"
#include "framework/checkpoint_seal.h"
#include "framework/optimizer.h"
#include "kernels/errors.h"

namespace reformer {
namespace ckpt {
namespace {

namespace fs = std::filesystem;

// Runs `fn`; a Problem it throws is rethrown (strict) or recorded (collecting).
class Collector {
 public:
  Collector(bool strict, Scan& scan) : strict_(strict), scan_(scan) {}
  template <class Fn>
  bool attempt(Fn&& fn) {
    try {
      fn();
      return true;
    } catch (const Problem& p) {
      if (strict_) throw;
      scan_.problems.push_back(p.what);
      return false;
    }
  }
  void report(const std::string& what) {
    if (strict_) problem(what);
    scan_.problems.push_back(what);
  }

 private:
  bool strict_;
  Scan& scan_;
};

std::string describe_type(hid_t type) {
  const size_t bits = H5Tget_size(type) * 8;
  std::string s;
  switch (H5Tget_class(type)) {
    case H5T_FLOAT:
      s = "float" + std::to_string(bits);
      break;
    case H5T_INTEGER:
      s = (H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bits);
      break;
    case H5T_STRING:
      return "string";
    case H5T_COMPOUND:
      return "compound";
    default:
      return "other";
  }
  if (H5Tget_order(type) == H5T_ORDER_BE) s += "be";
  return s;
}

Handle open_attr(hid_t obj, const char* name) {
  htri_t exists = H5Aexists(obj, name);
  if (exists < 0)
    problem(std::string("attribute ") + name + " is unreadable (" + h5_detail() + ")");
  if (exists == 0) problem(std::string("missing attribute ") + name);
  Handle attr =
      own(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, std::string("opening attribute ") + name);
  Handle space = own(H5Aget_space(attr.get()), H5Sclose, std::string("attribute ") + name);
  if (H5Sget_simple_extent_npoints(space.get()) != 1)
    problem(std::string("attribute ") + name + " is not a single value");
  return attr;
}

template <class T>
T read_int_attr(hid_t obj, const char* name, hid_t mem_type) {
  Handle attr = open_attr(obj, name);
  Handle type = own(H5Aget_type(attr.get()), H5Tclose, std::string("attribute ") + name);
  if (H5Tget_class(type.get()) != H5T_INTEGER)
    problem(std::string("attribute ") + name + " is " + describe_type(type.get()) +
            ", expected an integer");
  T v{};
  check(H5Aread(attr.get(), mem_type, &v), std::string("reading attribute ") + name);
  return v;
}

std::string read_string_attr(hid_t obj, const char* name) {
  Handle attr = open_attr(obj, name);
  Handle type = own(H5Aget_type(attr.get()), H5Tclose, std::string("attribute ") + name);
  if (H5Tget_class(type.get()) != H5T_STRING)
    problem(std::string("attribute ") + name + " is " + describe_type(type.get()) +
            ", expected a string");
  htri_t variable = H5Tis_variable_str(type.get());
  if (variable < 0) problem(std::string("attribute ") + name + " has an unreadable type");
  if (variable > 0) {  // written by another tool (h5py writes str as variable length)
    Handle mem = own(H5Tcopy(H5T_C_S1), H5Tclose, "H5Tcopy");
    check(H5Tset_size(mem.get(), H5T_VARIABLE), "H5Tset_size");
    check(H5Tset_cset(mem.get(), H5Tget_cset(type.get())), "H5Tset_cset");
    char* p = nullptr;
    check(H5Aread(attr.get(), mem.get(), &p), std::string("reading attribute ") + name);
    std::string s = p ? p : "";
    H5free_memory(p);
    return s;
  }
  const size_t n = H5Tget_size(type.get());
  std::string buf(n, '\0');
  check(H5Aread(attr.get(), type.get(), buf.data()), std::string("reading attribute ") + name);
  buf.resize(std::strlen(buf.c_str()));  // drop NUL padding / terminator
  return buf;
}

// Names of the links in `group`, in creation order when the group tracks it
// (always, for files this module writes), else by name. Only hard links are
// accepted: a soft or external link is a Problem.
std::vector<std::string> list_links(hid_t group, const std::string& where) {
  Handle gcpl = own(H5Gget_create_plist(group), H5Pclose, "reading group " + where);
  unsigned order_flags = 0;
  check(H5Pget_link_creation_order(gcpl.get(), &order_flags), "reading group " + where);
  const H5_index_t index =
      (order_flags & H5P_CRT_ORDER_INDEXED) ? H5_INDEX_CRT_ORDER : H5_INDEX_NAME;
  struct Links {
    std::vector<std::string> names;
    std::vector<std::string> not_hard;
  } links;
  hsize_t idx = 0;
  herr_t r = H5Literate(
      group, index, H5_ITER_INC, &idx,
      [](hid_t, const char* name, const H5L_info_t* info, void* p) -> herr_t {
        auto* l = static_cast<Links*>(p);
        (info->type == H5L_TYPE_HARD ? l->names : l->not_hard).push_back(name);
        return 0;
      },
      &links);
  if (r < 0) problem("group " + where + " is unreadable (" + h5_detail() + ")");
  if (!links.not_hard.empty())
    problem(where + "/" + links.not_hard.front() + " is a soft or external link, not a dataset");
  return links.names;
}

H5I_type_t object_type(hid_t parent, const std::string& name, const std::string& full) {
  Handle obj = own(H5Oopen(parent, name.c_str(), H5P_DEFAULT), H5Oclose, "opening " + full);
  return H5Iget_type(obj.get());
}

// Opens, checks and reads one dataset into `t` (name set by the caller).
// Fills `info` as far as it gets.
void read_tensor(hid_t group, const std::string& name, const std::string& full, uintmax_t file_size,
                 CheckpointTensor& t, DatasetInfo& info) {
  Handle dset =
      own(H5Dopen2(group, name.c_str(), H5P_DEFAULT), H5Dclose, "opening dataset " + full);
  Handle type = own(H5Dget_type(dset.get()), H5Tclose, "reading the type of dataset " + full);
  info.dtype = describe_type(type.get());
  Handle space = own(H5Dget_space(dset.get()), H5Sclose, "reading the shape of dataset " + full);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) problem("dataset " + full + " has an unreadable shape (" + h5_detail() + ")");
  std::vector<hsize_t> dims(rank);
  if (rank > 0 && H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0)
    problem("dataset " + full + " has an unreadable shape (" + h5_detail() + ")");
  t.shape.assign(dims.begin(), dims.end());
  info.shape = t.shape;
  if (rank == 0) problem("dataset " + full + " is a scalar; tensors have rank >= 1");
  if (H5Tget_class(type.get()) != H5T_FLOAT || H5Tget_size(type.get()) != 4)
    problem("dataset " + full + " has type " + info.dtype + ", expected float32");

  Handle dcpl = own(H5Dget_create_plist(dset.get()), H5Pclose, "reading the filters of " + full);
  bool fletcher = false;
  const int nfilters = H5Pget_nfilters(dcpl.get());
  for (int i = 0; i < nfilters; ++i) {
    unsigned flags = 0;
    size_t ncd = 0;
    if (H5Pget_filter2(dcpl.get(), static_cast<unsigned>(i), &flags, &ncd, nullptr, 0, nullptr,
                       nullptr) == H5Z_FILTER_FLETCHER32)
      fletcher = true;
  }
  if (!fletcher) problem("dataset " + full + " has no Fletcher-32 checksum filter");

  const int64_t n = numel(t.shape);
  // Bounds the allocation below by what the file can hold, and catches chunks
  // that were never written (HDF5 would return fill values for them unchecked).
  if (n < 0 || static_cast<uintmax_t>(n) > file_size / 4)
    problem("dataset " + full + " has shape " + shape_str(t.shape) + ", more than the file holds");
  const hsize_t stored = H5Dget_storage_size(dset.get());
  if (stored < static_cast<hsize_t>(n) * 4)
    problem("dataset " + full + " is incomplete (" + std::to_string(stored) + " bytes stored for " +
            std::to_string(n) + " values)");
  t.data.assign(static_cast<size_t>(n), 0.0f);
  if (n > 0 &&
      H5Dread(dset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data.data()) < 0) {
    std::string detail;
    if (h5_checksum_failure(detail)) problem("dataset " + full + " fails its checksum");
    problem("dataset " + full + " is unreadable (" + detail + ")");
  }
  // A file holding NaN or Inf cannot continue a run (the writer refuses them).
  const std::string bad = first_non_finite(t.data);
  if (!bad.empty()) problem("dataset " + full + " holds a non-finite value (" + bad + ")");
  info.ok = true;
}

// Reads every dataset of the group at `where` into `out`.
void read_tensor_group(hid_t file, const std::string& where, uintmax_t file_size,
                       std::vector<CheckpointTensor>& out, Scan& scan, Collector& c) {
  Handle group;
  if (!c.attempt([&] {
        htri_t exists = H5Lexists(file, where.c_str(), H5P_DEFAULT);
        if (exists <= 0) problem("missing group " + where);
        group = own(H5Gopen2(file, where.c_str(), H5P_DEFAULT), H5Gclose, "opening group " + where);
      }))
    return;
  std::vector<std::string> names;
  if (!c.attempt([&] { names = list_links(group.get(), where); })) return;
  for (const auto& name : names) {
    const std::string full = where + "/" + name;
    DatasetInfo info;
    info.full = full;
    CheckpointTensor t;
    t.name = name;
    c.attempt([&] {
      if (object_type(group.get(), name, full) != H5I_DATASET) problem(full + " is not a dataset");
      read_tensor(group.get(), name, full, file_size, t, info);
    });
    if (!info.ok && info.problem.empty())
      info.problem = scan.problems.empty() ? std::string("unreadable") : scan.problems.back();
    scan.datasets.push_back(info);
    if (info.ok) out.push_back(std::move(t));
  }
}

}  // namespace

void scan_file(const std::string& path, bool strict, Scan& scan) {
  Collector c(strict, scan);
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) return c.report("does not exist");
  if (!fs::is_regular_file(st)) return c.report("is not a regular file");
  const uintmax_t file_size = fs::file_size(path, ec);
  if (ec) return c.report("unreadable (" + ec.message() + ")");
  if (file_size == 0) return c.report("empty file (0 bytes), not an HDF5 file");
  // The one gate before libhdf5: damage anywhere (including the link records
  // of the fractal heaps, which carry no checksum of their own and can crash
  // libhdf5) is found here, so HDF5 only ever parses bytes the writer produced.
  if (!c.attempt([&] { verify_sealed_file(path, file_size); })) return;

  Handle file;
  if (!c.attempt([&] {
        Handle fapl = file_access_plist();
        hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get());
        if (id < 0) problem("truncated or unreadable (" + h5_detail() + ")");
        file = Handle(id, H5Fclose);
      }))
    return;
  scan.opened = true;
  const hid_t root = file.get();
  CheckpointState& s = scan.state;

  c.attempt([&] {
    scan.format = read_string_attr(root, "format");
    if (scan.format != kFormatName)
      problem("not a reformer checkpoint (format attribute is \"" + scan.format +
              "\", expected \"" + kFormatName + "\")");
  });
  c.attempt([&] {
    scan.format_version = read_int_attr<int64_t>(root, "format_version", H5T_NATIVE_INT64);
    if (scan.format_version != kFormatVersion)
      problem("format_version " + std::to_string(scan.format_version) +
              " is not supported (this build reads version " + std::to_string(kFormatVersion) +
              ")");
  });
  auto int_attr = [&](const char* name, int64_t& dst, int64_t min_value) {
    c.attempt([&] {
      dst = read_int_attr<int64_t>(root, name, H5T_NATIVE_INT64);
      if (dst < min_value)
        problem(std::string("attribute ") + name + " is " + std::to_string(dst) +
                ", must be >= " + std::to_string(min_value));
    });
  };
  int_attr("step", s.step, 0);
  int_attr("tokens_seen", s.tokens_seen, 0);
  int_attr("samples_drawn", s.samples_drawn, 0);
  c.attempt([&] { s.seed = read_int_attr<uint64_t>(root, "seed", H5T_NATIVE_UINT64); });
  int64_t dp = 1, sp = 1;
  int_attr("dp", dp, 1);
  int_attr("sp", sp, 1);
  c.attempt([&] {
    if (dp > INT32_MAX || sp > INT32_MAX) problem("attribute dp or sp is out of range");
    s.dp = static_cast<int>(dp);
    s.sp = static_cast<int>(sp);
  });
  c.attempt([&] { s.config_text = read_string_attr(root, "config"); });
  c.attempt([&] { s.optimizer_name = read_string_attr(root, "optimizer"); });
  c.attempt([&] { scan.build_version = read_string_attr(root, "build_version"); });

  read_tensor_group(root, "/model", file_size, s.model, scan, c);

  Handle opt;
  std::vector<std::string> states;
  if (!c.attempt([&] {
        if (H5Lexists(root, "/optimizer", H5P_DEFAULT) <= 0) problem("missing group /optimizer");
        opt = own(H5Gopen2(root, "/optimizer", H5P_DEFAULT), H5Gclose, "opening group /optimizer");
        states = list_links(opt.get(), "/optimizer");
      }))
    return;
  for (const auto& name : states) {
    const std::string where = "/optimizer/" + name;
    if (!c.attempt([&] {
          if (object_type(opt.get(), name, where) != H5I_GROUP)
            problem(where + " is not a group of optimizer state");
        }))
      continue;
    s.optimizer.emplace_back(name, std::vector<CheckpointTensor>{});
    read_tensor_group(root, where, file_size, s.optimizer.back().second, scan, c);
  }
}

}  // namespace ckpt

CheckpointState read_checkpoint(const std::string& path) {
  ckpt::silence_hdf5_errors();
  ckpt::Scan scan;
  try {
    ckpt::scan_file(path, true, scan);
  } catch (const ckpt::Problem& p) {
    throw CheckpointError(path + ": " + p.what);
  }
  return std::move(scan.state);
}

void check_matches(const CheckpointState& state,
                   const std::vector<std::pair<std::string, std::vector<int64_t>>>& expected) {
  using ckpt::shape_str;
  std::vector<std::string> problems;
  std::map<std::string, const std::vector<int64_t>*> want;
  for (const auto& [name, shape] : expected) want[name] = &shape;

  // Model: same names, same shapes.
  std::map<std::string, const CheckpointTensor*> have;
  for (const auto& t : state.model) {
    if (!have.emplace(t.name, &t).second) {
      problems.push_back("parameter " + t.name + " appears twice in the checkpoint");
      continue;
    }
    auto it = want.find(t.name);
    if (it == want.end())
      problems.push_back("extra dataset /model/" + t.name + ": parameter " + t.name +
                         " is in the checkpoint but not in the model");
    else if (*it->second != t.shape)
      problems.push_back("parameter " + t.name + " has shape " + shape_str(t.shape) +
                         " in the checkpoint but " + shape_str(*it->second) + " in the model");
  }
  for (const auto& [name, shape] : expected)
    if (!have.count(name))
      problems.push_back("missing dataset /model/" + name + ": parameter " + name + " " +
                         shape_str(shape) + " of the model is not in the checkpoint");

  // Optimizer states: the optimizer owns the rules for their shapes.
  std::vector<std::pair<std::string, std::vector<NamedShape>>> states;
  for (const auto& [sname, tensors] : state.optimizer) {
    states.emplace_back(sname, std::vector<NamedShape>{});
    for (const auto& t : tensors) states.back().second.push_back({t.name, t.shape});
  }
  for (auto& p : optimizer_state_shape_problems(states, expected)) problems.push_back(std::move(p));

  if (problems.empty()) return;
  std::string msg = problems.size() == 1 ? problems.front()
                                         : "checkpoint does not match the model (" +
                                               std::to_string(problems.size()) + " mismatches): ";
  if (problems.size() > 1) {
    const size_t shown = std::min<size_t>(problems.size(), 8);
    for (size_t i = 0; i < shown; ++i) msg += (i ? "; " : "") + problems[i];
    if (shown < problems.size()) msg += "; ...";
  }
  throw CheckpointError(msg);
}

}  // namespace reformer
