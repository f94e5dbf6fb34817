// JSON parsing as strict as the safetensors reference: valid UTF-8 only, no duplicate keys.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace lema::io::detail {

/// True when `text` is well-formed UTF-8 (no overlong forms, surrogates or code points past
/// U+10FFFF), as Rust's str::from_utf8 requires.
bool is_valid_utf8(std::string_view text);
/// Offset of the first byte that starts an ill-formed sequence; npos when the text is valid.
std::size_t utf8_error_offset(std::string_view text);

/// Parses `text` as one JSON value; surrounding JSON whitespace is accepted. Throws
/// CheckpointError naming `file_label` with rule "bad-utf8", "bad-json" or "duplicate-key";
/// `document` names the text in messages ("header", "index")
/// (nlohmann keeps the last of two equal keys silently; two definitions of one tensor must not
/// pass unnoticed).
nlohmann::json parse_strict_json(std::string_view text, const std::string& file_label,
                                 std::string_view document);

/// "an object", "a string", "an integer", ... for messages.
std::string describe_type(const nlohmann::json& value);

}  // namespace lema::io::detail
