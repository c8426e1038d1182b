// The whole-file checksum footer of format-2 checkpoints.
#include "framework/checkpoint_seal.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <vector>

#include "framework/checkpoint_hdf5.h"

namespace reformer::ckpt {

namespace {

constexpr char kMagic[8] = {'R', 'F', 'M', 'R', 'C', 'K', 'P', 'T'};
constexpr char kHdf5Signature[8] = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
constexpr uint64_t kPoly = 0xC96C5795D7870F42ull;  // ECMA-182, reflected

// Slicing-by-8 tables: table[k][b] is the CRC of byte b followed by k zero bytes.
const std::array<std::array<uint64_t, 256>, 8>& tables() {
  static const auto t = [] {
    std::array<std::array<uint64_t, 256>, 8> t{};
    for (uint64_t b = 0; b < 256; ++b) {
      uint64_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1) ? kPoly : 0);
      t[0][b] = c;
    }
    for (int k = 1; k < 8; ++k)
      for (int b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xff];
    return t;
  }();
  return t;
}

uint64_t load_le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void store_le(char* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// Reads exactly `n` bytes at `offset`; false on a short read or an error.
bool pread_all(int fd, void* buf, size_t n, uint64_t offset) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return true;
}

// Owns a file descriptor.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Why a file has no footer: not HDF5 at all, a truncated checkpoint, or a
// complete HDF5 file without one (format 1, or another program's file). The
// superblock's end-of-file address (8-byte offsets) tells
// a truncated file from a complete one; it is only used for the message.
[[noreturn]] void no_footer(int fd, uint64_t file_size) {
  unsigned char sb[56] = {};
  const bool have = pread_all(fd, sb, std::min<uint64_t>(sizeof sb, file_size), 0);
  if (!have || file_size < 8 || std::memcmp(sb, kHdf5Signature, 8) != 0)
    problem("not an HDF5 file (no HDF5 signature)");
  // Offset of the end-of-file address by superblock version (8-byte offsets).
  int eof_at = 0;
  if ((sb[8] == 2 || sb[8] == 3) && sb[9] == 8) eof_at = 28;
  if (sb[8] == 0 && sb[13] == 8) eof_at = 40;
  if (sb[8] == 1 && sb[13] == 8) eof_at = 44;
  if (eof_at > 0 && file_size >= static_cast<uint64_t>(eof_at) + 8) {
    const uint64_t eof = load_le(sb + eof_at, 8);
    if (eof > file_size)
      problem("truncated or unreadable (the file has " + std::to_string(file_size) +
              " bytes but its HDF5 data ends at byte " + std::to_string(eof) +
              "; no checksum footer)");
    if (eof == file_size)
      problem("no whole-file checksum footer: a format version 1 checkpoint or another "
              "program's HDF5 file (this build reads format version " +
              std::to_string(kFormatVersion) + " only)");
  }
  problem("truncated or unreadable (no checksum footer)");
}

}  // namespace

uint64_t crc64(uint64_t crc, const void* data, size_t n) {
  const auto& t = tables();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (; n >= 8; n -= 8, p += 8) {
    crc ^= load_le(p, 8);
    crc = t[7][crc & 0xff] ^ t[6][(crc >> 8) & 0xff] ^ t[5][(crc >> 16) & 0xff] ^
          t[4][(crc >> 24) & 0xff] ^ t[3][(crc >> 32) & 0xff] ^ t[2][(crc >> 40) & 0xff] ^
          t[1][(crc >> 48) & 0xff] ^ t[0][crc >> 56];
  }
  for (; n > 0; --n, ++p) crc = (crc >> 8) ^ t[0][(crc ^ *p) & 0xff];
  return ~crc;
}

std::string make_footer(uint64_t crc, uint64_t data_len) {
  std::string f(kFooterSize, '\0');
  std::memcpy(f.data(), kMagic, 8);
  store_le(f.data() + 8, static_cast<uint64_t>(kFormatVersion), 4);
  store_le(f.data() + 16, data_len, 8);
  store_le(f.data() + 24, crc64(crc, f.data(), 24), 8);
  return f;
}

uint64_t verify_sealed_file(const std::string& path, uint64_t file_size) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) problem(std::string("cannot be opened: ") + std::strerror(errno));
  unsigned char footer[kFooterSize];
  if (file_size < kFooterSize || !pread_all(f.fd, footer, kFooterSize, file_size - kFooterSize) ||
      std::memcmp(footer, kMagic, 8) != 0)
    no_footer(f.fd, file_size);
  const uint64_t version = load_le(footer + 8, 4);
  const uint64_t data_len = load_le(footer + 16, 8);
  const uint64_t stored = load_le(footer + 24, 8);
  const std::string newer =
      version == static_cast<uint64_t>(kFormatVersion)
          ? ""
          : ", or it was written in format version " + std::to_string(version) +
                ", which this build does not read";
  if (data_len != file_size - kFooterSize)
    problem("truncated or unreadable (its checksum footer records " + std::to_string(data_len) +
            " bytes of HDF5 data, the file holds " + std::to_string(file_size - kFooterSize) +
            newer + ")");
  std::vector<char> buf(std::min<uint64_t>(file_size, uint64_t(1) << 20));
  uint64_t crc = 0;
  for (uint64_t at = 0, end = file_size - 8; at < end;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), end - at));
    if (!pread_all(f.fd, buf.data(), n, at))
      problem("truncated or unreadable (read failed at byte " + std::to_string(at) + ")");
    crc = crc64(crc, buf.data(), n);
    at += n;
  }
  if (crc != stored)
    problem("fails its whole-file checksum (stored crc64 " + std::to_string(stored) +
            ", computed " + std::to_string(crc) + "): the file is damaged" + newer);
  if (!newer.empty())
    problem("format version " + std::to_string(version) + " is not supported (this build reads "
            "version " + std::to_string(kFormatVersion) + ")");
  return data_len;
}

void seal_file(const std::string& path) {
  Fd f{::open(path.c_str(), O_RDWR | O_CLOEXEC)};
  if (f.fd < 0) problem("cannot open " + path + ": " + std::strerror(errno));
  const off_t size = ::lseek(f.fd, 0, SEEK_END);
  std::vector<char> bytes(static_cast<size_t>(size));
  if (size < 0 || !pread_all(f.fd, bytes.data(), bytes.size(), 0)) problem("cannot read " + path);
  const std::string footer = make_footer(crc64(0, bytes.data(), bytes.size()), bytes.size());
  if (::pwrite(f.fd, footer.data(), footer.size(), size) != static_cast<ssize_t>(footer.size()))
    problem("cannot write " + path + ": " + std::strerror(errno));
}

void unseal_file(const std::string& path) {
  Fd f{::open(path.c_str(), O_RDWR | O_CLOEXEC)};
  const off_t size = f.fd < 0 ? -1 : ::lseek(f.fd, 0, SEEK_END);
  if (size < static_cast<off_t>(kFooterSize) || ::ftruncate(f.fd, size - kFooterSize) != 0)
    problem("cannot remove the footer of " + path);
}

}  // namespace reformer::ckpt
