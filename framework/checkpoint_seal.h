// Internal to the checkpoint module: the whole-file checksum footer that
// proves a file whole before libhdf5 reads any of it.
//
// A format-2 checkpoint is the HDF5 file followed by a 32-byte footer, all
// integers little-endian (docs/checkpoint-format.md, "Whole-file checksum"):
//   [0, 8)    magic "RFMRCKPT"
//   [8, 12)   u32 format version (2)
//   [12, 16)  u32 reserved, 0
//   [16, 24)  u64 length of the HDF5 data = file size - 32
//   [24, 32)  u64 CRC-64/XZ of every byte before it (HDF5 data and footer [0, 24))
// HDF5 ignores bytes past the end address in its superblock, so the standard
// tools still read the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace reformer::ckpt {

constexpr size_t kFooterSize = 32;

// CRC-64/XZ (ECMA-182 polynomial, reflected, init and final xor all ones),
// continued from `crc` (0 to start; pass the previous result to go on).
// crc64(0, "123456789", 9) == 0x995dc9bbdf1939fa.
uint64_t crc64(uint64_t crc, const void* data, size_t n);

// The footer that follows `data_len` bytes of HDF5 data whose crc64 is `crc`.
std::string make_footer(uint64_t crc, uint64_t data_len);

// Proves the file at `path` whole: a footer is present and well formed, its
// length field matches the file and the CRC matches every byte. Returns the
// length of the HDF5 data. Otherwise a Problem saying what is wrong: "not an
// HDF5 file", "truncated or unreadable (...)", "fails its whole-file checksum
// (...)", a format-1 file without a footer, an unsupported footer version.
// Reads the whole file once, never through HDF5.
uint64_t verify_sealed_file(const std::string& path, uint64_t file_size);

// Test support. seal_file appends a footer covering the whole (bare HDF5)
// file; unseal_file removes the footer of a sealed file, so that a test can
// edit it with HDF5 and seal it again. Throw Problem on I/O errors.
void seal_file(const std::string& path);
void unseal_file(const std::string& path);

}  // namespace reformer::ckpt
