// tokenizer.json normalizers.
#include "tokenizer_json/components.hpp"

namespace lema::trainer::tokenizer_json {

std::string type_of(const nlohmann::json& j, const char* what) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    throw Unsupported(std::string(what) + " without a \"type\"");
  }
  return j["type"].get<std::string>();
}

Regex pattern_regex(const nlohmann::json& pattern, const char* what) {
  if (pattern.contains("String")) return Regex(escape_regex(pattern["String"].get<std::string>()));
  if (pattern.contains("Regex")) return Regex(pattern["Regex"].get<std::string>());
  throw Unsupported(std::string(what) + " pattern " + pattern.dump());
}

namespace {

/// Replaces every match of a {"String": s} or {"Regex": r} pattern by `content`.
std::function<std::string(const std::string&)> make_replace(const nlohmann::json& j) {
  const Regex re = pattern_regex(j.at("pattern"), "Replace");
  const std::string content = j.at("content").get<std::string>();
  return [re, content](const std::string& s) { return replace_all(re, s, content); };
}

}  // namespace

Normalizer make_normalizer(const nlohmann::json& j) {
  if (j.is_null()) return [](std::string s) { return s; };
  const std::string type = type_of(j, "normalizer");
  if (type == "Sequence") {
    std::vector<Normalizer> parts;
    for (const auto& n : j.at("normalizers")) parts.push_back(make_normalizer(n));
    return [parts](std::string s) {
      for (const auto& n : parts) s = n(std::move(s));
      return s;
    };
  }
  if (type == "NFC") return [](std::string s) { return normalize_form(s, NormalForm::NFC); };
  if (type == "NFD") return [](std::string s) { return normalize_form(s, NormalForm::NFD); };
  if (type == "NFKC") return [](std::string s) { return normalize_form(s, NormalForm::NFKC); };
  if (type == "NFKD") return [](std::string s) { return normalize_form(s, NormalForm::NFKD); };
  if (type == "Lowercase") return [](std::string s) { return lowercase(s); };
  if (type == "Prepend") {
    const std::string prepend = j.at("prepend").get<std::string>();
    return [prepend](std::string s) { return s.empty() ? s : prepend + s; };
  }
  if (type == "Replace") {
    auto replace = make_replace(j);
    return [replace](std::string s) { return replace(s); };
  }
  if (type == "Strip") {
    const bool left = j.value("strip_left", true);
    const bool right = j.value("strip_right", true);
    return [left, right](std::string s) {
      std::size_t begin = 0;
      std::size_t end = s.size();
      if (left) {
        while (begin < end && is_whitespace(code_point(s, begin))) begin += char_len(s, begin);
      }
      if (right) {
        // Walk back to each character's first byte.
        while (end > begin) {
          std::size_t start = end - 1;
          while (start > begin && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
          if (!is_whitespace(code_point(s, start))) break;
          end = start;
        }
      }
      return s.substr(begin, end - begin);
    };
  }
  throw Unsupported("normalizer type \"" + type + "\"");
}

}  // namespace lema::trainer::tokenizer_json
