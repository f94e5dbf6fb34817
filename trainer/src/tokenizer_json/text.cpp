#include "tokenizer_json/text.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>

#include "lema/base/error.hpp"

namespace lema::trainer::tokenizer_json {

std::size_t char_len(std::string_view s, std::size_t i) {
  utf8proc_int32_t c = 0;
  const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                  static_cast<utf8proc_ssize_t>(s.size() - i), &c);
  return n > 0 ? static_cast<std::size_t>(n) : 1;
}

char32_t code_point(std::string_view s, std::size_t i) {
  utf8proc_int32_t c = 0;
  const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                  static_cast<utf8proc_ssize_t>(s.size() - i), &c);
  return n > 0 ? static_cast<char32_t>(c) : U'\uFFFD';
}

std::string to_utf8(char32_t c) {
  utf8proc_uint8_t buf[4];
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(c), buf);
  return std::string(reinterpret_cast<const char*>(buf), static_cast<std::size_t>(n));
}

std::string valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    utf8proc_int32_t c = 0;
    const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                    static_cast<utf8proc_ssize_t>(s.size() - i), &c);
    if (n > 0) {
      out.append(s.substr(i, static_cast<std::size_t>(n)));
      i += static_cast<std::size_t>(n);
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

namespace {

/// Bytes of the well-formed prefix of the UTF-8 sequence at s[i] (Unicode's table 3-7), and
/// whether that prefix is a whole character.
std::pair<std::size_t, bool> utf8_prefix(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char lead = b(i);
  if (lead < 0x80) return {1, true};
  std::size_t need = 0;
  unsigned char lo = 0x80;
  unsigned char hi = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 1;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 2;
    if (lead == 0xE0) lo = 0xA0;
    if (lead == 0xED) hi = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 3;
    if (lead == 0xF0) lo = 0x90;
    if (lead == 0xF4) hi = 0x8F;
  } else {
    return {0, false};  // never a lead byte
  }
  std::size_t n = 1;
  for (; n <= need && i + n < s.size(); ++n) {
    const unsigned char c = b(i + n);
    const unsigned char first_lo = n == 1 ? lo : 0x80;
    const unsigned char first_hi = n == 1 ? hi : 0xBF;
    if (c < first_lo || c > first_hi) break;
  }
  return {n, n == need + 1};
}

}  // namespace

std::string lossy_utf8(std::string_view s, bool keep_cut_tail) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const auto [n, whole] = utf8_prefix(s, i);
    if (whole) {
      out.append(s.substr(i, n));
    } else if (keep_cut_tail && n > 0 && i + n == s.size()) {
      out.append(s.substr(i, n));  // cut by the end, not ill-formed
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += std::max<std::size_t>(n, 1);
  }
  return out;
}

bool is_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const auto [n, whole] = utf8_prefix(s, i);
    if (!whole) return false;
    i += n;
  }
  return true;
}

bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

namespace {
utf8proc_category_t category(char32_t c) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(c));
}
}  // namespace

