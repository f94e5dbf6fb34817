// Reading the header of one .safetensors file from disk.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "lema/base/unique_fd.hpp"
#include "lema/io/checkpoint.hpp"

namespace lema::io::detail {

struct LoadedFile {
  FileInfo info;        // metadata moved out of the header into here
  ParsedHeader header;  // offsets still relative to the data section
};

/// An open regular file and its size.
struct RegularFile {
  UniqueFd fd;
  std::uint64_t size = 0;
};

/// Opens `path` for reading without ever blocking (see Note [Never block on open]). Throws
/// CheckpointError naming `label`: "not-found", or "unreadable" for a FIFO, directory, device
/// or socket ("is a FIFO, not a regular file") and for a file that cannot be opened.
RegularFile open_regular_file(const std::filesystem::path& path, const std::string& label);

/// Reads exactly `length` bytes at `offset` (retrying short reads and EINTR); throws ReadError
/// naming `file` and `purpose` ("reading the index") when the read fails or the file ends first.
void pread_exact(int fd, char* out, std::uint64_t length, std::uint64_t offset,
                 const std::string& file, const char* purpose);

/// Reads and validates the header of `path` with pread (never mapping the file). Errors name the
/// file as `path.string()`: CheckpointError for a missing, unreadable or malformed file,
/// ReadError when a read fails or the file shrinks underneath.
LoadedFile load_safetensors_file(const std::filesystem::path& path);

}  // namespace lema::io::detail
