// Encodes texts with a tokenizer.json through the trainer's reader and prints, as JSON, the ids,
// the decoded text and BOS/EOS, for tests/python/test_tokenizer_json.py to compare with the
// tokenizers package; with IDS_JSON (lists of ids) also the text of each list.
// Usage: trainer_tokenize_dump TOKENIZER_JSON TEXTS_JSON [IDS_JSON]
#include <nlohmann/json.hpp>

#include <fstream>
#include <iostream>

#include "lema/trainer/tokenizer.hpp"

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::cerr << "usage: trainer_tokenize_dump TOKENIZER_JSON TEXTS_JSON [IDS_JSON]\n";
    return 2;
  }
  try {
    const auto tokenizer = lema::trainer::load_tokenizer_json(argv[1]);
    std::ifstream in(argv[2]);
    const auto texts = nlohmann::json::parse(in);
    nlohmann::json out;
    out["ids"] = nlohmann::json::array();
    out["decoded"] = nlohmann::json::array();
    for (const auto& t : texts) {
      const auto ids = tokenizer->encode(t.get<std::string>());
      out["ids"].push_back(ids);
      out["decoded"].push_back(tokenizer->decode(ids));
    }
    out["decoded_ids"] = nlohmann::json::array();
    if (argc == 4) {
      std::ifstream ids_in(argv[3]);
      for (const auto& ids : nlohmann::json::parse(ids_in)) {
        out["decoded_ids"].push_back(tokenizer->decode(ids.get<std::vector<std::uint32_t>>()));
      }
    }
    out["bos"] = tokenizer->bos_id() ? nlohmann::json(*tokenizer->bos_id()) : nlohmann::json();
    out["eos"] = tokenizer->eos_id() ? nlohmann::json(*tokenizer->eos_id()) : nlohmann::json();
    out["vocab_size"] = tokenizer->vocab_size();
    out["describe"] = tokenizer->describe();
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
