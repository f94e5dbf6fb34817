#include <algorithm>
#include <cctype>
#include <cstring>
#include <optional>

#include "detail/npy_header.hpp"
#include "lema/base/error.hpp"

namespace lema::trainer::detail {

namespace {

constexpr std::string_view kMagic = "\x93NUMPY";

// A cursor over the header's Python dict literal: {'descr': '<u2', 'fortran_order': False,
// 'shape': (3, 4), }
class DictCursor {
 public:
  DictCursor(std::string_view text, const std::string& file) : text_(text), file_(file) {}

  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  bool accept(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!accept(c)) fail(std::string("expected '") + c + "'");
  }
  std::string quoted() {
    skip_space();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"'))
      fail("expected a string");
    const char quote = text_[pos_++];
    const auto end = text_.find(quote, pos_);
    if (end == std::string_view::npos) fail("unterminated string");
    std::string s(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return s;
  }
  bool boolean() {
    skip_space();
    if (text_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (text_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    fail("expected True or False");
  }
  std::vector<std::uint64_t> tuple() {
    expect('(');
    std::vector<std::uint64_t> dims;
    while (!accept(')')) {
      skip_space();
      std::uint64_t v = 0;
      std::size_t digits = 0;
      while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
        if (v > (UINT64_MAX - 9) / 10) fail("shape dimension too large");
        v = v * 10 + static_cast<std::uint64_t>(text_[pos_++] - '0');
        ++digits;
      }
      if (digits == 0) fail("expected a dimension in the shape");
      dims.push_back(v);
      if (!accept(',')) {
        expect(')');
        break;
      }
    }
    return dims;
  }
  [[noreturn]] void fail(const std::string& what) const {
    // The header as one line: without its padding and newline, and not too long.
    std::string shown(text_.substr(0, 200));
    std::replace_if(
        shown.begin(), shown.end(), [](char c) { return c == '\n' || c == '\r'; }, ' ');
    shown.erase(shown.find_last_not_of(' ') + 1);
    throw InvalidArgument(file_ + ": malformed .npy header (" + what + " at offset " +
                          std::to_string(pos_) + " of \"" + shown +
                          "\"); write it with numpy.save");
  }

 private:
  std::string_view text_;
  const std::string& file_;
  std::size_t pos_ = 0;
};

}  // namespace

NpyHeader parse_npy_header(std::string_view prefix, const std::string& file_label) {
  auto fail = [&](const std::string& what) -> void {
    throw InvalidArgument(file_label + ": " + what + "; write it with numpy.save");
  };
  if (prefix.size() < 10 || prefix.substr(0, kMagic.size()) != kMagic) {
    fail("not a .npy file (no \\x93NUMPY magic)");
  }
  const auto major = static_cast<unsigned char>(prefix[6]);
  std::uint64_t header_len = 0;
  std::uint64_t header_start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(prefix[8]) |
                 (static_cast<std::uint64_t>(static_cast<unsigned char>(prefix[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (prefix.size() < 12) fail("truncated .npy header");
    for (int i = 3; i >= 0; --i) {
      header_len = (header_len << 8) | static_cast<unsigned char>(prefix[8 + i]);
    }
    header_start = 12;
  } else {
    fail(".npy format version " + std::to_string(major) + " is not supported (1, 2 or 3)");
  }
  if (header_start + header_len > prefix.size()) fail("truncated .npy header");

  DictCursor cursor(prefix.substr(header_start, header_len), file_label);
  NpyHeader header;
  header.data_offset = header_start + header_len;
  bool have_descr = false, have_order = false, have_shape = false;
  cursor.expect('{');
  while (!cursor.accept('}')) {
    const std::string key = cursor.quoted();
    cursor.expect(':');
    if (key == "descr") {
      header.descr = cursor.quoted();
      have_descr = true;
    } else if (key == "fortran_order") {
      header.fortran_order = cursor.boolean();
      have_order = true;
    } else if (key == "shape") {
      header.shape = cursor.tuple();
      have_shape = true;
    } else {
      cursor.fail("unknown key '" + key + "'");
    }
    if (!cursor.accept(',')) {
      cursor.expect('}');
      break;
    }
  }
  if (!have_descr || !have_order || !have_shape) {
    cursor.fail("the header needs 'descr', 'fortran_order' and 'shape'");
  }
  return header;
}

}  // namespace lema::trainer::detail
