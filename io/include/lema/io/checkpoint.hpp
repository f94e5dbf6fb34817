// A safetensors checkpoint, read in place: one file, a directory holding one file, or a sharded
// Hugging Face directory (model.safetensors.index.json + shards).
//
// Opening reads and validates only the headers; tensor bytes are never touched. Validation is
// strict (see docs/ARCHITECTURE.md, "Checkpoint validation"): any violation throws
// lema::io::CheckpointError naming the file, the tensor and the rule. Malformed input never
// crashes and never causes a read outside the file.
//
// Thread safety: a Checkpoint is immutable after open(); const access from any thread is safe.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "lema/io/dtype.hpp"
#include "lema/io/errors.hpp"

namespace lema::io {

/// Upper bound on a header's JSON length, as in the reference implementation.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

struct TensorInfo {
  std::string name;
  Dtype dtype;
  std::vector<std::int64_t> shape;  // [] for a scalar; may contain 0
  std::uint32_t file = 0;           // index into Checkpoint::files()
  std::uint64_t offset = 0;         // absolute offset of the first byte in that file
  std::uint64_t nbytes = 0;

  std::uint64_t numel() const;
};

struct FileInfo {
  std::filesystem::path path;
  std::uint64_t header_bytes = 0;  // 8 + N: where the data section starts
  std::uint64_t file_size = 0;
  std::map<std::string, std::string> metadata;  // the header's __metadata__
};

/// One file's header, parsed and validated against the size of its data section.
struct ParsedHeader {
  std::vector<TensorInfo> tensors;  // file = 0; offset relative to the data section; file order
  std::map<std::string, std::string> metadata;
};

/// Parses the JSON header of a safetensors file (the N bytes after the 8-byte length).
/// `data_bytes` is the size of the data section (file size - 8 - N). `file_label` is used in
/// errors only. Throws CheckpointError. Exposed for the fuzzer and the tests.
ParsedHeader parse_header(std::string_view header_json, std::uint64_t data_bytes,
                          const std::string& file_label);

class Checkpoint {
 public:
  /// Opens a .safetensors file, a directory with exactly one, or a sharded directory with an
  /// index. Throws CheckpointError (and ReadError only when reading a readable file fails).
  static Checkpoint open(const std::filesystem::path& path);

  /// The files in a stable order (shards sorted by name).
  const std::vector<FileInfo>& files() const noexcept { return files_; }
  /// All tensors, ordered by (file, offset).
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  /// nullptr when absent.
  const TensorInfo* find(std::string_view name) const;
  /// Throws CheckpointError (rule "no-such-tensor") when absent.
  const TensorInfo& at(std::string_view name) const;
  /// Sum of all tensors' bytes.
  std::uint64_t total_bytes() const noexcept { return total_bytes_; }
  /// The path given to open().
  const std::filesystem::path& source() const noexcept { return source_; }

 private:
  std::filesystem::path source_;
  std::vector<FileInfo> files_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> by_name_;
  std::uint64_t total_bytes_ = 0;
};

}  // namespace lema::io
