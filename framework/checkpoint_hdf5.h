// Internal to the checkpoint module (framework/checkpoint_*.cpp): the HDF5
// error channel and handle ownership shared by the writer, the reader and
// inspection. Nothing outside the module includes this header, except tests
// that build damaged files.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace reformer::ckpt {

constexpr const char* kFormatName = "reformer-checkpoint";
// Version 2: a whole-file checksum footer follows the HDF5 data
// (checkpoint_seal.h). Version 1 files had none and are refused.
constexpr int64_t kFormatVersion = 2;

// A problem found inside the module. Public entry points turn it into a
// CheckpointError prefixed with the file's path; it never escapes them.
struct Problem {
  std::string what;
};

[[noreturn]] void problem(std::string what);

// Turns HDF5's automatic error-stack printing off for the process. Every
// public entry point calls it first: errors reach callers as CheckpointError,
// and HDF5 must not print its stack (nor "infinite loop closing library" at
// exit) on its own. Idempotent and cheap.
void silence_hdf5_errors();

// "HDF5: <innermost description>" from HDF5's current error stack (then
// cleared), or "no detail from HDF5".
std::string h5_detail();

// True when the current error stack (then cleared) reports a checksum failure;
// `detail` gets h5_detail()'s text.
bool h5_checksum_failure(std::string& detail);

// Owns one HDF5 identifier and closes it with the matching H5*close, on every
// path: a Handle that goes out of scope during a throw closes its object.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  Handle(Handle&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), closer_(o.closer_) {}
  Handle& operator=(Handle&& o) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { close(); }

  hid_t get() const { return id_; }
  // Closes now; returns the close call's status (0 when already closed).
  herr_t close();

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// Wraps an identifier returned by an HDF5 call; a negative one is a Problem
// "<what> failed (HDF5: ...)".
Handle own(hid_t id, Handle::Closer closer, const std::string& what);
// A negative status is a Problem "<what> failed (HDF5: ...)".
void check(herr_t status, const std::string& what);

// File-access properties shared by writer and reader: the 1.10 file format
// (checksummed superblock, object headers and chunk indexes), strong close so
// that closing the file closes everything in it, no flock.
Handle file_access_plist();

// "[2, 3]".
std::string shape_str(const std::vector<int64_t>& shape);
// Element count, or -1 when a dim is negative or the count overflows int64.
int64_t numel(const std::vector<int64_t>& shape);
// "" when every value is finite, else the first bad one: "NaN at index 5".
std::string first_non_finite(const std::vector<float>& data);

}  // namespace reformer::ckpt
