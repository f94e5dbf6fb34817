// Unicode pieces of the tokenizer.json reader: UTF-8 walking, character classes, normalization
// forms (utf8proc) and regular expressions (PCRE2 with UTF and Unicode properties).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lema::trainer::tokenizer_json {

/// What a tokenizer.json holds that this reader cannot honour; the loader names the file.
class Unsupported : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The length in bytes of the UTF-8 character starting at s[i] (1 for a stray byte).
std::size_t char_len(std::string_view s, std::size_t i);
/// The code point starting at s[i] (U+FFFD for a malformed sequence).
char32_t code_point(std::string_view s, std::size_t i);
std::string to_utf8(char32_t c);
/// `s` with every malformed UTF-8 sequence replaced by U+FFFD, as Python's errors="replace".
std::string valid_utf8(std::string_view s);

/// Rust's String::from_utf8_lossy: each maximal ill-formed subsequence becomes one U+FFFD. With
/// `keep_cut_tail`, a character cut short by the end of `s` keeps its bytes instead, so that text
/// decoded so far can be completed by the next token.
std::string lossy_utf8(std::string_view s, bool keep_cut_tail);
/// Whether `s` is well-formed UTF-8.
bool is_utf8(std::string_view s);

/// Rust's char::is_whitespace (the White_Space property).
bool is_whitespace(char32_t c);
/// Rust's char::is_alphanumeric, approximated by the L and N general categories.
bool is_alphanumeric(char32_t c);
/// Rust's char::is_numeric (the N categories).
bool is_numeric(char32_t c);
/// ASCII punctuation or a P-category character, as tokenizers' Punctuation splits on.
bool is_punctuation(char32_t c);

enum class NormalForm { NFC, NFD, NFKC, NFKD };
std::string normalize_form(std::string_view s, NormalForm form);
std::string lowercase(std::string_view s);

/// A compiled pattern; matching allocates its own match data, so one Regex serves every thread.
class Regex {
 public:
  /// Throws Unsupported naming the pattern when PCRE2 cannot compile it.
  explicit Regex(const std::string& pattern);
  /// Non-overlapping matches [start, end) from left to right; after an empty match the search
  /// resumes one character further, as Oniguruma's iterator does.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::string_view s) const;

 private:
  std::shared_ptr<void> code_;
};

/// `s` as a regular expression matching itself literally.
std::string escape_regex(std::string_view s);
/// `s` with every match of `re` replaced by `content`.
std::string replace_all(const Regex& re, std::string_view s, std::string_view content);

}  // namespace lema::trainer::tokenizer_json