bool is_numeric(char32_t c) {
  const auto k = category(c);
  return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

bool is_alphanumeric(char32_t c) {
  const auto k = category(c);
  return is_numeric(c) || (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO);
}

bool is_punctuation(char32_t c) {
  if (c < 0x80) return std::ispunct(static_cast<int>(c)) != 0;
  const auto k = category(c);
  return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

std::string normalize_form(std::string_view s, NormalForm form) {
  const std::string copy(s);  // utf8proc wants a terminated string
  const auto* in = reinterpret_cast<const utf8proc_uint8_t*>(copy.c_str());
  utf8proc_uint8_t* out = nullptr;
  switch (form) {
    case NormalForm::NFC: out = utf8proc_NFC(in); break;
    case NormalForm::NFD: out = utf8proc_NFD(in); break;
    case NormalForm::NFKC: out = utf8proc_NFKC(in); break;
    case NormalForm::NFKD: out = utf8proc_NFKD(in); break;
  }
  if (out == nullptr) return copy;  // only malformed input, which encode() never passes
  std::string result(reinterpret_cast<const char*>(out));
  std::free(out);
  return result;
}

std::string lowercase(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); i += char_len(s, i)) {
    const char32_t c = code_point(s, i);
    // Rust's char::to_lowercase, which tokenizers uses, maps by character without context; the
    // one character whose full mapping differs from the simple one utf8proc gives is İ.
    if (c == U'\u0130') {
      out += "i\xCC\x87";
      continue;
    }
    out += to_utf8(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
  }
  return out;
}

namespace {

// Note [Oniguruma classes]: tokenizers compiles patterns with Oniguruma, whose \w is
// Alphabetic, Mark, Decimal_Number, Connector_Punctuation and Join_Control, and whose \s is the
// White_Space property. PCRE2's \w under UCP is only letters, numbers and underscore (a letter
// followed by a combining mark, as in any NFD text, would split differently), and its \s also
// takes U+180E; Oniguruma's \h is a hex digit, PCRE2's a horizontal space. \w, \s and \h (and
// their negations outside classes) are spelled out as Oniguruma means them; \d (Nd) agrees.
constexpr const char* kWordClass = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}";
constexpr const char* kSpaceClass =
    "\\t\\n\\x0b\\f\\r\\x20\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}"
    "\\x{202f}\\x{205f}\\x{3000}";

std::string oniguruma_to_pcre2(const std::string& pattern) {
  std::string out;
  int class_depth = 0;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 'Q') {  // quoted up to \E: copied as it is
        const std::size_t end = pattern.find("\\E", i + 1);
        const std::size_t stop = end == std::string::npos ? pattern.size() : end + 2;
        out.append(pattern, i - 1, stop - (i - 1));
        i = stop - 1;
        continue;
      }
      const char* spelled = e == 'w' || e == 'W' ? kWordClass
                            : e == 's' || e == 'S' ? kSpaceClass
                            : e == 'h' || e == 'H' ? "0-9a-fA-F"
                                                   : nullptr;
      if (spelled != nullptr && (e == 'w' || e == 's' || e == 'h')) {
        out += class_depth > 0 ? std::string(spelled) : "[" + std::string(spelled) + "]";
      } else if (spelled != nullptr && class_depth == 0) {  // \W, \S, \H
        out += "[^" + std::string(spelled) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (c == '[') ++class_depth;
    if (c == ']' && class_depth > 0) --class_depth;
    out += c;
  }
  return out;
}

}  // namespace

Regex::Regex(const std::string& given) {
  const std::string pattern = oniguruma_to_pcre2(given);
  int err = 0;
  PCRE2_SIZE offset = 0;
  // MULTILINE: in Oniguruma's default (Ruby) syntax ^ and $ match at every line.
  constexpr std::uint32_t kOptions =
      PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | PCRE2_MATCH_INVALID_UTF;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   kOptions, &err, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(err, message, sizeof message);
    throw Unsupported("regex " + given + " does not compile (" +
                      reinterpret_cast<const char*>(message) + " at offset " +
                      std::to_string(offset) + ")");
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional: matching works without it
  code_ = std::shared_ptr<void>(code, [](void* p) { pcre2_code_free(static_cast<pcre2_code*>(p)); });
}

std::vector<std::pair<std::size_t, std::size_t>> Regex::find_all(std::string_view s) const {
  auto* code = static_cast<pcre2_code*>(code_.get());
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
      pcre2_match_data_create_from_pattern(code, nullptr), &pcre2_match_data_free);
  std::vector<std::pair<std::size_t, std::size_t>> out;
  std::size_t at = 0;
  while (at <= s.size()) {
    // PCRE2_MATCH_INVALID_UTF: no whole-subject check per call (matching stays linear), and
    // decoded bytes that are not UTF-8 are safe to search.
    const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at, 0,
                               data.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {  // a resource limit: stopping here would silently give other pieces
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof message);
      throw InvalidArgument("tokenizer regex matching failed on a text of " +
                            std::to_string(s.size()) + " bytes (" +
                            reinterpret_cast<const char*>(message) +
                            "); split the text into smaller documents");
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data.get());
    out.emplace_back(ov[0], ov[1]);
    if (ov[1] > ov[0]) {
      at = ov[1];
    } else {
      if (ov[1] >= s.size()) break;
      at = ov[1] + char_len(s, ov[1]);
    }
  }
  return out;
}

std::string replace_all(const Regex& re, std::string_view s, std::string_view content) {
  std::string out;
  std::size_t prev = 0;
  for (const auto& [start, end] : re.find_all(s)) {
    out.append(s, prev, start - prev);
    out += content;
    prev = end;
  }
  out.append(s, prev);
  return out;
}

std::string escape_regex(std::string_view s) {
  // \Q...\E quotes everything but a literal "\E", which is spelled out.
  std::string out = "\\Q";
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s.substr(i, 2) == "\\E") {
      out += "\\E\\\\E\\Q";
      ++i;
    } else {
      out += s[i];
    }
  }
  return out + "\\E";
}

}  // namespace lema::trainer::tokenizer_json
