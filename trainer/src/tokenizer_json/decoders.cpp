// tokenizer.json decoders. Bytes that do not form UTF-8 become U+FFFD as in tokenizers, except a
// character cut short by the last token, whose bytes are kept so that the next token can
// complete it.
#include "tokenizer_json/components.hpp"

namespace lema::trainer::tokenizer_json {

Decoder make_decoder(const nlohmann::json& j) {
  if (j.is_null()) {
    return [](std::vector<std::string> tokens) {
      std::string out;
      for (std::size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
      return std::vector<std::string>{out};
    };
  }
  const std::string type = type_of(j, "decoder");
  if (type == "Sequence") {
    std::vector<Decoder> parts;
    for (const auto& d : j.at("decoders")) parts.push_back(make_decoder(d));
    return [parts](std::vector<std::string> tokens) {
      for (const auto& d : parts) tokens = d(std::move(tokens));
      return tokens;
    };
  }
  if (type == "ByteLevel") {
    return [](std::vector<std::string> tokens) {
      std::string out;
      for (const auto& t : tokens) {
        std::string bytes;
        bool all = true;
        for (std::size_t i = 0; i < t.size() && all; i += char_len(t, i)) {
          const int b = char_byte(code_point(t, i));
          if (b < 0) all = false;
          bytes += static_cast<char>(b);
        }
        out += all ? bytes : t;  // a token outside the alphabet stands for its own bytes
      }
      return std::vector<std::string>{lossy_utf8(out, true)};
    };
  }
  if (type == "Metaspace") {
    const std::string replacement = j.at("replacement").get<std::string>();
    bool strip_first = true;
    if (j.contains("prepend_scheme")) {
      strip_first = j["prepend_scheme"].get<std::string>() != "never";
    } else if (j.contains("add_prefix_space")) {
      strip_first = j["add_prefix_space"].get<bool>();
    }
    return [replacement, strip_first](std::vector<std::string> tokens) {
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        std::string out;
        const std::string& t = tokens[i];
        for (std::size_t k = 0; k < t.size();) {
          if (t.compare(k, replacement.size(), replacement) == 0) {
            if (!(i == 0 && strip_first)) out += ' ';
            k += replacement.size();
          } else {
            out += t[k++];
          }
        }
        tokens[i] = std::move(out);
      }
      return tokens;
    };
  }
  if (type == "ByteFallback") {
    return [](std::vector<std::string> tokens) {
      std::vector<std::string> out;
      std::string bytes;
      // A run of byte tokens that is not UTF-8 shows one U+FFFD per token, as in tokenizers.
      const auto flush = [&](bool last) {
        if (bytes.empty()) return;
        if (is_utf8(bytes) || (last && lossy_utf8(bytes, true) == bytes)) {
          out.push_back(bytes);
        } else {
          for (std::size_t k = 0; k < bytes.size(); ++k) out.push_back("\xEF\xBF\xBD");
        }
        bytes.clear();
      };
      for (auto& t : tokens) {
        const bool is_byte = t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
                             std::isxdigit(static_cast<unsigned char>(t[3])) &&
                             std::isxdigit(static_cast<unsigned char>(t[4]));
        if (is_byte) {
          bytes += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
          continue;
        }
        flush(false);
        out.push_back(std::move(t));
      }
      flush(true);
      return out;
    };
  }
  if (type == "Fuse") {
    return [](std::vector<std::string> tokens) {
      std::string out;
      for (const auto& t : tokens) out += t;
      return std::vector<std::string>{out};
    };
  }
  if (type == "Strip") {
    const std::string content = j.at("content").get<std::string>();
    const std::size_t start = j.value("start", std::size_t{0});
    const std::size_t stop = j.value("stop", std::size_t{0});
    return [content, start, stop](std::vector<std::string> tokens) {
      for (auto& t : tokens) {
        std::size_t b = 0;
        for (std::size_t n = 0; n < start && t.compare(b, content.size(), content) == 0; ++n) {
          b += content.size();
        }
        std::size_t e = t.size();
        for (std::size_t n = 0; n < stop && e >= b + content.size() &&
                                t.compare(e - content.size(), content.size(), content) == 0;
             ++n) {
          e -= content.size();
        }
        t = t.substr(b, e - b);
      }
      return tokens;
    };
  }
  if (type == "Replace") {
    const Regex re = pattern_regex(j.at("pattern"), "Replace");
    const std::string content = j.at("content").get<std::string>();
    return [re, content](std::vector<std::string> tokens) {
      for (auto& t : tokens) t = replace_all(re, t, content);
      return tokens;
    };
  }
  if (type == "BPEDecoder") {
    const std::string suffix = j.value("suffix", std::string("</w>"));
    const Regex re(escape_regex(suffix));
    return [re](std::vector<std::string> tokens) {
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = replace_all(re, tokens[i], i + 1 == tokens.size() ? "" : " ");
      }
      return tokens;
    };
  }
  throw Unsupported("decoder type \"" + type + "\"");
}

}  // namespace lema::trainer::tokenizer_json
