// Reading the header of one .safetensors file from disk.
#pragma once

#include <filesystem>

#include "lema/io/checkpoint.hpp"

namespace lema::io::detail {

struct LoadedFile {
  FileInfo info;        // metadata moved out of the header into here
  ParsedHeader header;  // offsets still relative to the data section
};

/// Reads and validates the header of `path` with pread (never mapping the file). Errors name the
/// file as `path.string()`: CheckpointError for a missing, unreadable or malformed file,
/// ReadError when a read fails or the file shrinks underneath.
LoadedFile load_safetensors_file(const std::filesystem::path& path);

}  // namespace lema::io::detail
