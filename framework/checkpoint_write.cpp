// The checkpoint writer: validation of the state, the HDF5 layout built in
// memory, and the atomic protocol that puts it on disk with its checksum
// footer (docs/checkpoint-format.md, "Writing").
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>

#include "framework/checkpoint.h"
#include "framework/checkpoint_hdf5.h"
#include "framework/checkpoint_seal.h"
#include "kernels/errors.h"

namespace reformer {

void (*checkpoint_stage_hook)(const char* stage) = nullptr;

namespace ckpt {
namespace {

namespace fs = std::filesystem;

// Elements per chunk at most (4 MiB of fp32). Fletcher-32 covers one chunk, so
// a checksum failure is localised to at most this much data.
constexpr hsize_t kChunkCap = hsize_t(1) << 20;
// Growth step of the in-memory file image.
constexpr size_t kImageIncrement = size_t(4) << 20;

#ifdef REFORMER_VERSION
constexpr const char* kBuildVersion = REFORMER_VERSION;
#else
constexpr const char* kBuildVersion = "unknown";
#endif

void stage(const char* name) {
  if (checkpoint_stage_hook) checkpoint_stage_hook(name);
}

bool bad_name(const std::string& n) {
  return n.empty() || n == "." || n == ".." || n.find('/') != std::string::npos;
}

void validate_tensors(const std::string& where, const std::vector<CheckpointTensor>& tensors) {
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    const std::string full = where + "/" + t.name;
    if (bad_name(t.name))
      problem("invalid tensor name \"" + t.name + "\" in " + where +
              " (empty, \".\", \"..\" or containing '/')");
    if (!seen.insert(t.name).second) problem("duplicate tensor " + full);
    if (t.shape.empty()) problem("tensor " + full + " has rank 0; store scalars with shape [1]");
    const int64_t n = numel(t.shape);
    if (n < 0) problem("tensor " + full + " has invalid shape " + shape_str(t.shape));
    if (static_cast<uint64_t>(n) != t.data.size())
      problem("tensor " + full + " has shape " + shape_str(t.shape) + " (" + std::to_string(n) +
              " values) but " + std::to_string(t.data.size()) + " values");
    // A run that diverged must not overwrite (through pruning) the last good
    // checkpoints with one that cannot be resumed.
    const std::string bad = first_non_finite(t.data);
    if (!bad.empty()) problem("tensor " + full + " holds a non-finite value (" + bad + ")");
  }
}

void validate_state(const CheckpointState& s) {
  if (s.step < 0 || s.tokens_seen < 0 || s.samples_drawn < 0)
    problem("step, tokens_seen and samples_drawn must be >= 0");
  if (s.dp < 1 || s.sp < 1) problem("dp and sp must be >= 1");
  validate_tensors("/model", s.model);
  std::set<std::string> states;
  for (const auto& [name, tensors] : s.optimizer) {
    if (bad_name(name)) problem("invalid optimizer state name \"" + name + "\"");
    if (!states.insert(name).second) problem("duplicate optimizer state " + name);
    validate_tensors("/optimizer/" + name, tensors);
  }
}

void write_attr(hid_t obj, const char* name, hid_t file_type, hid_t mem_type, const void* value) {
  Handle space = own(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate");
  Handle attr = own(H5Acreate2(obj, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    H5Aclose, std::string("creating attribute ") + name);
  check(H5Awrite(attr.get(), mem_type, value), std::string("writing attribute ") + name);
  check(attr.close(), std::string("closing attribute ") + name);
}

void write_string_attr(hid_t obj, const char* name, const std::string& value) {
  // Fixed-length so the text lives in the (checksummed) object header; at
  // least one byte because HDF5 refuses zero-sized string types.
  Handle type = own(H5Tcopy(H5T_C_S1), H5Tclose, "H5Tcopy");
  check(H5Tset_size(type.get(), std::max<size_t>(1, value.size())), "H5Tset_size");
  check(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), "H5Tset_strpad");
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), "H5Tset_cset");
  const std::string buf = value.empty() ? std::string(1, '\0') : value;
  write_attr(obj, name, type.get(), type.get(), buf.data());
}

void write_int_attr(hid_t obj, const char* name, int64_t v) {
  write_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v);
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

// Receives the final in-memory file image when HDF5 closes a core-driver file
// (the image HDF5 itself finalised on close; H5Fget_file_image on a file open
// for writing returns a superblock with a stale checksum in HDF5 1.10).
struct ImageSink {
  void* buf = nullptr;
  ~ImageSink() { std::free(buf); }

