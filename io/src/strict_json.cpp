#include "detail/strict_json.hpp"

#include <cstdint>
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

// The first `max_bytes` of `text`, not splitting a UTF-8 sequence.
std::string_view utf8_prefix(std::string_view text, std::size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  std::size_t cut = max_bytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.substr(0, cut);
}

// Appends the JSON of `value` to `out`, stopping soon after `out` reaches `limit` bytes, so a
// huge array costs no more than its first elements. Recursion is bounded by kMaxJsonDepth.
void dump_bounded(const nlohmann::json& value, std::string& out, std::size_t limit) {
  if (!value.is_structured()) {
    out += value.dump();
    return;
  }
  const bool array = value.is_array();
  out += array ? '[' : '{';
  bool first = true;
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (out.size() > limit) return;
    if (!first) out += ',';
    first = false;
    if (!array) out += nlohmann::json(it.key()).dump() + ':';
    dump_bounded(it.value(), out, limit);
  }
  out += array ? ']' : '}';
}

}  // namespace

std::string excerpt(std::string_view text, std::size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  return std::string(utf8_prefix(text, max_bytes)) + "... (" + std::to_string(text.size()) +
         " bytes)";
}

std::string json_excerpt(const nlohmann::json& value, std::size_t max_bytes) {
  std::string out;
  dump_bounded(value, out, max_bytes);
  if (out.size() <= max_bytes) return out;
  return std::string(utf8_prefix(out, max_bytes)) + "...";
}

namespace {

using nlohmann::json;

std::string strip_nlohmann_prefix(const std::string& what) {
  // "[json.exception.parse_error.101] parse error at ..." -> "parse error at ..."
  if (!what.empty() && what.front() == '[') {
    if (auto pos = what.find("] "); pos != std::string::npos) return what.substr(pos + 2);
  }
  return what;
}

// Note [Strict JSON in one pass]
// The document is built by this SAX handler rather than by json::parse with a callback:
// - nlohmann's callback parser (3.11) scans the enclosing object for discarded values each time
//   an object closes, so a header of n tensors cost O(n^2) (200,000 tensors: over a minute).
//   Here each value is placed once, and a repeated key is caught when it is inserted into its
//   object's map: O(n log n) in all.
// - Nesting is counted as containers open, and the document is refused once it goes deeper than
//   kMaxJsonDepth. nlohmann's parser is iterative, so nothing has recursed yet; everything later
//   that does recurse (dump() for a message) sees a bounded depth.
class StrictDomBuilder {
 public:
  StrictDomBuilder(const std::string& file_label, std::string_view document)
      : file_(file_label), document_(document) {}

  bool null() { return put(nullptr); }
  bool boolean(bool v) { return put(v); }
  bool number_integer(json::number_integer_t v) { return put(v); }
  bool number_unsigned(json::number_unsigned_t v) { return put(v); }
  bool number_float(json::number_float_t v, const json::string_t& /*text*/) { return put(v); }
  bool string(json::string_t& v) { return put(std::move(v)); }
  bool binary(json::binary_t& v) { return put(json::binary(std::move(v))); }
  bool start_object(std::size_t /*unknown*/) { return open(json::value_t::object); }
  bool start_array(std::size_t /*unknown*/) { return open(json::value_t::array); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(json::string_t& name) {
    auto& object = stack_.back()->get_ref<json::object_t&>();
    if (stack_.size() == 1) top_key_ = name;
    auto [it, inserted] = object.try_emplace(std::move(name));  // name untouched when present
    if (!inserted) {
      if (stack_.size() == 1) {
        throw CheckpointError(file_, name, "duplicate-key",
                              "'" + excerpt(name) + "' is defined twice at the top level of the " +
                                  std::string(document_));
      }
      throw CheckpointError(file_, top_key_, "duplicate-key",
                            "key '" + excerpt(name) + "' appears twice inside '" +
                                excerpt(top_key_) + "' in the " + std::string(document_));
    }
    slot_ = &it->second;
    return true;
  }

  bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                   const json::exception& e) {
    // The message quotes the token read last, which may be a whole (long) string.
    throw CheckpointError(file_, "", "bad-json",
                          "the " + std::string(document_) + " is not valid JSON: " +
                              excerpt(strip_nlohmann_prefix(e.what()), 300));
  }

  json take() { return std::move(root_); }

 private:
  bool put(json value) {
    place(std::move(value));
    return true;
  }

  json* place(json value) {
    if (stack_.empty()) {
      root_ = std::move(value);
      return &root_;
    }
    json& parent = *stack_.back();
    if (parent.is_array()) {
      // The parent's elements only move while it is the innermost open container, and then no
      // pointer to them is held.
      auto& array = parent.get_ref<json::array_t&>();
      array.push_back(std::move(value));
      return &array.back();
    }
    *slot_ = std::move(value);
    return slot_;
  }

  bool open(json::value_t type) {
    if (stack_.size() >= kMaxJsonDepth) {
      throw CheckpointError(
          file_, stack_.size() > 1 ? top_key_ : "", "too-deep",
          "the " + std::string(document_) + " nests arrays and objects more than " +
              std::to_string(kMaxJsonDepth) + " levels deep" +
              (stack_.size() > 1 ? " (inside '" + excerpt(top_key_) + "')" : std::string()) +
              "; the JSON of a checkpoint needs a few levels (not a safetensors file, or a "
              "corrupt one)");
    }
    stack_.push_back(place(json(type)));
    return true;
  }

  bool close() {
    stack_.pop_back();
    return true;
  }

  const std::string& file_;
  std::string_view document_;
  json root_;
  std::vector<json*> stack_;  // the open containers, outermost first
  json* slot_ = nullptr;      // where the value after the last key goes
  std::string top_key_;       // the last key of the outermost object, to name it in errors
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
  // nlohmann's lexer takes a NUL byte for the end of the input, so "{}\0junk" would parse as
  // "{}". JSON has no place for a NUL (in a string it must be escaped), and the reference
  // rejects one after the value as trailing characters.
  if (auto nul = text.find('\0'); nul != std::string_view::npos) {
    throw CheckpointError(file_label, "", "bad-json",
                          "the " + std::string(document) +
                              " is not valid JSON: NUL byte at offset " + std::to_string(nul) +
                              " of it (only spaces, tabs and newlines may pad the JSON)");
  }
  StrictDomBuilder builder(file_label, document);
  json::sax_parse(text.begin(), text.end(), &builder, json::input_format_t::json,
                  /*strict=*/true, /*ignore_comments=*/false);
  return builder.take();
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
