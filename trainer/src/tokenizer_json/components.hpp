// The stages of a Hugging Face tokenizer.json, each built from its JSON object: normalizers,
// pre-tokenizers, the BPE model and decoders. Alignments (offsets) are not tracked: the trainer
// needs ids and text, not spans.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer_json/text.hpp"

namespace lema::trainer::tokenizer_json {

/// Text → normalized text. A null JSON normalizer is the identity.
using Normalizer = std::function<std::string(std::string)>;
Normalizer make_normalizer(const nlohmann::json& j);

/// A piece of normalized text on its way to the model. `at_start`: it begins at offset 0 of the
/// original text, which Metaspace's prepend_scheme "first" asks.
struct Piece {
  std::string text;
  bool at_start = false;
};
/// Splits (and rewrites) pieces in place; empty pieces are dropped, as tokenizers drops them.
using PreTokenizer = std::function<void(std::vector<Piece>&)>;
PreTokenizer make_pre_tokenizer(const nlohmann::json& j);

/// Token strings → text pieces, concatenated by the caller. A null JSON decoder joins with " ".
using Decoder = std::function<std::vector<std::string>(std::vector<std::string>)>;
Decoder make_decoder(const nlohmann::json& j);

/// GPT-2's byte → printable character table, shared by the ByteLevel stages.
const std::string& byte_char(unsigned char b);
/// The byte a ByteLevel character stands for, or -1.
int char_byte(char32_t c);

/// Ids at or above this are refused: no vocabulary is near it, and the id → token table would be
/// sized by it.
inline constexpr std::uint32_t kMaxId = 1u << 26;

/// The BPE model: vocabulary, ranked merges, unknown and byte-fallback handling.
class Bpe {
 public:
  explicit Bpe(const nlohmann::json& model);
  /// Appends the ids of one pre-tokenized piece.
  void tokenize(const std::string& piece, std::vector<std::uint32_t>& out) const;
  std::optional<std::uint32_t> token_to_id(const std::string& token) const;
  const std::string* id_to_token(std::uint32_t id) const;
  std::uint32_t end_id() const { return static_cast<std::uint32_t>(id_to_token_.size()); }

 private:
  struct Merge {
    std::uint32_t rank;
    std::uint32_t new_id;
  };
  static std::uint64_t pair_key(std::uint32_t a, std::uint32_t b) {
    return (static_cast<std::uint64_t>(a) << 32) | b;
  }
  void merge_all(std::vector<std::uint32_t>& ids) const;

  std::unordered_map<std::string, std::uint32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::uint64_t, Merge> merges_;
  std::optional<std::uint32_t> unk_id_;
  std::string prefix_;  // continuing_subword_prefix
  std::string suffix_;  // end_of_word_suffix
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
};

/// The "type" of a component object, or Unsupported naming `what` when there is none.
std::string type_of(const nlohmann::json& j, const char* what);

/// The regular expression of a {"String": s} (matched literally) or {"Regex": r} pattern, as
/// Replace and Split give it; Unsupported naming `what` for any other shape.
Regex pattern_regex(const nlohmann::json& pattern, const char* what);

}  // namespace lema::trainer::tokenizer_json
