// Text → token ids for the trainer's text data (JSONL and plain text).
//
// With a Hugging Face `tokenizer.json` (BPE: byte-level as GPT-2, Llama 3 and Qwen, or
// SentencePiece-style with byte fallback as Llama 2 and Mistral) the text is encoded as the
// `tokenizers` package encodes it. With a SentencePiece `tokenizer.model` beside the checkpoint (and LEMA built with
// SentencePiece) the text is encoded the way the model was trained. Without one, a byte-level
// fallback maps each UTF-8 byte b to id b + byte_offset. The default offset 3 is where Llama's
// SentencePiece vocabulary keeps its byte tokens <0x00>..<0xFF> (after <unk>=0, <s>=1, </s>=2),
// so fallback ids mean the same bytes to a Llama tokenizer; the vocabulary must hold
// byte_offset + 256 ids.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lema::trainer {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  /// The ids of `text`, without BOS/EOS.
  virtual std::vector<std::uint32_t> encode(std::string_view text) const = 0;
  /// The text of `ids`; control ids (BOS, EOS, ...) and ids outside the vocabulary produce
  /// nothing. May end in an incomplete UTF-8 character when the ids do.
  virtual std::string decode(const std::vector<std::uint32_t>& ids) const = 0;
  /// Beginning/end-of-sequence ids placed around each document; nullopt when there is none.
  virtual std::optional<std::uint32_t> bos_id() const = 0;
  virtual std::optional<std::uint32_t> eos_id() const = 0;
  /// One past the largest id encode() can produce.
  virtual std::int64_t vocab_size() const = 0;
  /// "sentencepiece <path>" or "byte-level (offset 3)", for logs.
  virtual std::string describe() const = 0;
};

/// Byte-level fallback: byte b → b + byte_offset; BOS 1 and EOS 2 when byte_offset ≥ 3.
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr std::uint32_t kDefaultOffset = 3;
  /// encode() throws InvalidArgument when byte_offset + 256 > model_vocab (the ids would not
  /// fit); decoding and BOS/EOS work with any vocabulary.
  explicit ByteTokenizer(std::int64_t model_vocab, std::uint32_t byte_offset = kDefaultOffset);
  std::vector<std::uint32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<std::uint32_t>& ids) const override;
  std::optional<std::uint32_t> bos_id() const override;
  std::optional<std::uint32_t> eos_id() const override;
  std::int64_t vocab_size() const override { return byte_offset_ + 256; }
  std::string describe() const override;

 private:
  std::int64_t model_vocab_;
  std::uint32_t byte_offset_;
};

/// True when this build can read SentencePiece models.
bool have_sentencepiece() noexcept;

/// Loads a SentencePiece model file. Throws InvalidArgument naming the file when it cannot be
/// loaded or when the build has no SentencePiece.
std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& model_file);

/// Reads a Hugging Face tokenizer.json. Throws InvalidArgument, one line naming the file and the
/// component, for malformed JSON and for anything the reader does not implement (model types
/// other than BPE, unknown normalizers, pre-tokenizers, post-processors or decoders, a regex
/// PCRE2 cannot compile, merges of tokens the vocab lacks).
std::unique_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& file);

/// The tokenizer for a checkpoint directory: `model_dir/tokenizer.json` when present (the file
/// transformers' fast tokenizers use, so it wins over a tokenizer.model beside it; one the reader
/// refuses gives a tokenizer whose encode throws that refusal, so ids still work); else
/// `model_dir/tokenizer.model` through SentencePiece when present and supported; else, when the directory holds no tokenizer file at all and
/// `byte_level_ids` (a Llama-layout vocabulary, as `lema gen` writes), ByteTokenizer(model_vocab)
/// (logged as a warning when a tokenizer.model exists but this build cannot read it). Otherwise
/// a tokenizer that refuses text (encode throws InvalidArgument, one line naming the file or the
/// model and pointing at `python -m lema.data` and token ids) and decodes nothing: a
/// vocab.json-only model's text is never silently tokenized byte by byte.
std::unique_ptr<Tokenizer> open_tokenizer(const std::filesystem::path& model_dir,
                                          std::int64_t model_vocab, bool byte_level_ids = true);

}  // namespace lema::trainer
