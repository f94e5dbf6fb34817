#include "detail/strict_json.hpp"

#include <cstdint>
#include <unordered_set>
#include <vector>

#include "lema/io/errors.hpp"

namespace lema::io::detail {

std::size_t utf8_error_offset(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    // Bounds for the second byte exclude overlong forms, surrogates and > U+10FFFF.
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

bool is_valid_utf8(std::string_view text) {
  return utf8_error_offset(text) == std::string_view::npos;
}

namespace {

std::string strip_nlohmann_prefix(const std::string& what) {
  // "[json.exception.parse_error.101] parse error at ..." -> "parse error at ..."
  if (!what.empty() && what.front() == '[') {
    if (auto pos = what.find("] "); pos != std::string::npos) return what.substr(pos + 2);
  }
  return what;
}

// Tracks the keys of every open object so that a repeated key is caught while parsing.
class DuplicateKeyCheck {
 public:
  DuplicateKeyCheck(const std::string& file_label, std::string_view document)
      : file_(file_label), document_(document) {}

  bool operator()(int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    switch (event) {
      case E::object_start:
        open_.emplace_back();
        break;
      case E::object_end:
        if (!open_.empty()) open_.pop_back();
        break;
      case E::key: {
        if (open_.empty() || !parsed.is_string()) break;
        const auto& key = parsed.get_ref<const std::string&>();
        if (open_.size() == 1) top_key_ = key;
        if (!open_.back().insert(key).second) {
          if (open_.size() == 1) {
            throw CheckpointError(
                file_, key, "duplicate-key",
                "'" + key + "' is defined twice at the top level of the " + std::string(document_));
          }
          throw CheckpointError(file_, top_key_, "duplicate-key",
                                "key '" + key + "' appears twice inside '" + top_key_ +
                                    "' in the " + std::string(document_));
        }
        break;
      }
      default:
        break;
    }
    return true;
  }

 private:
  const std::string& file_;
  std::string_view document_;
  std::vector<std::unordered_set<std::string>> open_;
  std::string top_key_;
};

}  // namespace

nlohmann::json parse_strict_json(std::string_view text, const std::string& file_label,
                                 std::string_view document) {
  if (auto bad = utf8_error_offset(text); bad != std::string_view::npos) {
    throw CheckpointError(file_label, "", "bad-utf8",
                          "the " + std::string(document) +
                              " is not valid UTF-8 (first bad byte at offset " +
                              std::to_string(bad) + " of it)");
  }
  DuplicateKeyCheck check(file_label, document);
  try {
    return nlohmann::json::parse(text.begin(), text.end(), std::ref(check),
                                 /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(
        file_label, "", "bad-json",
        "the " + std::string(document) + " is not valid JSON: " + strip_nlohmann_prefix(e.what()));
  }
}

std::string describe_type(const nlohmann::json& value) {
  using T = nlohmann::json::value_t;
  switch (value.type()) {
    case T::null:
      return "null";
    case T::object:
      return "an object";
    case T::array:
      return "an array";
    case T::string:
      return "a string";
    case T::boolean:
      return "a boolean";
    case T::number_integer:
    case T::number_unsigned:
      return "an integer";
    case T::number_float:
      return "a non-integer number";
    case T::binary:
      return "binary data";
    case T::discarded:
      break;
  }
  return "an invalid value";
}

}  // namespace lema::io::detail
