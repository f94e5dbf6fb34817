// tokenizer.json pre-tokenizers, and the split behaviours they share.
#include <array>
#include <tuple>

#include "tokenizer_json/components.hpp"

namespace lema::trainer::tokenizer_json {

namespace {

/// Spans [start, end) covering a string, each marked as a match of the pattern or not.
using Spans = std::vector<std::tuple<std::size_t, std::size_t, bool>>;

Spans regex_spans(const Regex& re, const std::string& s, bool invert) {
  Spans out;
  std::size_t prev = 0;
  for (const auto& [start, end] : re.find_all(s)) {
    if (prev != start) out.emplace_back(prev, start, invert);
    out.emplace_back(start, end, !invert);
    prev = end;
  }
  if (prev != s.size()) out.emplace_back(prev, s.size(), invert);
  return out;
}

/// Each character satisfying `pred` is a match of its own.
template <typename Pred>
Spans char_spans(const std::string& s, Pred pred) {
  Spans out;
  std::size_t prev = 0;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = char_len(s, i);
    if (pred(code_point(s, i))) {
      if (prev < i) out.emplace_back(prev, i, false);
      out.emplace_back(i, i + n, true);
      prev = i + n;
    }
    i += n;
  }
  if (prev < s.size()) out.emplace_back(prev, s.size(), false);
  return out;
}

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

Behavior parse_behavior(const nlohmann::json& j) {
  const std::string b = j.get<std::string>();
  if (b == "Removed") return Behavior::Removed;
  if (b == "Isolated") return Behavior::Isolated;
  if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::MergedWithNext;
  if (b == "Contiguous") return Behavior::Contiguous;
  throw Unsupported("split behavior \"" + b + "\"");
}

/// tokenizers' NormalizedString::split: the spans grouped by the behaviour, then cut out.
void split_into(const Piece& piece, const Spans& spans, Behavior behavior,
                std::vector<Piece>& out) {
  std::vector<std::pair<std::size_t, std::size_t>> keep;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::Isolated:
      for (const auto& [s, e, m] : spans) keep.emplace_back(s, e);
      break;
    case Behavior::Removed:
      for (const auto& [s, e, m] : spans) {
        if (!m) keep.emplace_back(s, e);
      }
      break;
    case Behavior::Contiguous:
      for (const auto& [s, e, m] : spans) {
        if (!keep.empty() && m == previous_match) {
          keep.back().second = e;
        } else {
          keep.emplace_back(s, e);
        }
        previous_match = m;
      }
      break;
    case Behavior::MergedWithPrevious:
      for (const auto& [s, e, m] : spans) {
        if (!keep.empty() && m && !previous_match) {
          keep.back().second = e;
        } else {
          keep.emplace_back(s, e);
        }
        previous_match = m;
      }
      break;
    case Behavior::MergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        const auto& [s, e, m] = *it;
        if (!keep.empty() && m && !previous_match) {
          keep.back().first = s;
        } else {
          keep.emplace_back(s, e);
        }
        previous_match = m;
      }
      std::reverse(keep.begin(), keep.end());
      break;
  }
  for (const auto& [s, e] : keep) {
    if (e > s) out.push_back({piece.text.substr(s, e - s), piece.at_start && s == 0});
  }
}

/// Applies `spans_of` to every piece and splits it by `behavior`.
template <typename SpansOf>
void split_all(std::vector<Piece>& pieces, SpansOf spans_of, Behavior behavior) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  for (const auto& p : pieces) split_into(p, spans_of(p.text), behavior, out);
  pieces = std::move(out);
}

// GPT-2's pre-tokenizer pattern, which ByteLevel applies when use_regex is set.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct ByteTables {
  std::array<std::string, 256> to_char;
  std::unordered_map<char32_t, int> to_byte;
  ByteTables() {
    // Note [Byte-level alphabet]: GPT-2 maps the printable bytes !..~, ¡..¬ and ®..ÿ to
    // themselves and the other 68 bytes to U+0100 onwards, in byte order, so that every byte
    // is a visible character in the vocabulary.
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + next++);
      to_char[static_cast<std::size_t>(b)] = to_utf8(c);
      to_byte[c] = b;
    }
  }
};

const ByteTables& byte_tables() {
  static const ByteTables tables;
  return tables;
}

char32_t single_char(const nlohmann::json& j, const char* what) {
  const std::string s = j.get<std::string>();
  if (s.empty() || char_len(s, 0) != s.size()) {
    throw Unsupported(std::string(what) + " \"" + s + "\" is not one character");
  }
  return code_point(s, 0);
}

}  // namespace

