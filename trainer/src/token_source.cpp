#include "lema/trainer/token_source.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <span>
#include <string>

#include "detail/jsonl_lines.hpp"
#include "detail/npy_header.hpp"
#include "prepared_examples.hpp"
#include "lema/base/error.hpp"

namespace lema::trainer {

namespace {

static_assert(std::endian::native == std::endian::little,
              "token files are little-endian; this reader assumes a little-endian host");

std::string read_whole_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw SystemError("cannot open data file " + path.string() + ": " + std::strerror(errno),
                      errno);
  }
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) {
    throw SystemError("cannot read data file " + path.string() + ": " + std::strerror(errno),
                      errno);
  }
  return bytes;
}

[[noreturn]] void out_of_vocabulary(const std::filesystem::path& path, std::uint64_t position,
                                    std::int64_t id, std::int64_t vocab, const std::string& hint) {
  throw InvalidArgument(path.string() + ": token " + std::to_string(position) + " is id " +
                        std::to_string(id) + ", outside the model's vocabulary of " +
                        std::to_string(vocab) + " ids; " + hint);
}

// Widens `count` little-endian elements of type T at `data` into ids, checking each.
template <typename T>
void append_ids(std::span<const char> data, const std::filesystem::path& path, std::int64_t vocab,
                const std::string& hint, std::vector<std::uint32_t>& out) {
  const std::size_t count = data.size() / sizeof(T);
  out.reserve(out.size() + count);
  for (std::size_t i = 0; i < count; ++i) {
    T v;
    std::memcpy(&v, data.data() + i * sizeof(T), sizeof(T));
    if constexpr (std::is_signed_v<T>) {
      if (v < 0 || static_cast<std::int64_t>(v) >= vocab) {
        out_of_vocabulary(path, i, static_cast<std::int64_t>(v), vocab, hint);
      }
    } else {
      if (static_cast<std::uint64_t>(v) >= static_cast<std::uint64_t>(vocab)) {
        out_of_vocabulary(path, i, static_cast<std::int64_t>(v), vocab, hint);
      }
    }
    out.push_back(static_cast<std::uint32_t>(v));
  }
}

TokenFileFormat format_from_extension(const std::filesystem::path& path) {
  const auto ext = path.extension().string();
  if (ext == ".bin") return TokenFileFormat::kBin;
  if (ext == ".npy") return TokenFileFormat::kNpy;
  if (ext == ".jsonl") return TokenFileFormat::kJsonl;
  return TokenFileFormat::kText;
}

TokenStream read_bin(const std::filesystem::path& path, const std::string& bytes,
                     const TokenSourceOptions& options) {
  const bool wide = resolve_bin_width(options) == TokenWidth::kUint32;
  const std::size_t width = wide ? 4 : 2;
  const char* type = wide ? "uint32" : "uint16";
  if (bytes.size() % width != 0) {
    throw InvalidArgument(path.string() + ": " + std::to_string(bytes.size()) +
                          " bytes is not a whole number of " + type +
                          " token ids; was it written with the other width? (the width is " +
                          (options.bin_width == TokenWidth::kAuto ? "chosen from the vocabulary "
                                                                    "size; set it explicitly)"
                                                                  : "set explicitly)"));
  }
  const std::string hint =
      std::string("the file is read as ") + type +
      (wide ? "; was it written as uint16?" : "; was it written as uint32, or for another model?");
  TokenStream stream{path, {}, {}, std::string(type) + " .bin"};
  const std::span<const char> data(bytes.data(), bytes.size());
  if (wide) {
    append_ids<std::uint32_t>(data, path, options.vocab_size, hint, stream.tokens);
  } else {
    append_ids<std::uint16_t>(data, path, options.vocab_size, hint, stream.tokens);
  }
  return stream;
}

