#include "lema/io/errors.hpp"

#include <cstring>
#include <string>

namespace lema::io {

CheckpointError::CheckpointError(std::string file, std::string tensor, std::string rule,
                                 const std::string& detail)
    : Error(file + ": " + detail),
      file_(std::move(file)),
      tensor_(std::move(tensor)),
      rule_(std::move(rule)),
      detail_(detail) {}

ReadError::ReadError(std::string file, std::uint64_t offset, std::uint64_t length, int err,
                     const std::string& detail)
    : Error(file + ": read of " + std::to_string(length) + " bytes at offset " +
            std::to_string(offset) + " failed: " +
            (err ? std::string(std::strerror(err)) : std::string("unexpected end of file")) +
            (detail.empty() ? "" : " (" + detail + ")")),
      file_(std::move(file)),
      offset_(offset),
      length_(length),
      code_(err) {}

}  // namespace lema::io
