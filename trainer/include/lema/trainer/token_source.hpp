// Token streams for training, read from one data file:
//   .bin    raw little-endian token ids, uint16 or uint32 (TokenWidth)
//   .npy    a NumPy array of dtype <u2, <u4, <i4 or <i8, 1-D or 2-D C-order (rows concatenated)
//   .jsonl  one JSON object per line with a string field "text"; each is one document. Or
//           prepared examples: {"input_ids": [...], "labels": [...]} per line, labels -100 where
//           no loss is taken (transformers' convention; what `python -m lema.data` writes from
//           chat and instruction data); each line is one example, padded or packed
//           (token_batches.hpp)
//   other   plain text; the whole file is one document
// Text is tokenized by a Tokenizer (tokenizer.hpp); each document becomes BOS + ids + EOS
// (whichever of the two the tokenizer has), documents concatenated in file order.
//
// Every rejection is an InvalidArgument with a one-line message naming the file, what is
// wrong (the position and the id for an out-of-vocabulary token) and what to do.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "lema/trainer/tokenizer.hpp"

namespace lema::trainer {

enum class TokenFileFormat { kAuto, kBin, kNpy, kJsonl, kText };
enum class TokenWidth { kAuto, kUint16, kUint32 };

/// "bin", "npy", "jsonl", "text" or "auto" → the format; throws InvalidArgument otherwise.
TokenFileFormat parse_token_file_format(const std::string& name);

struct TokenSourceOptions {
  /// The model's vocabulary size; every id must be below it. Required (> 0).
  std::int64_t vocab_size = 0;
  /// kAuto: from the extension (.bin, .npy, .jsonl; anything else is plain text).
  TokenFileFormat format = TokenFileFormat::kAuto;
  /// Element width of a .bin file. kAuto: uint16 when every id of the vocabulary fits
  /// (vocab_size ≤ 65536), else uint32.
  TokenWidth bin_width = TokenWidth::kAuto;
  /// Tokenizes .jsonl and text files; required for them, unused for token-id files.
  const Tokenizer* tokenizer = nullptr;
  /// The JSONL field holding each document's text.
  std::string jsonl_field = "text";
};

/// One prepared example: its ids, the label of each (the id, or -100: no loss there) and the
/// line of the data file it came from.
struct PreparedExample {
  std::vector<std::uint32_t> ids;
  std::vector<std::int32_t> labels;
  std::uint64_t line = 0;
};

inline constexpr std::int32_t kIgnoreLabel = -100;

struct TokenStream {
  std::filesystem::path path;
  std::vector<std::uint32_t> tokens;
  /// Prepared examples (then `tokens` is empty): each becomes one sequence of its own.
  std::vector<PreparedExample> examples;
  /// How the file was read, for logs: "uint16 .bin", "npy <i8 [4, 512]", "jsonl (12 documents,
  /// byte-level ...)".
  std::string description;
};

/// Reads and validates `path`: exists, not empty, well-formed for its format, every id in
/// [0, vocab_size).
TokenStream load_tokens(const std::filesystem::path& path, const TokenSourceOptions& options);

/// The width a .bin file is read with under `options`.
TokenWidth resolve_bin_width(const TokenSourceOptions& options);

}  // namespace lema::trainer