TokenStream read_npy(const std::filesystem::path& path, const std::string& bytes,
                     const TokenSourceOptions& options) {
  const auto header = detail::parse_npy_header(bytes, path.string());
  std::string shape_text;
  std::uint64_t count = 1;
  for (const auto d : header.shape) {
    shape_text += (shape_text.empty() ? "" : ", ") + std::to_string(d);
    if (d != 0 && count > std::numeric_limits<std::uint64_t>::max() / 8 / d) {
      throw InvalidArgument(path.string() + ": .npy shape [" + shape_text + "...] is too large");
    }
    count *= d;
  }
  if (header.shape.empty() || header.shape.size() > 2) {
    throw InvalidArgument(path.string() + ": .npy array of shape [" + shape_text +
                          "]; token ids must be a 1-D or 2-D array");
  }
  if (header.fortran_order && header.shape.size() == 2 && header.shape[0] > 1 &&
      header.shape[1] > 1) {
    throw InvalidArgument(path.string() +
                          ": .npy array is in Fortran order; save it C-ordered "
                          "(numpy.ascontiguousarray) so rows are sequences");
  }
  std::size_t width = 0;
  if (header.descr == "<u2") width = 2;
  if (header.descr == "<u4" || header.descr == "<i4") width = 4;
  if (header.descr == "<i8") width = 8;
  if (width == 0) {
    throw InvalidArgument(path.string() + ": .npy dtype '" + header.descr +
                          "' is not a token-id type; save it as uint16, uint32, int32 or int64 "
                          "(little-endian)");
  }
  const std::uint64_t data_bytes = bytes.size() - header.data_offset;
  if (data_bytes != count * width) {
    throw InvalidArgument(path.string() + ": .npy header says [" + shape_text + "] of " +
                          header.descr + " (" + std::to_string(count * width) + " bytes) but " +
                          std::to_string(data_bytes) +
                          " bytes follow; the file is truncated or "
                          "corrupt");
  }
  TokenStream stream{path, {}, {}, "npy " + header.descr + " [" + shape_text + "]"};
  const std::span<const char> data(bytes.data() + header.data_offset, data_bytes);
  const std::string hint = "were these ids made for another model?";
  if (header.descr == "<u2")
    append_ids<std::uint16_t>(data, path, options.vocab_size, hint, stream.tokens);
  if (header.descr == "<u4")
    append_ids<std::uint32_t>(data, path, options.vocab_size, hint, stream.tokens);
  if (header.descr == "<i4")
    append_ids<std::int32_t>(data, path, options.vocab_size, hint, stream.tokens);
  if (header.descr == "<i8")
    append_ids<std::int64_t>(data, path, options.vocab_size, hint, stream.tokens);
  return stream;
}

void append_document(const Tokenizer& tokenizer, std::string_view text,
                     std::vector<std::uint32_t>& out) {
  if (const auto bos = tokenizer.bos_id()) out.push_back(*bos);
  const auto ids = tokenizer.encode(text);
  out.insert(out.end(), ids.begin(), ids.end());
  if (const auto eos = tokenizer.eos_id()) out.push_back(*eos);
}

