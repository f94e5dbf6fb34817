#include "stop_ids.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>

#include "lema/base/error.hpp"

namespace lema::tools {
namespace {

namespace fs = std::filesystem;

// Note [Stop ids]
// transformers' generate() stops at any id of generation_config.eos_token_id, which
// from_pretrained reads from generation_config.json, or builds from config.json when that file
// is missing. Llama 3 Instruct is the case that matters: its tokenizer.json adds BOS only (no
// EOS to learn from the post-processor), config.json names <|end_of_text|>, and only
// generation_config.json's list [<|end_of_text|>, <|eot_id|>] holds the id a chat reply ends
// with. So lema takes the same list, falling back to config.json, and adds the tokenizer's own
// end-of-sequence id (the one its post-processor appends to training documents, or the one
// transformers' tokenizer names for --chat), which a model trained on lema's text data learned
// to emit. A malformed file is refused rather than skipped: a silently ignored stop id is a reply
// that runs on to --max-new-tokens with nothing said.

nlohmann::json read_json(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw InvalidArgument(file.string() + ": cannot be opened");
  std::stringstream buffer;
  buffer << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(buffer.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    throw InvalidArgument(file.string() +
                          ": not a JSON object; fix the file or remove it (lema reads its "
                          "eos_token_id)");
  }
  return j;
}

// The ids of `file`'s eos_token_id; empty when absent or null.
std::vector<std::int64_t> eos_ids_of(const fs::path& file, std::int64_t vocab) {
  const nlohmann::json j = read_json(file);
  const auto field = j.find("eos_token_id");
  if (field == j.end() || field->is_null()) return {};
  const auto bad = [&] {
    return InvalidArgument(fmt::format(
        "{}: eos_token_id is {}; give a token id or a list of token ids (or give --stop-id)",
        file.string(), field->dump()));
  };
  std::vector<nlohmann::json> items;
  if (field->is_array()) {
    items.assign(field->begin(), field->end());
  } else {
    items.push_back(*field);
  }
  std::vector<std::int64_t> ids;
  for (const auto& item : items) {
    if (!item.is_number_integer()) throw bad();
    // An unsigned id past int64 would wrap: compare it as it is written.
    const bool in_vocab = item.is_number_unsigned()
                              ? item.get<std::uint64_t>() < static_cast<std::uint64_t>(vocab)
                              : item.get<std::int64_t>() >= 0 && item.get<std::int64_t>() < vocab;
    if (!in_vocab) {
      throw InvalidArgument(fmt::format(
          "{}: eos_token_id {} is outside the model's vocabulary of {} ids; fix the file (does "
          "it belong to this model?) or give --stop-id",
          file.string(), item.dump(), vocab));
    }
    ids.push_back(item.get<std::int64_t>());
  }
  return ids;
}

}  // namespace

std::vector<std::int64_t> model_stop_ids(const fs::path& model_dir, std::int64_t vocab,
                                         const std::vector<std::int64_t>& tokenizer_eos) {
  std::vector<std::int64_t> ids;
  if (const fs::path g = model_dir / "generation_config.json"; fs::exists(g)) {
    ids = eos_ids_of(g, vocab);
  }
  if (ids.empty()) ids = eos_ids_of(model_dir / "config.json", vocab);
  for (const std::int64_t id : tokenizer_eos) {
    if (id >= 0 && id < vocab) ids.push_back(id);
  }
  std::vector<std::int64_t> unique;
  for (const std::int64_t id : ids) {
    if (std::find(unique.begin(), unique.end(), id) == unique.end()) unique.push_back(id);
  }
  return unique;
}

}  // namespace lema::tools
