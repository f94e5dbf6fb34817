// `lema generate`: which sampled ids end a reply (Note [Stop ids]).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace lema::tools {

/// The ids that end a reply for the model in `model_dir`: generation_config.json's
/// eos_token_id (an id or a list), else config.json's, together with `tokenizer_eos` (the
/// tokenizers' own end-of-sequence ids), in that order without repeats. Ids outside
/// [0, vocab) in `tokenizer_eos` are dropped (they can never be sampled). Throws
/// InvalidArgument, one line naming the file and the field, for a file that is not JSON, an
/// eos_token_id that is not an id or a list of ids, or an id outside the vocabulary.
std::vector<std::int64_t> model_stop_ids(const std::filesystem::path& model_dir, std::int64_t vocab,
                                         const std::vector<std::int64_t>& tokenizer_eos);

}  // namespace lema::tools
