// HDF5 checkpoints: layout, atomic write, validation, resume selection, inspection.
// The format is described in docs/checkpoint-format.md; keep the two in step.
#include "framework/checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <utility>

#include "kernels/errors.h"

namespace reformer {

void (*checkpoint_stage_hook)(const char* stage) = nullptr;

namespace {

namespace fs = std::filesystem;

constexpr const char* kFormatName = "reformer-checkpoint";
constexpr int64_t kFormatVersion = 1;
// Elements per chunk at most (4 MiB of fp32). Fletcher-32 covers one chunk, so
// a checksum failure is localised to at most this much data.
constexpr hsize_t kChunkCap = hsize_t(1) << 20;
constexpr int kConfigSummaryLines = 12;

#ifdef REFORMER_VERSION
constexpr const char* kBuildVersion = REFORMER_VERSION;
#else
constexpr const char* kBuildVersion = "unknown";
#endif

void stage(const char* name) {
  if (checkpoint_stage_hook) checkpoint_stage_hook(name);
}

// A problem found inside this file. Public entry points turn it into a
// CheckpointError prefixed with the file's path; it never escapes them.
struct Problem {
  std::string what;
};

[[noreturn]] void problem(std::string what) { throw Problem{std::move(what)}; }

// Turns HDF5's automatic error printing off for the lifetime of the object and
// restores whatever was installed before (nests).
class QuietHdf5 {
 public:
  QuietHdf5() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  QuietHdf5(const QuietHdf5&) = delete;
  QuietHdf5& operator=(const QuietHdf5&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// The descriptions on HDF5's current error stack, innermost (where the error
// was detected) first. Clears the stack.
std::vector<std::string> h5_error_stack() {
  std::vector<std::string> out;
  hid_t stack = H5Eget_current_stack();
  if (stack < 0) return out;
  H5Ewalk2(
      stack, H5E_WALK_UPWARD,
      [](unsigned, const H5E_error2_t* e, void* p) -> herr_t {
        if (e->desc && *e->desc) static_cast<std::vector<std::string>*>(p)->push_back(e->desc);
        return 0;
      },
      &out);
  H5Eclose_stack(stack);
  return out;
}

std::string h5_detail() {
  auto stack = h5_error_stack();
  return stack.empty() ? std::string("no detail from HDF5") : "HDF5: " + stack.front();
}

// Owns one HDF5 identifier and closes it with the matching H5*close.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  Handle(Handle&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), closer_(o.closer_) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      close();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
      closer_ = o.closer_;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { close(); }

  hid_t get() const { return id_; }
  // Closes now; returns the close call's status (0 when already closed).
  herr_t close() {
    herr_t r = 0;
    if (id_ >= 0 && closer_) r = closer_(id_);
    id_ = H5I_INVALID_HID;
    return r;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// Wraps an identifier returned by an HDF5 call; a negative one is a Problem
// "<what> failed (HDF5: ...)".
Handle own(hid_t id, Handle::Closer closer, const std::string& what) {
  if (id < 0) problem(what + " failed (" + h5_detail() + ")");
  return Handle(id, closer);
}

void check(herr_t status, const std::string& what) {
  if (status < 0) problem(what + " failed (" + h5_detail() + ")");
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Element count, or -1 when a dim is negative or the count overflows int64.
int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > INT64_MAX / d) return -1;
    n *= d;
  }
  return n;
}

// File-access properties shared by writer and reader: the 1.10 file format
// (checksummed superblock, object headers and chunk indexes), strong close so
// that closing the file closes everything in it, no flock (fails on some
// cluster file systems; files are immutable once renamed into place).
Handle file_access_plist() {
  Handle fapl = own(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "H5Pcreate(file access)");
  check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_V110), "H5Pset_libver_bounds");
  check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG), "H5Pset_fclose_degree");
#if H5_VERSION_GE(1, 10, 7)
  check(H5Pset_file_locking(fapl.get(), false, true), "H5Pset_file_locking");
#endif
  return fapl;
}

// ------------------------------------------------------------------ writing