TokenStream read_text(const std::filesystem::path& path, const std::string& bytes, bool jsonl,
                      const TokenSourceOptions& options) {
  if (options.tokenizer == nullptr) {
    throw InvalidArgument(path.string() +
                          ": a text file needs a tokenizer (none was given); give token ids "
                          "(.bin/.npy) instead");
  }
  const Tokenizer& tokenizer = *options.tokenizer;
  TokenStream stream{path, {}, {}, ""};
  std::size_t documents = 0;
  if (!jsonl) {
    append_document(tokenizer, bytes, stream.tokens);
    documents = 1;
  } else {
    detail::for_each_jsonl_line(bytes, [&](std::string_view line, std::size_t line_no) {
      const auto where = path.string() + ":" + std::to_string(line_no);
      nlohmann::json object;
      try {
        object = nlohmann::json::parse(line);
      } catch (const nlohmann::json::parse_error& e) {
        throw InvalidArgument(where + ": not a JSON object (" + e.what() +
                              "); JSONL needs one object per line");
      }
      const auto field = object.is_object() ? object.find(options.jsonl_field) : object.end();
      if (!object.is_object() || field == object.end() || !field->is_string()) {
        throw InvalidArgument(where + ": no string field \"" + options.jsonl_field +
                              "\"; each JSONL line needs {\"" + options.jsonl_field +
                              "\": \"...\"}");
      }
      append_document(tokenizer, field->get_ref<const std::string&>(), stream.tokens);
      ++documents;
      return true;
    });
    if (documents == 0) {
      throw InvalidArgument(path.string() +
                            ": no JSONL lines with text; the file holds only "
                            "blank lines");
    }
  }
  stream.description = std::string(jsonl ? "jsonl" : "text") + " (" + std::to_string(documents) +
                       (documents == 1 ? " document, " : " documents, ") + tokenizer.describe() +
                       ")";
  for (std::size_t i = 0; i < stream.tokens.size(); ++i) {
    if (stream.tokens[i] >= static_cast<std::uint64_t>(options.vocab_size)) {
      out_of_vocabulary(path, i, stream.tokens[i], options.vocab_size,
                        "the tokenizer (" + tokenizer.describe() + ", " +
                            std::to_string(tokenizer.vocab_size()) +
                            " ids) does not belong to this model");
    }
  }
  return stream;
}

}  // namespace

TokenFileFormat parse_token_file_format(const std::string& name) {
  if (name == "auto") return TokenFileFormat::kAuto;
  if (name == "bin") return TokenFileFormat::kBin;
  if (name == "npy") return TokenFileFormat::kNpy;
  if (name == "jsonl") return TokenFileFormat::kJsonl;
  if (name == "text") return TokenFileFormat::kText;
  throw InvalidArgument("unknown data format '" + name + "'; use auto, bin, npy, jsonl or text");
}

TokenWidth resolve_bin_width(const TokenSourceOptions& options) {
  if (options.bin_width != TokenWidth::kAuto) return options.bin_width;
  return options.vocab_size <= 65536 ? TokenWidth::kUint16 : TokenWidth::kUint32;
}

TokenStream load_tokens(const std::filesystem::path& path, const TokenSourceOptions& options) {
  if (options.vocab_size <= 0) {
    throw InvalidArgument("reading " + path.string() + ": the model's vocabulary size is " +
                          std::to_string(options.vocab_size) + "; it must be positive");
  }
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    throw InvalidArgument("data file " + path.string() + " does not exist; check --data");
  }
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw InvalidArgument("data file " + path.string() + " is not a regular file; check --data");
  }
  const std::string bytes = read_whole_file(path);
  if (bytes.empty()) {
    throw InvalidArgument("data file " + path.string() +
                          " is empty; give a file with tokens "
                          "or text");
  }
  auto format =
      options.format == TokenFileFormat::kAuto ? format_from_extension(path) : options.format;
  TokenStream stream;
  switch (format) {
    case TokenFileFormat::kBin:
      stream = read_bin(path, bytes, options);
      break;
    case TokenFileFormat::kNpy:
      stream = read_npy(path, bytes, options);
      break;
    case TokenFileFormat::kJsonl:
      if (detail::looks_prepared(bytes)) return detail::read_prepared(path, bytes, options);
      stream = read_text(path, bytes, /*jsonl=*/true, options);
      break;
    case TokenFileFormat::kText:
    case TokenFileFormat::kAuto:
      stream = read_text(path, bytes, /*jsonl=*/false, options);
      break;
  }
  if (stream.tokens.empty()) {
    throw InvalidArgument("data file " + path.string() + " holds no tokens (" + stream.description +
                          "); give a file with tokens or text");
  }
  return stream;
}

}  // namespace lema::trainer
