// A Hugging Face tokenizer.json as a Tokenizer: added tokens, normalizer, pre-tokenizer, BPE,
// post-processor (BOS/EOS) and decoder, in the order tokenizers applies them.
//
// Note [tokenizer.json in C++]: `lema train` tokenizes text data and `lema generate` prompts
// without Python, so the reader follows tokenizers' Rust code step by step (added-token
// matching, split behaviours, BPE merge order, byte fallback) rather than approximating it.
// Regexes go through PCRE2 (the Split patterns of GPT-2, Llama 3 and Qwen use Unicode classes
// and lookahead that std::regex lacks) and normalization forms through utf8proc. Whatever the
// reader does not implement is refused when the file is opened, naming the component, so ids
// are never silently different from the package's.
#include <algorithm>
#include <array>
#include <fstream>
#include <sstream>

#include "lema/base/error.hpp"
#include "lema/trainer/tokenizer.hpp"
#include "tokenizer_json/components.hpp"

namespace lema::trainer {

namespace tj = tokenizer_json;

namespace {

struct AddedToken {
  std::string content;
  std::uint32_t id = 0;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

/// A run of text and, when it is an added token, its id.
struct Segment {
  std::size_t start;
  std::size_t end;
  std::optional<std::uint32_t> id;
};

/// Finds added tokens in text leftmost-longest, as tokenizers' Aho-Corasick matcher does.
class AddedMatcher {
 public:
  void add(std::string pattern, const AddedToken* token) {
    if (pattern.empty()) return;
    patterns_.push_back({std::move(pattern), token});
  }
  void finish() {
    std::stable_sort(patterns_.begin(), patterns_.end(), [](const auto& a, const auto& b) {
      return a.text.size() > b.text.size();
    });
    for (std::size_t i = 0; i < patterns_.size(); ++i) {
      by_first_[static_cast<unsigned char>(patterns_[i].text[0])].push_back(i);
    }
  }

  /// tokenizers' AddedVocabulary::find_matches, with single_word, lstrip and rstrip.
  std::vector<Segment> split(const std::string& s) const {
    std::vector<Segment> out;
    std::size_t start_offset = 0;
    std::size_t at = 0;
    while (at < s.size()) {
      const Pattern* hit = nullptr;
      std::size_t pos = at;
      for (; pos < s.size() && hit == nullptr; ++pos) {
        for (const std::size_t i : by_first_[static_cast<unsigned char>(s[pos])]) {
          if (s.compare(pos, patterns_[i].text.size(), patterns_[i].text) == 0) {
            hit = &patterns_[i];
            break;
          }
        }
      }
      if (hit == nullptr) break;
      std::size_t start = pos - 1;
      std::size_t stop = start + hit->text.size();
      at = stop;
      const AddedToken& t = *hit->token;
      if (t.single_word) {
        const bool start_space = start == 0 || !ends_with_word(s, start);
        const bool stop_space = stop == s.size() || !tj::is_alphanumeric(word_char(s, stop));
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) start = std::max(space_start(s, start), start_offset);
      if (t.rstrip) {
        while (stop < s.size() && tj::is_whitespace(tj::code_point(s, stop))) {
          stop += tj::char_len(s, stop);
        }
      }
      if (start_offset < start) out.push_back({start_offset, start, std::nullopt});
      out.push_back({start, stop, t.id});
      start_offset = stop;
    }
    if (start_offset < s.size() || out.empty()) out.push_back({start_offset, s.size(), std::nullopt});
    return out;
  }

 private:
  struct Pattern {
    std::string text;
    const AddedToken* token;
  };
  static char32_t word_char(const std::string& s, std::size_t i) {
    const char32_t c = tj::code_point(s, i);
    return c == U'_' ? U'a' : c;
  }
  static std::size_t char_before(const std::string& s, std::size_t end) {
    std::size_t i = end - 1;
    while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
    return i;
  }
  static bool ends_with_word(const std::string& s, std::size_t end) {
    return tj::is_alphanumeric(word_char(s, char_before(s, end)));
  }
  /// Where the whitespace run that ends at `end` begins.
  static std::size_t space_start(const std::string& s, std::size_t end) {
    while (end > 0) {
      const std::size_t i = char_before(s, end);
      if (!tj::is_whitespace(tj::code_point(s, i))) break;
      end = i;
    }
    return end;
  }