void validate_tensors(const std::string& where, const std::vector<CheckpointTensor>& tensors) {
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "." || t.name == ".." || t.name.find('/') != std::string::npos)
      problem("invalid tensor name \"" + t.name + "\" in " + where +
              " (empty, \".\", \"..\" or containing '/')");
    if (!seen.insert(t.name).second) problem("duplicate tensor " + where + "/" + t.name);
    if (t.shape.empty())
      problem("tensor " + where + "/" + t.name + " has rank 0; store scalars with shape [1]");
    int64_t n = numel(t.shape);
    if (n < 0)
      problem("tensor " + where + "/" + t.name + " has invalid shape " + shape_str(t.shape));
    if (static_cast<uint64_t>(n) != t.data.size())
      problem("tensor " + where + "/" + t.name + " has shape " + shape_str(t.shape) + " (" +
              std::to_string(n) + " values) but " + std::to_string(t.data.size()) + " values");
  }
}

void validate_state(const CheckpointState& s) {
  validate_tensors("/model", s.model);
  std::set<std::string> states;
  for (const auto& [name, tensors] : s.optimizer) {
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
      problem("invalid optimizer state name \"" + name + "\"");
    if (!states.insert(name).second) problem("duplicate optimizer state " + name);
    validate_tensors("/optimizer/" + name, tensors);
  }
}

