// Errors raised by the io layer.
#pragma once

#include <cstdint>
#include <string>

#include "lema/base/error.hpp"

namespace lema::io {

/// A checkpoint was rejected. One type for every rule, carrying the file, the tensor (empty when
/// the problem is not about one tensor) and the rule, so callers can print
/// `error: <file>: <what>` and tests can check which rule fired.
class CheckpointError : public Error {
 public:
  CheckpointError(std::string file, std::string tensor, std::string rule,
                  const std::string& detail);
  const std::string& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  /// Short stable identifier of the violated rule, e.g. "header-too-large", "bad-dtype".
  const std::string& rule() const noexcept { return rule_; }
  /// The message without the file prefix ("tensor 'x': ...").
  const std::string& detail() const noexcept { return detail_; }

 private:
  std::string file_, tensor_, rule_, detail_;
};

/// A read of checkpoint bytes failed (EIO, the file shrank after open, ...).
class ReadError : public Error {
 public:
  ReadError(std::string file, std::uint64_t offset, std::uint64_t length, int err,
            const std::string& detail);
  const std::string& file() const noexcept { return file_; }
  std::uint64_t offset() const noexcept { return offset_; }
  std::uint64_t length() const noexcept { return length_; }
  /// errno, or 0 for an unexpected end of file.
  int code() const noexcept { return code_; }

 private:
  std::string file_;
  std::uint64_t offset_, length_;
  int code_;
};

}  // namespace lema::io
