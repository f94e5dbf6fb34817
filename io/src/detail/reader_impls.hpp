// The two Reader implementations, as Reader::open sees them.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "lema/io/reader.hpp"

namespace lema::io::detail {

std::unique_ptr<Reader> make_pread_reader(std::vector<std::filesystem::path> files,
                                          const ReaderOptions& options);

/// Returns null and sets `why` when io_uring cannot be used here (not built in, or the kernel
/// or a seccomp profile refuses the ring); throws for errors unrelated to io_uring (a file that
/// cannot be opened).
std::unique_ptr<Reader> make_uring_reader(const std::vector<std::filesystem::path>& files,
                                          const ReaderOptions& options, std::string& why);

}  // namespace lema::io::detail
