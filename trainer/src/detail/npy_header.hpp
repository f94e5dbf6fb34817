// The header of a NumPy .npy file (format versions 1-3), parsed strictly enough for token
// arrays: the dtype descriptor, the order and the shape.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lema::trainer::detail {

struct NpyHeader {
  std::string descr;  // "<u2", "<i8", ...
  bool fortran_order = false;
  std::vector<std::uint64_t> shape;
  std::uint64_t data_offset = 0;  // where the array's bytes start in the file
};

/// Parses the first bytes of a .npy file (`prefix` must hold the whole header). Throws
/// InvalidArgument naming `file_label` and the problem.
NpyHeader parse_npy_header(std::string_view prefix, const std::string& file_label);

}  // namespace lema::trainer::detail