void write_string_attr(hid_t obj, const char* name, const std::string& value) {
  // Fixed-length so the text lives in the (checksummed) object header; at
  // least one byte because HDF5 refuses zero-sized string types.
  Handle type = own(H5Tcopy(H5T_C_S1), H5Tclose, "H5Tcopy");
  check(H5Tset_size(type.get(), std::max<size_t>(1, value.size())), "H5Tset_size");
  check(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), "H5Tset_strpad");
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), "H5Tset_cset");
  Handle space = own(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate");
  Handle attr = own(H5Acreate2(obj, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    H5Aclose, std::string("creating attribute ") + name);
  std::string buf = value.empty() ? std::string(1, '\0') : value;
  check(H5Awrite(attr.get(), type.get(), buf.data()), std::string("writing attribute ") + name);
  check(attr.close(), std::string("closing attribute ") + name);
}

void write_scalar_attr(hid_t obj, const char* name, hid_t file_type, hid_t mem_type,
                       const void* value) {
  Handle space = own(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate");
  Handle attr = own(H5Acreate2(obj, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    H5Aclose, std::string("creating attribute ") + name);
  check(H5Awrite(attr.get(), mem_type, value), std::string("writing attribute ") + name);
  check(attr.close(), std::string("closing attribute ") + name);
}

void write_int_attr(hid_t obj, const char* name, int64_t v) {
  write_scalar_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v);
}

// Groups remember link creation order, so tensors come back in the order written.
Handle create_group(hid_t parent, const std::string& name, const std::string& full) {
  Handle gcpl = own(H5Pcreate(H5P_GROUP_CREATE), H5Pclose, "H5Pcreate(group create)");
  check(H5Pset_link_creation_order(gcpl.get(), H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED),
        "H5Pset_link_creation_order");
  check(H5Pset_obj_track_times(gcpl.get(), false), "H5Pset_obj_track_times");
  return own(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT), H5Gclose,
             "creating group " + full);
}

// Chunk dims: the whole tensor, shrunk from the first dim on until a chunk
// holds at most kChunkCap elements. Zero dims get chunk 1 (and an unlimited
// max dim, which HDF5 requires for a chunk larger than the dim).
std::vector<hsize_t> chunk_dims(const std::vector<hsize_t>& dims) {
  std::vector<hsize_t> chunk(dims.size());
  hsize_t prod = 1;
  for (size_t i = 0; i < dims.size(); ++i) {
    chunk[i] = std::max<hsize_t>(1, dims[i]);
    prod *= chunk[i];
  }
  for (size_t i = 0; i < dims.size() && prod > kChunkCap; ++i) {
    hsize_t rest = prod / chunk[i];
    chunk[i] = std::max<hsize_t>(1, kChunkCap / rest);
    prod = rest * chunk[i];
  }
  return chunk;
}

void write_tensor(hid_t group, const CheckpointTensor& t, const std::string& full) {
  const int rank = static_cast<int>(t.shape.size());
  std::vector<hsize_t> dims(rank), maxdims(rank);
  for (int i = 0; i < rank; ++i) {
    dims[i] = static_cast<hsize_t>(t.shape[i]);
    maxdims[i] = dims[i] == 0 ? H5S_UNLIMITED : dims[i];
  }
  std::vector<hsize_t> chunk = chunk_dims(dims);
  Handle space = own(H5Screate_simple(rank, dims.data(), maxdims.data()), H5Sclose,
                     "creating the dataspace of " + full);
  Handle dcpl = own(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "H5Pcreate(dataset create)");
  check(H5Pset_chunk(dcpl.get(), rank, chunk.data()), "H5Pset_chunk for " + full);
  check(H5Pset_fletcher32(dcpl.get()), "H5Pset_fletcher32 for " + full);
  check(H5Pset_obj_track_times(dcpl.get(), false), "H5Pset_obj_track_times");
  Handle dset = own(H5Dcreate2(group, t.name.c_str(), H5T_IEEE_F32LE, space.get(), H5P_DEFAULT,
                               dcpl.get(), H5P_DEFAULT),
                    H5Dclose, "creating dataset " + full);
  if (!t.data.empty())
    check(H5Dwrite(dset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data.data()),
          "writing dataset " + full);
  check(dset.close(), "closing dataset " + full);
}

// Writes the whole file at `tmp` and closes it (stages "created",
// "model_written", "optimizer_written").
void write_file(const std::string& tmp, const CheckpointState& s) {
  Handle fapl = file_access_plist();
  // No modification times anywhere: the same state always gives the same bytes.
  Handle fcpl = own(H5Pcreate(H5P_FILE_CREATE), H5Pclose, "H5Pcreate(file create)");
  check(H5Pset_obj_track_times(fcpl.get(), false), "H5Pset_obj_track_times");
  Handle file = own(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, fcpl.get(), fapl.get()), H5Fclose,
                    "creating " + tmp);
  stage("created");
  const hid_t root = file.get();
  write_string_attr(root, "format", kFormatName);
  write_int_attr(root, "format_version", kFormatVersion);
  write_int_attr(root, "step", s.step);
  write_int_attr(root, "tokens_seen", s.tokens_seen);
  write_int_attr(root, "samples_drawn", s.samples_drawn);
  write_scalar_attr(root, "seed", H5T_STD_U64LE, H5T_NATIVE_UINT64, &s.seed);
  write_int_attr(root, "dp", s.dp);
  write_int_attr(root, "sp", s.sp);
  write_string_attr(root, "config", s.config_text);
  write_string_attr(root, "optimizer", s.optimizer_name);
  write_string_attr(root, "build_version", kBuildVersion);

  {
    Handle model = create_group(root, "model", "/model");
    for (const auto& t : s.model) write_tensor(model.get(), t, "/model/" + t.name);
    check(model.close(), "closing group /model");
  }
  stage("model_written");
  {
    Handle opt = create_group(root, "optimizer", "/optimizer");
    for (const auto& [state_name, tensors] : s.optimizer) {
      const std::string where = "/optimizer/" + state_name;
      Handle g = create_group(opt.get(), state_name, where);
      for (const auto& t : tensors) write_tensor(g.get(), t, where + "/" + t.name);
      check(g.close(), "closing group " + where);
    }
    check(opt.close(), "closing group /optimizer");
  }
  stage("optimizer_written");
  check(H5Fflush(root, H5F_SCOPE_GLOBAL), "flushing " + tmp);
  check(file.close(), "closing " + tmp);
}

// fsync of a file or directory; `what` names it in the Problem.
void fsync_path(const std::string& p, bool directory, const std::string& what) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  if (fd < 0) problem("cannot open " + what + " for fsync: " + std::strerror(errno));
  int r = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (r != 0) problem("fsync of " + what + " failed: " + std::strerror(err));
}