  std::vector<Pattern> patterns_;
  std::array<std::vector<std::size_t>, 256> by_first_;
};

class JsonTokenizer final : public Tokenizer {
 public:
  JsonTokenizer(const std::filesystem::path& file, const nlohmann::json& j) : path_(file) {
    const auto& model = j.at("model");
    const std::string type = model.contains("type") ? model["type"].get<std::string>()
                             : model.contains("merges") ? "BPE"
                                                        : "(untyped)";
    if (type != "BPE") throw tj::Unsupported("model type \"" + type + "\"");
    bpe_ = std::make_unique<tj::Bpe>(model);
    end_id_ = bpe_->end_id();
    normalizer_ = tj::make_normalizer(j.value("normalizer", nlohmann::json()));
    pre_tokenizer_ = tj::make_pre_tokenizer(j.value("pre_tokenizer", nlohmann::json()));
    decoder_ = tj::make_decoder(j.value("decoder", nlohmann::json()));
    read_post_processor(j.value("post_processor", nlohmann::json()));

    for (const auto& a : j.value("added_tokens", nlohmann::json::array())) {
      AddedToken t;
      t.content = a.at("content").get<std::string>();
      t.id = a.at("id").get<std::uint32_t>();
      if (t.id >= tj::kMaxId) throw tj::Unsupported("added token id " + std::to_string(t.id));
      t.single_word = a.value("single_word", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.special = a.value("special", false);
      t.normalized = a.value("normalized", !t.special);
      added_.push_back(t);
    }
    for (const auto& t : added_) {
      added_by_id_[t.id] = &t;
      end_id_ = std::max(end_id_, t.id + 1);
      if (t.normalized) {
        normalized_.add(normalizer_(t.content), &t);
      } else {
        raw_.add(t.content, &t);
      }
    }
    raw_.finish();
    normalized_.finish();
    const bool byte_level = j.dump().find("\"ByteLevel\"") != std::string::npos;
    kind_ = std::string("BPE") + (byte_level ? ", byte-level" : "") +
            (model.value("byte_fallback", false) ? ", byte fallback" : "");
  }

  std::vector<std::uint32_t> encode(std::string_view input) const override {
    const std::string text = tj::valid_utf8(input);
    std::vector<std::uint32_t> ids;
    for (const auto& seg : raw_.split(text)) {
      if (seg.id) {
        ids.push_back(*seg.id);
        continue;
      }
      const std::string normalized = normalizer_(text.substr(seg.start, seg.end - seg.start));
      for (const auto& sub : normalized_.split(normalized)) {
        if (sub.id) {
          ids.push_back(*sub.id);
          continue;
        }
        if (sub.end == sub.start) continue;
        std::vector<tj::Piece> pieces{
            {normalized.substr(sub.start, sub.end - sub.start), seg.start == 0 && sub.start == 0}};
        pre_tokenizer_(pieces);
        for (const auto& p : pieces) {
          if (!p.text.empty()) bpe_->tokenize(p.text, ids);
        }
      }
    }
    return ids;
  }

  std::string decode(const std::vector<std::uint32_t>& ids) const override {
    std::vector<std::string> tokens;
    for (const std::uint32_t id : ids) {
      if (const auto it = added_by_id_.find(id); it != added_by_id_.end()) {
        if (!it->second->special) tokens.push_back(it->second->content);
      } else if (const std::string* t = bpe_->id_to_token(id)) {
        tokens.push_back(*t);
      }
    }
    std::string out;
    for (const auto& piece : decoder_(std::move(tokens))) out += piece;
    return out;
  }

  std::optional<std::uint32_t> bos_id() const override { return bos_; }
  std::optional<std::uint32_t> eos_id() const override { return eos_; }
  std::int64_t vocab_size() const override { return end_id_; }
  std::string describe() const override {
    return "tokenizer.json " + path_.string() + " (" + kind_ + ")";
  }

 private:
  /// BOS/EOS from what the post-processor puts around a single sequence.
  void read_post_processor(const nlohmann::json& p) {
    if (p.is_null()) return;
    const std::string type = tj::type_of(p, "post_processor");
    if (type == "Sequence") {
      for (const auto& q : p.at("processors")) read_post_processor(q);
      return;
    }
    if (type == "ByteLevel") return;  // offsets only
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      bos_ = p.at("cls").at(1).get<std::uint32_t>();
      eos_ = p.at("sep").at(1).get<std::uint32_t>();
      return;
    }
    if (type != "TemplateProcessing") throw tj::Unsupported("post_processor type \"" + type + "\"");
    std::vector<std::uint32_t> before;
    std::vector<std::uint32_t> after;
    bool seen_sequence = false;
    for (const auto& item : p.at("single")) {
      if (item.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      const std::string name = item.at("SpecialToken").at("id").get<std::string>();
      for (const auto& id : p.at("special_tokens").at(name).at("ids")) {
        (seen_sequence ? after : before).push_back(id.get<std::uint32_t>());
      }
    }
    if (before.size() > 1 || after.size() > 1) {
      throw tj::Unsupported("TemplateProcessing with more than one token on a side of the text");
    }
    if (!before.empty()) bos_ = before[0];
    if (!after.empty()) eos_ = after[0];
  }

  std::filesystem::path path_;
  std::unique_ptr<tj::Bpe> bpe_;
  tj::Normalizer normalizer_;
  tj::PreTokenizer pre_tokenizer_;
  tj::Decoder decoder_;
  std::vector<AddedToken> added_;  // complete before the matchers point into it
  std::unordered_map<std::uint32_t, const AddedToken*> added_by_id_;
  AddedMatcher raw_;         // added tokens matched in the text as given
  AddedMatcher normalized_;  // added tokens matched after normalization
  std::optional<std::uint32_t> bos_;
  std::optional<std::uint32_t> eos_;
  std::uint32_t end_id_ = 0;
  std::string kind_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& file) {
  const std::string refuse_tail =
      "; lema reads BPE tokenizer.json files (byte-level or SentencePiece-style); give token "
      "ids instead, or prepare data with python -m lema.data";
  std::ifstream in(file, std::ios::binary);
  if (!in) throw InvalidArgument(file.string() + ": cannot be opened");
  std::stringstream buffer;
  buffer << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(buffer.str());
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(file.string() + ": not valid JSON (" + e.what() + ")");
  }
  try {
    return std::make_unique<JsonTokenizer>(file, j);
  } catch (const tj::Unsupported& e) {
    throw InvalidArgument(file.string() + ": unsupported " + e.what() + refuse_tail);
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(file.string() + ": malformed tokenizer (" + e.what() + ")");
  }
}

}  // namespace lema::trainer
