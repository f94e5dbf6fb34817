// Reading prepared examples ({"input_ids": [...], "labels": [...]} per JSONL line).
#pragma once

#include <filesystem>
#include <string>

#include "lema/trainer/token_source.hpp"

namespace lema::trainer::detail {

/// True when the first non-blank line of a JSONL file is an object with "input_ids".
bool looks_prepared(const std::string& bytes);

/// Every line an example; each refused line is named with its line number and what is wrong
/// (ids outside the vocabulary, labels of another length, a label that is neither -100 nor the
/// id, no label to learn from after the first position).
TokenStream read_prepared(const std::filesystem::path& path, const std::string& bytes,
                          const TokenSourceOptions& options);

}  // namespace lema::trainer::detail