std::string parent_dir(const std::string& path) {
  fs::path parent = fs::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// ------------------------------------------------------------------ reading

// One dataset as seen by a scan.
struct DatasetInfo {
  std::string full;            // "/model/<name>" or "/optimizer/<state>/<name>"
  std::vector<int64_t> shape;  // empty when unknown
  std::string dtype = "?";     // e.g. "float32"
  bool ok = false;             // read through its checksum and passed every check
  std::string problem;         // why not ok
};

// Everything a scan of one file found. `problems` empty means the file is valid.
struct Scan {
  CheckpointState state;
  int64_t format_version = -1;
  std::string format;
  std::string build_version;
  std::vector<DatasetInfo> datasets;
  std::vector<std::string> problems;
  bool opened = false;
};

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

bool is_checksum_failure(const std::vector<std::string>& stack) {
  for (const auto& s : stack)
    if (s.find("checksum") != std::string::npos || s.find("Fletcher") != std::string::npos)
      return true;
  return false;
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
    auto stack = h5_error_stack();
    if (is_checksum_failure(stack)) problem("dataset " + full + " fails its checksum");
    problem("dataset " + full + " is unreadable (" +
            (stack.empty() ? std::string("no detail from HDF5") : "HDF5: " + stack.front()) + ")");
  }
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

// Checks and reads the file at `path` into `scan`. Strict: the first problem is
// thrown as a Problem. Collecting: every problem found is recorded and the scan
// goes on where it can.
void scan_file(const std::string& path, bool strict, Scan& scan) {
  Collector c(strict, scan);
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) return c.report("does not exist");
  if (!fs::is_regular_file(st)) return c.report("is not a regular file");
  const uintmax_t file_size = fs::file_size(path, ec);
  if (ec) return c.report("unreadable (" + ec.message() + ")");
  if (file_size == 0) return c.report("empty file (0 bytes), not an HDF5 file");
  {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return c.report(std::string("cannot be opened: ") + std::strerror(errno));
    ::close(fd);
  }
#if H5_VERSION_GE(1, 12, 0)
  const htri_t is_hdf5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
#else
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
#endif
  if (is_hdf5 == 0) return c.report("not an HDF5 file (no HDF5 signature)");
  if (is_hdf5 < 0) return c.report("truncated or unreadable (" + h5_detail() + ")");

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

// ------------------------------------------------------------------ directories

// Step in a name "ckpt-<digits><suffix>", or -1.
int64_t parse_step(const std::string& filename, const std::string& suffix) {
  const std::string prefix = "ckpt-";
  if (filename.size() <= prefix.size() + suffix.size()) return -1;
  if (filename.compare(0, prefix.size(), prefix) != 0) return -1;
  if (filename.compare(filename.size() - suffix.size(), suffix.size(), suffix) != 0) return -1;
  const std::string digits =
      filename.substr(prefix.size(), filename.size() - prefix.size() - suffix.size());
  if (digits.empty() || digits.size() > 18) return -1;
  int64_t step = 0;
  for (char ch : digits) {
    if (ch < '0' || ch > '9') return -1;
    step = step * 10 + (ch - '0');
  }
  return step;
}

struct Listed {
  int64_t step;
  std::string path;
};

// The files in `dir` named ckpt-<step><suffix>, newest (largest step) first.
std::vector<Listed> list_dir(const std::string& dir, const std::string& suffix) {
  std::vector<Listed> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const int64_t step = parse_step(name, suffix);
    if (step >= 0) out.push_back({step, it->path().string()});
  }
  if (ec) throw CheckpointError(dir + ": cannot list the directory: " + ec.message());
  std::sort(out.begin(), out.end(), [](const Listed& a, const Listed& b) {
    return a.step != b.step ? a.step > b.step : a.path > b.path;
  });
  return out;
}

std::string with_commas(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return (v < 0 ? "-" : "") + out;
}

}  // namespace

// ------------------------------------------------------------------ public API

