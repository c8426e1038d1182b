// HDF5 error channel and handle ownership for the checkpoint module.
#include "framework/checkpoint_hdf5.h"

#include <algorithm>
#include <cmath>

namespace reformer::ckpt {

void problem(std::string what) { throw Problem{std::move(what)}; }

void silence_hdf5_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

namespace {

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

std::string detail_of(const std::vector<std::string>& stack) {
  return stack.empty() ? std::string("no detail from HDF5") : "HDF5: " + stack.front();
}

}  // namespace

std::string h5_detail() { return detail_of(h5_error_stack()); }

bool h5_checksum_failure(std::string& detail) {
  const auto stack = h5_error_stack();
  detail = detail_of(stack);
  for (const auto& s : stack)
    if (s.find("checksum") != std::string::npos || s.find("Fletcher") != std::string::npos)
      return true;
  return false;
}

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    close();
    id_ = std::exchange(o.id_, H5I_INVALID_HID);
    closer_ = o.closer_;
  }
  return *this;
}

herr_t Handle::close() {
  herr_t r = 0;
  if (id_ >= 0 && closer_) r = closer_(id_);
  id_ = H5I_INVALID_HID;
  return r;
}

Handle own(hid_t id, Handle::Closer closer, const std::string& what) {
  if (id < 0) problem(what + " failed (" + h5_detail() + ")");
  return Handle(id, closer);
}

void check(herr_t status, const std::string& what) {
  if (status < 0) problem(what + " failed (" + h5_detail() + ")");
}

Handle file_access_plist() {
  Handle fapl = own(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "H5Pcreate(file access)");
  check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_V110), "H5Pset_libver_bounds");
  check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG), "H5Pset_fclose_degree");
#if H5_VERSION_GE(1, 10, 7)
  check(H5Pset_file_locking(fapl.get(), false, true), "H5Pset_file_locking");
#endif
  return fapl;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > INT64_MAX / d) return -1;
    n *= d;
  }
  return n;
}

std::string first_non_finite(const std::vector<float>& data) {
  const auto bad = std::find_if(data.begin(), data.end(), [](float v) { return !std::isfinite(v); });
  if (bad == data.end()) return "";
  return std::string(std::isnan(*bad) ? "NaN" : *bad > 0 ? "+Inf" : "-Inf") + " at index " +
         std::to_string(bad - data.begin());
}

}  // namespace reformer::ckpt
