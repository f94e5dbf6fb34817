#include "lema/trainer/tokenizer.hpp"

#include <spdlog/spdlog.h>

#include <string>

#include "lema/base/error.hpp"

namespace lema::trainer {

ByteTokenizer::ByteTokenizer(std::int64_t model_vocab, std::uint32_t byte_offset)
    : model_vocab_(model_vocab), byte_offset_(byte_offset) {}

// Checked when text is encoded, not at construction: a model too small for byte ids still
// trains on token ids and generates from them (decode() skips ids that are not bytes).
std::vector<std::uint32_t> ByteTokenizer::encode(std::string_view text) const {
  if (model_vocab_ < static_cast<std::int64_t>(byte_offset_) + 256) {
    throw InvalidArgument("the byte-level tokenizer needs " + std::to_string(byte_offset_ + 256) +
                          " token ids (256 bytes after offset " + std::to_string(byte_offset_) +
                          ") but the model's vocabulary has " + std::to_string(model_vocab_) +
                          "; put a tokenizer.model beside the checkpoint or give token ids "
                          "(.bin/.npy) instead of text");
  }
  std::vector<std::uint32_t> ids;
  ids.reserve(text.size());
  for (const char c : text) ids.push_back(static_cast<unsigned char>(c) + byte_offset_);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<std::uint32_t>& ids) const {
  std::string text;
  for (const std::uint32_t id : ids) {
    if (id >= byte_offset_ && id < byte_offset_ + 256) text += static_cast<char>(id - byte_offset_);
  }
  return text;
}

// Llama's convention (<unk>=0, <s>=1, </s>=2) when the offset leaves room for it.
std::optional<std::uint32_t> ByteTokenizer::bos_id() const {
  return byte_offset_ >= 3 ? std::optional<std::uint32_t>(1) : std::nullopt;
}
std::optional<std::uint32_t> ByteTokenizer::eos_id() const {
  return byte_offset_ >= 3 ? std::optional<std::uint32_t>(2) : std::nullopt;
}

std::string ByteTokenizer::describe() const {
  return "byte-level (byte b -> id b + " + std::to_string(byte_offset_) + ")";
}

namespace {

/// Text cannot be tokenized for this model here; ids still work.
class NoTextTokenizer final : public Tokenizer {
 public:
  explicit NoTextTokenizer(std::string why) : why_(std::move(why)) {}
  std::vector<std::uint32_t> encode(std::string_view) const override {
    throw InvalidArgument(why_);
  }
  std::string decode(const std::vector<std::uint32_t>&) const override { return {}; }
  std::optional<std::uint32_t> bos_id() const override { return std::nullopt; }
  std::optional<std::uint32_t> eos_id() const override { return std::nullopt; }
  std::int64_t vocab_size() const override { return 0; }
  std::string describe() const override { return "none (text refused)"; }

 private:
  std::string why_;
};

}  // namespace

std::unique_ptr<Tokenizer> open_tokenizer(const std::filesystem::path& model_dir,
                                          std::int64_t model_vocab, bool byte_level_ids) {
  std::error_code ec;
  if (std::filesystem::is_regular_file(model_dir / "tokenizer.json", ec)) {
    // A tokenizer.json the reader refuses refuses text when text comes, not here: token ids
    // (.bin/.npy data, --prompt-ids) still train and generate with such a model.
    try {
      return load_tokenizer_json(model_dir / "tokenizer.json");
    } catch (const InvalidArgument& e) {
      return std::make_unique<NoTextTokenizer>(e.what());
    }
  }
  const auto model_file = model_dir / "tokenizer.model";
  if (std::filesystem::is_regular_file(model_file, ec)) {
    if (have_sentencepiece()) return load_sentencepiece(model_file);
    spdlog::warn("{}: this build has no SentencePiece; tokenizing text byte by byte instead",
                 model_file.string());
    return std::make_unique<ByteTokenizer>(model_vocab);
  }
  const std::string what_to_do =
      "give token ids (.bin/.npy, or --prompt-ids), or prepare chat and instruction data with "
      "the model's own tokenizer: python -m lema.data --model DIR --data FILE --out "
      "prepared.jsonl";
  if (std::filesystem::is_regular_file(model_dir / "vocab.json", ec)) {
    return std::make_unique<NoTextTokenizer>(
        (model_dir / "vocab.json").string() +
        ": lema reads tokenizer.json and SentencePiece tokenizer.model files, not vocab.json "
        "alone (save the tokenizer with a recent transformers to get a tokenizer.json), and "
        "tokenizing this model's text byte by byte would give ids its vocabulary does not "
        "mean; " + what_to_do);
  }
  if (!byte_level_ids) {
    return std::make_unique<NoTextTokenizer>(
        model_dir.string() +
        " has no tokenizer file and its vocabulary does not hold Llama's byte tokens, so text "
        "cannot be tokenized; " + what_to_do);
  }
  return std::make_unique<ByteTokenizer>(model_vocab);
}

}  // namespace lema::trainer
