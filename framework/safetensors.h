// The safetensors file format (HuggingFace): format only, no model knowledge.
//
// A file is
//   [0, 8)       u64 little-endian N, the length of the header
//   [8, 8 + N)   a JSON object: {"<name>": {"dtype": "F32", "shape": [..],
//                "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}
//                (may end in spaces, which pad it to a multiple of 8 bytes)
//   [8 + N, end) the data buffer: each tensor's bytes, row-major, little-endian,
//                at [begin, end) relative to the start of the buffer.
// Every byte of the buffer belongs to exactly one tensor.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace reformer {

// One named tensor, values in fp32 (whatever its dtype in the file).
struct SafeTensor {
  std::string name;            // any non-empty UTF-8 string but "__metadata__"
  std::vector<int64_t> shape;  // row-major; rank 0 (a scalar) allowed; dims >= 0
  std::vector<float> data;     // product(shape) values
};

// Writes `tensors` (in this order, dtype F32) and `metadata` (string pairs,
// "__metadata__") to `path` atomically: the bytes go to `path + ".tmp"`, which
// is fsynced and renamed onto `path`, and the directory is fsynced. Throws
// CheckpointError naming the file and the tensor for an empty, duplicate or
// reserved name, a negative dim or data.size() != product(shape), or an I/O
// failure (the temporary file is then removed and `path` is untouched).
void write_safetensors(const std::string& path, const std::vector<SafeTensor>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata = {});

// Reads and validates a whole file; tensors come back in the order of their
// data offsets. Accepts dtypes F32, F16 and BF16 (converted exactly to fp32).
// Throws CheckpointError naming the file (and the tensor where there is one)
// for: a file shorter than its header says, a header length over 100 MB or
// past the end, a header that is not a JSON object of the form above, an
// unknown dtype, a negative dim, a byte count that does not match
// shape x dtype, offsets out of the buffer, overlapping, or leaving bytes of
// the buffer unclaimed, a duplicate name.
std::vector<SafeTensor> read_safetensors(const std::string& path);

// Replaces `path` by `bytes` atomically (temporary file, fsync, rename, fsync
// of the directory). Throws CheckpointError naming the file on failure.
void write_file_atomically(const std::string& path, const std::string& bytes);

// `s` as a JSON string literal, quotes included ("a\"b" for a"b).
std::string json_quote(const std::string& s);

}  // namespace reformer