void write_checkpoint(const std::string& path, const CheckpointState& state) {
  QuietHdf5 quiet;
  const std::string tmp = path + ".tmp";
  try {
    validate_state(state);
  } catch (const Problem& p) {
    throw CheckpointError(path + ": refusing to write: " + p.what);
  }
  std::error_code ec;
  fs::remove(tmp, ec);
  try {
    write_file(tmp, state);
    stage("closed");
    fsync_path(tmp, false, tmp);
    stage("fsynced");
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
      problem("cannot rename " + tmp + " onto it: " + std::strerror(errno));
  } catch (const Problem& p) {
    fs::remove(tmp, ec);
    throw CheckpointError(path + ": " + p.what);
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
  try {
    fsync_path(parent_dir(path), true, "directory " + parent_dir(path));
  } catch (const Problem& p) {
    throw CheckpointError(path + ": written, but " + p.what);
  }
  stage("renamed");
}

CheckpointState read_checkpoint(const std::string& path) {
  QuietHdf5 quiet;
  Scan scan;
  try {
    scan_file(path, true, scan);
  } catch (const Problem& p) {
    throw CheckpointError(path + ": " + p.what);
  }
  return std::move(scan.state);
}

void check_matches(const CheckpointState& state,
                   const std::vector<std::pair<std::string, std::vector<int64_t>>>& expected) {
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

  // Optimizer states.
  std::map<std::string, std::map<std::string, const CheckpointTensor*>> states;
  for (const auto& [sname, tensors] : state.optimizer) {
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
    for (const auto& [name, shape] : expected) {
      auto it = m.find(name);
      const std::string ds = "/optimizer/" + sname + "/" + name;
      if (it == m.end()) {
        problems.push_back("missing dataset " + ds + ": optimizer state " + sname +
                           " has no tensor for parameter " + name);
        continue;
      }
      const CheckpointTensor& t = *it->second;
      if (sname != "vr") {
        if (t.shape != shape)
          problems.push_back("optimizer state " + sname + ": parameter " + name + " has shape " +
                             shape_str(t.shape) + " in the checkpoint but " + shape_str(shape) +
                             " in the model");
        continue;
      }
      // Adafactor second moment: vr [rows] x vc [cols] factored, else vr holds all of it.
      const CheckpointTensor* vc = nullptr;
      if (vc_state) {
        auto jt = vc_state->find(name);
        if (jt != vc_state->end() && numel(jt->second->shape) > 0) vc = jt->second;
      }
      const int64_t n = numel(shape), r = numel(t.shape);
      const int64_t cols = vc ? numel(vc->shape) : 1;
      if (r < 0 || cols < 0 || r * cols != n)
        problems.push_back("optimizer state vr" + std::string(vc ? "/vc" : "") + ": parameter " +
                           name + " has shape " + shape_str(t.shape) +
                           (vc ? " x " + shape_str(vc->shape) : "") +
                           " in the checkpoint, which does not factor its shape " +
                           shape_str(shape) + " in the model");
    }
  }
  if (vc_state && !states.count("vr"))
    problems.push_back("optimizer state vc is present without vr");

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

std::string checkpoint_path(const std::string& dir, int64_t step) {
  if (step < 0) throw CheckpointError("checkpoint step " + std::to_string(step) + " is negative");
  std::string digits = std::to_string(step);
  if (digits.size() < 8) digits.insert(0, 8 - digits.size(), '0');
  return (fs::path(dir) / ("ckpt-" + digits + ".h5")).string();
}

void save_checkpoint(const std::string& dir, const CheckpointState& state, int keep) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw CheckpointError(dir + ": cannot create the checkpoint directory: " + ec.message());
  const std::string path = checkpoint_path(dir, state.step);
  write_checkpoint(path, state);

  // The new file is complete and durable; now prune.
  std::string failures;
  if (keep >= 1) {
    int kept = 1;  // the file just written
    for (const auto& f : list_dir(dir, ".h5")) {
      if (f.step >= state.step) continue;
      if (kept < keep) {
        ++kept;
        continue;
      }
      if (!fs::remove(f.path, ec) && ec) failures += " " + f.path + " (" + ec.message() + ")";
    }
  }
  for (const auto& f : list_dir(dir, ".h5.tmp"))
    if (!fs::remove(f.path, ec) && ec) failures += " " + f.path + " (" + ec.message() + ")";
  if (!failures.empty())
    throw CheckpointError(path + ": written, but could not remove:" + failures);
  stage("pruned");
}

std::optional<std::string> find_resumable(const std::string& dir, std::vector<std::string>* notes) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return std::nullopt;
  for (const auto& f : list_dir(dir, ".h5")) {
    try {
      const CheckpointState s = read_checkpoint(f.path);
      if (s.step == f.step) return f.path;
      if (notes)
        notes->push_back(f.path + ": its step attribute is " + std::to_string(s.step) +
                         ", not the " + std::to_string(f.step) + " in its name");
    } catch (const CheckpointError& e) {
      if (notes) notes->push_back(e.what());
    }
  }
  return std::nullopt;
}

