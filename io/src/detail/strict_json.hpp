// JSON parsing as strict as the safetensors reference: valid UTF-8 only, no duplicate keys.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace lema::io::detail {

/// True when `text` is well-formed UTF-8 (no overlong forms, surrogates or code points past
/// U+10FFFF), as Rust's str::from_utf8 requires.
bool is_valid_utf8(std::string_view text);
/// Offset of the first byte that starts an ill-formed sequence; npos when the text is valid.
std::size_t utf8_error_offset(std::string_view text);

/// Deepest nesting of arrays and objects accepted, as in serde_json (the reference's parser).
inline constexpr std::size_t kMaxJsonDepth = 128;

/// Parses `text` as one JSON value in time linear in its size (see Note [Strict JSON in one
/// pass]); JSON whitespace (space, tab, CR, LF) around the value is accepted, anything else,
/// a NUL included, is not. Throws CheckpointError naming `file_label` with rule "bad-utf8",
/// "bad-json", "too-deep" (nested past kMaxJsonDepth) or "duplicate-key"; `document` names the
/// text in messages ("header", "index") (nlohmann keeps the last of two equal keys silently;
/// two definitions of one tensor must not pass unnoticed).
nlohmann::json parse_strict_json(std::string_view text, const std::string& file_label,
                                 std::string_view document);

/// `text`, or its first `max_bytes` (cut on a UTF-8 boundary) and its length: what a message
/// quotes from a file stays short whatever the file holds.
std::string excerpt(std::string_view text, std::size_t max_bytes = 100);
/// The JSON of `value`, cut the same way (`value` is no deeper than kMaxJsonDepth).
std::string json_excerpt(const nlohmann::json& value, std::size_t max_bytes = 100);

/// "an object", "a string", "an integer", ... for messages.
std::string describe_type(const nlohmann::json& value);

}  // namespace lema::io::detail
