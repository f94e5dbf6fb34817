// The tokenizer.json reader on hand-written files: a tiny byte-level BPE, and the one-line
// refusals for files it cannot honour. Parity with the tokenizers package on trained tokenizers
// is tests/python/test_tokenizer_json.py.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/trainer/tokenizer.hpp"
#include "runtime_fixture.hpp"

namespace lema::trainer {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

/// A byte-level BPE knowing "h", "i", "Ġ", "hi" and "Ġhi", with <s> as BOS.
nlohmann::json tiny_byte_level() {
  return nlohmann::json::parse(R"({
    "version": "1.0",
    "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
                      "rstrip": false, "normalized": false, "special": true}],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": " ?\\p{L}+|\\s+"}, "behavior": "Isolated",
       "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
              "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
              "ignore_merges": false,
              "vocab": {"<s>": 0, "h": 1, "i": 2, "Ġ": 3, "hi": 4, "Ġhi": 5},
              "merges": [["h", "i"], ["Ġ", "hi"]]}
  })");
}

class TokenizerJsonTest : public ::testing::Test {
 protected:
  std::filesystem::path write(const nlohmann::json& j) { return write_text(j.dump()); }
  std::filesystem::path write_text(const std::string& text) {
    const auto path = dir_.path() / "tokenizer.json";
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }
  /// The one-line message load_tokenizer_json gives for `text`.
  std::string refusal(const std::string& text) {
    const auto path = write_text(text);
    try {
      load_tokenizer_json(path);
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    ADD_FAILURE() << "loaded without a refusal";
    return {};
  }
  test::TempDir dir_{"tokenizer-json"};
};

TEST_F(TokenizerJsonTest, EncodesMergesAddedTokensAndTheTemplate) {
  const auto tokenizer = load_tokenizer_json(write(tiny_byte_level()));
  EXPECT_EQ(tokenizer->encode("hi hi"), (std::vector<std::uint32_t>{4, 5}));
  EXPECT_EQ(tokenizer->encode("hi<s>hih"), (std::vector<std::uint32_t>{4, 0, 4, 1}));
  EXPECT_EQ(tokenizer->bos_id(), std::optional<std::uint32_t>(0));
  EXPECT_FALSE(tokenizer->eos_id().has_value());
  EXPECT_EQ(tokenizer->vocab_size(), 6);
  EXPECT_EQ(tokenizer->decode({0, 4, 5, 1}), "hi hih");  // the special <s> is skipped
  EXPECT_THAT(tokenizer->describe(), HasSubstr("byte-level"));
}

TEST_F(TokenizerJsonTest, OpenTokenizerPrefersTokenizerJson) {
  write(tiny_byte_level());
  std::ofstream(dir_.path() / "tokenizer.model") << "not read";
  const auto tokenizer = open_tokenizer(dir_.path(), 6);
  EXPECT_THAT(tokenizer->describe(), HasSubstr("tokenizer.json"));
  EXPECT_EQ(tokenizer->encode("hi"), (std::vector<std::uint32_t>{4}));
}

TEST_F(TokenizerJsonTest, OpenTokenizerDefersARefusalToTheText) {
  auto j = tiny_byte_level();
  j["model"]["type"] = "WordPiece";
  write(j);
  const auto tokenizer = open_tokenizer(dir_.path(), 6);  // token ids still work
  try {
    tokenizer->encode("hi");
    ADD_FAILURE() << "text was encoded";
  } catch (const InvalidArgument& e) {
    EXPECT_THAT(e.what(), AllOf(HasSubstr("tokenizer.json"), HasSubstr("model type \"WordPiece\""),
                                HasSubstr("token ids")));
  }
}

TEST_F(TokenizerJsonTest, RefusesTruncatedJson) {
  const std::string text = tiny_byte_level().dump();
  EXPECT_THAT(refusal(text.substr(0, text.size() / 2)),
              AllOf(HasSubstr("tokenizer.json"), HasSubstr("not valid JSON"), Not(HasSubstr("\n"))));
}

TEST_F(TokenizerJsonTest, RefusesUnknownModelType) {
  auto j = tiny_byte_level();
  j["model"]["type"] = "Unigram";
  EXPECT_THAT(refusal(j.dump()), AllOf(HasSubstr("tokenizer.json"), HasSubstr("model type \"Unigram\"")));
}

TEST_F(TokenizerJsonTest, RefusesMergesOfMissingTokens) {
  auto j = tiny_byte_level();
  j["model"]["merges"].push_back({"h", "x"});
  EXPECT_THAT(refusal(j.dump()),
              AllOf(HasSubstr("tokenizer.json"), HasSubstr("merge \"h x\""), HasSubstr("vocab")));
  j = tiny_byte_level();
  j["model"]["merges"].push_back({"i", "h"});  // both known, "ih" is not
  EXPECT_THAT(refusal(j.dump()), AllOf(HasSubstr("\"ih\""), HasSubstr("vocab lacks")));
}

TEST_F(TokenizerJsonTest, RefusesInvalidRegex) {
  auto j = tiny_byte_level();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(\\p{L}+";
  EXPECT_THAT(refusal(j.dump()),
              AllOf(HasSubstr("tokenizer.json"), HasSubstr("regex (\\p{L}+"), HasSubstr("compile")));
}

TEST_F(TokenizerJsonTest, RefusesUnknownComponents) {
  auto j = tiny_byte_level();
  j["normalizer"] = {{"type", "BertNormalizer"}};
  EXPECT_THAT(refusal(j.dump()), HasSubstr("normalizer type \"BertNormalizer\""));
  j = tiny_byte_level();
  j["pre_tokenizer"] = {{"type", "UnicodeScripts"}};
  EXPECT_THAT(refusal(j.dump()), HasSubstr("pre_tokenizer type \"UnicodeScripts\""));
  j = tiny_byte_level();
  j["decoder"] = {{"type", "CTC"}};
  EXPECT_THAT(refusal(j.dump()), HasSubstr("decoder type \"CTC\""));
  j = tiny_byte_level();
  j["post_processor"] = {{"type", "Mystery"}};
  EXPECT_THAT(refusal(j.dump()), HasSubstr("post_processor type \"Mystery\""));
  j = tiny_byte_level();
  j["model"]["vocab"]["huge"] = 4000000000u;
  EXPECT_THAT(refusal(j.dump()), HasSubstr("vocab id 4000000000"));
  j = tiny_byte_level();
  j["model"]["vocab"] = "not an object";
  EXPECT_THAT(refusal(j.dump()), AllOf(HasSubstr("tokenizer.json"), HasSubstr("malformed")));
}

}  // namespace
}  // namespace lema::trainer