const std::string& byte_char(unsigned char b) { return byte_tables().to_char[b]; }

int char_byte(char32_t c) {
  const auto& m = byte_tables().to_byte;
  const auto it = m.find(c);
  return it == m.end() ? -1 : it->second;
}

PreTokenizer make_pre_tokenizer(const nlohmann::json& j) {
  if (j.is_null()) return [](std::vector<Piece>&) {};
  const std::string type = type_of(j, "pre_tokenizer");
  if (type == "Sequence") {
    std::vector<PreTokenizer> parts;
    for (const auto& p : j.at("pretokenizers")) parts.push_back(make_pre_tokenizer(p));
    return [parts](std::vector<Piece>& pieces) {
      for (const auto& p : parts) p(pieces);
    };
  }
  if (type == "Split") {
    const Regex re = pattern_regex(j.at("pattern"), "Split");
    const Behavior behavior = parse_behavior(j.at("behavior"));
    const bool invert = j.value("invert", false);
    return [re, behavior, invert](std::vector<Piece>& pieces) {
      split_all(pieces, [&](const std::string& s) { return regex_spans(re, s, invert); },
                behavior);
    };
  }
  if (type == "ByteLevel") {
    const bool add_prefix_space = j.value("add_prefix_space", true);
    const bool use_regex = j.value("use_regex", true);
    const Regex re(kGpt2Pattern);
    return [add_prefix_space, use_regex, re](std::vector<Piece>& pieces) {
      if (add_prefix_space) {
        for (auto& p : pieces) {
          if (p.text[0] != ' ') p.text.insert(0, 1, ' ');
        }
      }
      if (use_regex) {
        split_all(pieces, [&](const std::string& s) { return regex_spans(re, s, false); },
                  Behavior::Isolated);
      }
      for (auto& p : pieces) {
        std::string mapped;
        mapped.reserve(p.text.size() * 2);
        for (const char c : p.text) mapped += byte_char(static_cast<unsigned char>(c));
        p.text = std::move(mapped);
      }
    };
  }
  if (type == "Metaspace") {
    const std::string replacement = to_utf8(single_char(j.at("replacement"), "Metaspace replacement"));
    std::string scheme = "always";
    if (j.contains("prepend_scheme")) {
      scheme = j["prepend_scheme"].get<std::string>();
    } else if (j.contains("add_prefix_space")) {
      scheme = j["add_prefix_space"].get<bool>() ? "always" : "never";
    }
    if (scheme != "always" && scheme != "first" && scheme != "never") {
      throw Unsupported("Metaspace prepend_scheme \"" + scheme + "\"");
    }
    const bool split = j.value("split", true);
    const Regex re(escape_regex(replacement));
    return [replacement, scheme, split, re](std::vector<Piece>& pieces) {
      for (auto& p : pieces) {
        std::string out;
        for (const char c : p.text) {
          if (c == ' ') {
            out += replacement;
          } else {
            out += c;
          }
        }
        const bool starts = out.compare(0, replacement.size(), replacement) == 0;
        if (!starts && (scheme == "always" || (scheme == "first" && p.at_start))) {
          out.insert(0, replacement);
        }
        p.text = std::move(out);
      }
      if (split) {
        split_all(pieces, [&](const std::string& s) { return regex_spans(re, s, false); },
                  Behavior::MergedWithNext);
      }
    };
  }
  if (type == "Digits") {
    const Behavior behavior =
        j.value("individual_digits", false) ? Behavior::Isolated : Behavior::Contiguous;
    return [behavior](std::vector<Piece>& pieces) {
      split_all(pieces, [](const std::string& s) { return char_spans(s, is_numeric); },
                behavior);
    };
  }
  if (type == "Whitespace") {
    const Regex re(R"(\w+|[^\w\s]+)");
    return [re](std::vector<Piece>& pieces) {
      split_all(pieces, [&](const std::string& s) { return regex_spans(re, s, true); },
                Behavior::Removed);
    };
  }
  if (type == "WhitespaceSplit") {
    return [](std::vector<Piece>& pieces) {
      split_all(pieces, [](const std::string& s) { return char_spans(s, is_whitespace); },
                Behavior::Removed);
    };
  }
  if (type == "Punctuation") {
    const Behavior behavior =
        j.contains("behavior") ? parse_behavior(j["behavior"]) : Behavior::Isolated;
    return [behavior](std::vector<Piece>& pieces) {
      split_all(pieces, [](const std::string& s) { return char_spans(s, is_punctuation); },
                behavior);
    };
  }
  throw Unsupported("pre_tokenizer type \"" + type + "\"");
}

}  // namespace lema::trainer::tokenizer_json