bool inspect_checkpoint(const std::string& path, std::ostream& out) {
  QuietHdf5 quiet;
  Scan scan;
  try {
    scan_file(path, false, scan);
  } catch (const Problem& p) {  // not expected in collecting mode; stay non-throwing anyway
    scan.problems.push_back(p.what);
  } catch (const std::exception& e) {
    scan.problems.push_back(std::string("internal error: ") + e.what());
  }
  const CheckpointState& s = scan.state;
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  out << "file           : " << path;
  if (!ec) out << " (" << with_commas(static_cast<int64_t>(size)) << " bytes)";
  out << "\n";
  if (scan.opened) {
    out << "format         : " << (scan.format.empty() ? "?" : scan.format) << " version "
        << (scan.format_version < 0 ? std::string("?") : std::to_string(scan.format_version))
        << ", written by build " << (scan.build_version.empty() ? "?" : scan.build_version) << "\n";
    out << "step           : " << s.step << "\n";
    out << "tokens seen    : " << with_commas(s.tokens_seen) << "\n";
    out << "samples drawn  : " << with_commas(s.samples_drawn) << "\n";
    out << "seed           : " << s.seed << "\n";
    out << "world          : dp " << s.dp << " x sp " << s.sp << "\n";
    out << "optimizer      : " << (s.optimizer_name.empty() ? "?" : s.optimizer_name) << "\n";

    std::vector<std::string> lines;
    std::istringstream text(s.config_text);
    for (std::string line; std::getline(text, line);) lines.push_back(line);
    out << "config         : " << lines.size() << " lines";
    if (lines.size() > static_cast<size_t>(kConfigSummaryLines))
      out << " (first " << kConfigSummaryLines << " shown)";
    out << "\n";
    for (size_t i = 0; i < lines.size() && i < static_cast<size_t>(kConfigSummaryLines); ++i)
      out << "    " << lines[i] << "\n";

    int64_t params = 0, tensors = 0;
    for (const auto& d : scan.datasets)
      if (d.full.rfind("/model/", 0) == 0) {
        ++tensors;
        if (numel(d.shape) > 0) params += numel(d.shape);
      }
    out << "parameters     : " << with_commas(params) << " in " << tensors << " tensors\n";

    size_t wname = 7, wshape = 5, wtype = 5;
    for (const auto& d : scan.datasets) {
      wname = std::max(wname, d.full.size());
      wshape = std::max(wshape, shape_str(d.shape).size());
      wtype = std::max(wtype, d.dtype.size());
    }
    auto pad = [](const std::string& v, size_t w) {
      return v + std::string(w - std::min(w, v.size()), ' ');
    };
    out << "datasets       : " << scan.datasets.size() << "\n";
    out << "  " << pad("dataset", wname) << "  " << pad("shape", wshape) << "  "
        << pad("dtype", wtype) << "  checksum\n";
    for (const auto& d : scan.datasets) {
      out << "  " << pad(d.full, wname) << "  "
          << pad(d.shape.empty() ? "?" : shape_str(d.shape), wshape) << "  " << pad(d.dtype, wtype)
          << "  ";
      if (d.ok)
        out << "ok\n";
      else
        out << "FAILED (" << d.problem << ")\n";
    }
  }
  const bool valid = scan.problems.empty();
  if (valid) {
    out << "status         : valid\n";
  } else {
    out << "status         : INVALID, " << scan.problems.size() << " problem"
        << (scan.problems.size() == 1 ? "" : "s") << "\n";
    for (const auto& p : scan.problems) out << "  - " << p << "\n";
  }
  return valid;
}

}  // namespace reformer
