// Walking the lines of a JSONL file's bytes, as the data readers do.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace lema::trainer::detail {

/// Calls `visit(line, line_no)` for each line of `bytes` that is not blank (spaces, tabs and
/// carriage returns only), line numbers counted from 1 over every line, blank ones included, so
/// an error can name the line of the file. Stops early when `visit` returns false.
template <typename Visit>
void for_each_jsonl_line(const std::string& bytes, const Visit& visit) {
  std::size_t begin = 0, line_no = 0;
  while (begin < bytes.size()) {
    auto end = bytes.find('\n', begin);
    if (end == std::string::npos) end = bytes.size();
    const std::string_view line(bytes.data() + begin, end - begin);
    begin = end + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    if (!visit(line, line_no)) return;
  }
}

}  // namespace lema::trainer::detail
