// Writes safetensors files the way the reference writer does: header padded with spaces to a
// multiple of 8, tensors ordered by dtype (descending alignment) then name, data contiguous.
// Files are written atomically: a temporary file beside the target, fsync, rename, fsync of
// the directory. Nothing partial is ever visible under the target name.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lema/io/dtype.hpp"

namespace lema::io {

struct TensorToWrite {
  std::string name;
  Dtype dtype;
  std::vector<std::int64_t> shape;
  /// Produces the tensor's bytes into `out` (exactly nbytes, delivered in pieces at increasing
  /// offsets so huge tensors need not be held in memory): fill(out, offset_in_tensor).
  std::function<void(std::span<std::byte> out, std::uint64_t offset)> fill;
};

/// Byte length of a tensor of this dtype and shape (throws InvalidArgument on overflow or
/// sub-byte dtypes whose element count does not fill whole bytes).
std::uint64_t tensor_nbytes(Dtype dtype, std::span<const std::int64_t> shape);

/// Writes one file atomically. Throws SystemError / InvalidArgument.
void write_safetensors(const std::filesystem::path& path, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// Writes `contents` to `path` atomically (temp + fsync + rename + directory fsync).
void write_file_atomically(const std::filesystem::path& path, std::string_view contents);

/// The name of a temporary that the two writers above create for a target named `target`
/// in the same directory: ".<target>.tmp-<pid>-<n>". A process killed before the rename leaves
/// it behind; whoever owns the directory exclusively may remove such names (and only them).
bool is_temporary_of(std::string_view name, std::string_view target);

}  // namespace lema::io