  static H5FD_file_image_callbacks_t callbacks(ImageSink* sink) {
    H5FD_file_image_callbacks_t cb{};
    cb.image_malloc = [](size_t size, H5FD_file_image_op_t, void*) { return std::malloc(size); };
    cb.image_memcpy = [](void* dst, const void* src, size_t size, H5FD_file_image_op_t, void*) {
      return std::memcpy(dst, src, size);
    };
    cb.image_realloc = [](void* p, size_t size, H5FD_file_image_op_t, void*) {
      return std::realloc(p, size);
    };
    cb.image_free = [](void* p, H5FD_file_image_op_t op, void* udata) -> herr_t {
      auto* self = static_cast<ImageSink*>(udata);
      if (op == H5FD_FILE_IMAGE_OP_FILE_CLOSE) std::swap(self->buf, p);
      std::free(p);
      return 0;
    };
    cb.udata_copy = [](void* udata) { return udata; };
    cb.udata_free = [](void*) -> herr_t { return 0; };
    cb.udata = sink;
    return cb;
  }
};

// The end-of-file address in a version 2/3 superblock at offset 0 (8-byte
// offsets), i.e. the length of the HDF5 file; 0 when it is not such a superblock.
uint64_t superblock_eof(const unsigned char* p, size_t n) {
  if (n < 48 || std::memcmp(p, "\x89HDF\r\n\x1a\n", 8) != 0 || p[8] < 2 || p[9] != 8) return 0;
  uint64_t eof = 0;
  for (int i = 7; i >= 0; --i) eof = (eof << 8) | p[28 + i];
  return eof;
}

void write_contents(hid_t root, const CheckpointState& s);

// The complete HDF5 file for `s`, built in memory (HDF5's core driver without
// a backing store): libhdf5 never touches the disk while writing, so a full
// disk or an I/O error is met by plain POSIX writes, not inside HDF5's close
// path. Stages "model_written", "optimizer_written".
std::vector<char> build_image(const std::string& name, const CheckpointState& s) {
  ImageSink sink;
  uint64_t capacity = 0;
  {
    Handle fapl = file_access_plist();
    check(H5Pset_fapl_core(fapl.get(), kImageIncrement, false), "H5Pset_fapl_core");
    H5FD_file_image_callbacks_t cb = ImageSink::callbacks(&sink);
    check(H5Pset_file_image_callbacks(fapl.get(), &cb), "H5Pset_file_image_callbacks");
    // No modification times anywhere: the same state always gives the same bytes.
    Handle fcpl = own(H5Pcreate(H5P_FILE_CREATE), H5Pclose, "H5Pcreate(file create)");
    check(H5Pset_obj_track_times(fcpl.get(), false), "H5Pset_obj_track_times");
    Handle file = own(H5Fcreate(name.c_str(), H5F_ACC_TRUNC, fcpl.get(), fapl.get()), H5Fclose,
                      "creating the HDF5 image of " + name);
    write_contents(file.get(), s);
    hsize_t size = 0;
    check(H5Fget_filesize(file.get(), &size), "sizing the HDF5 image");
    capacity = size;
    check(file.close(), "closing the HDF5 image");
  }
  const auto* p = static_cast<const unsigned char*>(sink.buf);
  const uint64_t len = p ? superblock_eof(p, static_cast<size_t>(capacity)) : 0;
  if (len == 0 || len > capacity) problem("HDF5 produced no usable file image");
  return std::vector<char>(p, p + len);
}

void write_contents(hid_t root, const CheckpointState& s) {
  write_string_attr(root, "format", kFormatName);
  write_int_attr(root, "format_version", kFormatVersion);
  write_int_attr(root, "step", s.step);
  write_int_attr(root, "tokens_seen", s.tokens_seen);
  write_int_attr(root, "samples_drawn", s.samples_drawn);
  write_attr(root, "seed", H5T_STD_U64LE, H5T_NATIVE_UINT64, &s.seed);
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
}

// Owns a file descriptor being written; closes it on every path.
class OutFile {
 public:
  OutFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) problem("cannot create " + path + ": " + std::strerror(errno));
  }
  ~OutFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  OutFile(const OutFile&) = delete;
  OutFile& operator=(const OutFile&) = delete;

  void write(const void* data, size_t n) {
    const auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) problem("cannot write " + path_ + ": " + std::strerror(w < 0 ? errno : EIO));
      p += w;
      n -= static_cast<size_t>(w);
    }
  }
  void sync() {
    if (::fsync(fd_) != 0) problem("fsync of " + path_ + " failed: " + std::strerror(errno));
  }
  void close() {
    const int r = ::close(fd_);
    fd_ = -1;
    if (r != 0) problem("closing " + path_ + " failed: " + std::strerror(errno));
  }

 private:
  std::string path_;
  int fd_ = -1;
};

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECTORY);
  if (fd < 0) problem("cannot open directory " + dir + " for fsync: " + std::strerror(errno));
  const int r = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (r != 0) problem("fsync of directory " + dir + " failed: " + std::strerror(err));
}

std::string parent_dir(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

}  // namespace
}  // namespace ckpt

void write_checkpoint(const std::string& path, const CheckpointState& state) {
  using namespace ckpt;
  silence_hdf5_errors();
  const std::string tmp = path + ".tmp";
  try {
    validate_state(state);
  } catch (const Problem& p) {
    throw CheckpointError(path + ": refusing to write: " + p.what);
  }
  std::error_code ec;
  fs::remove(tmp, ec);
  try {
    OutFile out(tmp);
    stage("created");
    const std::vector<char> image = build_image(tmp, state);
    out.write(image.data(), image.size());
    out.write(make_footer(crc64(0, image.data(), image.size()), image.size()).data(),
              kFooterSize);
    stage("closed");
    out.sync();
    stage("fsynced");
    out.close();
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
    fsync_dir(parent_dir(path));
  } catch (const Problem& p) {
    throw CheckpointError(path + ": written, but " + p.what);
  }
  stage("renamed");
}

}  // namespace reformer
