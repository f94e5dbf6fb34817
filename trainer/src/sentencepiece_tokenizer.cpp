// The SentencePiece side of tokenizer.hpp; compiled with or without the library.
#include <string>

#include "lema/base/error.hpp"
#include "lema/trainer/tokenizer.hpp"

#ifdef LEMA_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace lema::trainer {

#ifdef LEMA_HAVE_SENTENCEPIECE

namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::filesystem::path& model_file) : path_(model_file) {
    const auto status = processor_.Load(model_file.string());
    if (!status.ok()) {
      throw InvalidArgument(model_file.string() + ": not a SentencePiece model (" +
                            status.ToString() + "); remove it to tokenize bytes, or replace it");
    }
  }

  std::vector<std::uint32_t> encode(std::string_view text) const override {
    std::vector<int> ids;
    const auto status = processor_.Encode(text, &ids);
    if (!status.ok()) {
      throw InvalidArgument(path_.string() + ": SentencePiece could not encode text (" +
                            status.ToString() + ")");
    }
    return {ids.begin(), ids.end()};
  }
  std::string decode(const std::vector<std::uint32_t>& ids) const override {
    std::vector<int> known;
    for (const std::uint32_t id : ids) {
      if (id < static_cast<std::uint32_t>(processor_.GetPieceSize())) {
        known.push_back(static_cast<int>(id));
      }
    }
    std::string text;
    const auto status = processor_.Decode(known, &text);
    if (!status.ok()) {
      throw InvalidArgument(path_.string() + ": SentencePiece could not decode ids (" +
                            status.ToString() + ")");
    }
    return text;
  }
  std::optional<std::uint32_t> bos_id() const override { return id_or_none(processor_.bos_id()); }
  std::optional<std::uint32_t> eos_id() const override { return id_or_none(processor_.eos_id()); }
  std::int64_t vocab_size() const override { return processor_.GetPieceSize(); }
  std::string describe() const override { return "sentencepiece " + path_.string(); }

 private:
  static std::optional<std::uint32_t> id_or_none(int id) {
    return id >= 0 ? std::optional<std::uint32_t>(static_cast<std::uint32_t>(id)) : std::nullopt;
  }

  std::filesystem::path path_;
  sentencepiece::SentencePieceProcessor processor_;
};

}  // namespace

bool have_sentencepiece() noexcept {
  return true;
}

std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& model_file) {
  return std::make_unique<SentencePieceTokenizer>(model_file);
}

#else

bool have_sentencepiece() noexcept {
  return false;
}

std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& model_file) {
  throw InvalidArgument(model_file.string() +
                        ": this build of LEMA has no SentencePiece (install "
                        "libsentencepiece-dev and rebuild), or give token ids (.bin/.npy)");
}

#endif

}  // namespace lema::trainer
