#include "prepared_examples.hpp"

#include <nlohmann/json.hpp>

#include <string_view>

#include "detail/jsonl_lines.hpp"
#include "lema/base/error.hpp"

namespace lema::trainer::detail {
namespace {

using nlohmann::json;


}  // namespace

bool looks_prepared(const std::string& bytes) {
  bool prepared = false;
  for_each_jsonl_line(bytes, [&](std::string_view line, std::size_t) {
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    prepared = j.is_object() && j.contains("input_ids");
    return false;
  });
  return prepared;
}

TokenStream read_prepared(const std::filesystem::path& path, const std::string& bytes,
                          const TokenSourceOptions& options) {
  TokenStream stream{path, {}, {}, ""};
  std::uint64_t tokens = 0, learned = 0;
  for_each_jsonl_line(bytes, [&](std::string_view line, std::size_t line_no) {
    const std::string where = path.string() + ":" + std::to_string(line_no);
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) {
      throw InvalidArgument(where + ": not a JSON object; a prepared example is {\"input_ids\": "
                                    "[...], \"labels\": [...]}");
    }
    const auto ids = j.find("input_ids");
    const auto labels = j.find("labels");
    if (ids == j.end() || !ids->is_array() || labels == j.end() || !labels->is_array()) {
      throw InvalidArgument(where + ": a prepared example needs the lists \"input_ids\" and "
                                    "\"labels\" (-100 where no loss is taken)");
    }
    if (ids->size() != labels->size() || ids->size() < 2) {
      throw InvalidArgument(where + ": " + std::to_string(ids->size()) + " input_ids but " +
                            std::to_string(labels->size()) +
                            " labels; an example needs one label per id and at least 2 ids");
    }
    PreparedExample e;
    e.line = line_no;
    bool any = false;
    for (std::size_t i = 0; i < ids->size(); ++i) {
      const json& id = (*ids)[i];
      const json& label = (*labels)[i];
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0 ||
          id.get<std::int64_t>() >= options.vocab_size) {
        throw InvalidArgument(where + ": input_ids[" + std::to_string(i) + "] = " + id.dump() +
                              " is not an id of the model's vocabulary of " +
                              std::to_string(options.vocab_size) +
                              "; prepare the data with this model's tokenizer");
      }
      const auto value = id.get<std::int64_t>();
      if (!label.is_number_integer() ||
          (label.get<std::int64_t>() != kIgnoreLabel && label.get<std::int64_t>() != value)) {
        throw InvalidArgument(where + ": labels[" + std::to_string(i) + "] = " + label.dump() +
                              " is neither -100 nor the id there (" + std::to_string(value) +
                              "); labels mark which ids are learned");
      }
      e.ids.push_back(static_cast<std::uint32_t>(value));
      e.labels.push_back(static_cast<std::int32_t>(label.get<std::int64_t>()));
      // Position 0 is never predicted: only later labels count.
      if (i > 0 && e.labels.back() != kIgnoreLabel) any = true, ++learned;
    }
    if (!any) {
      throw InvalidArgument(where + ": no label after the first position is learned (all "
                                    "-100); an example with nothing to learn is refused");
    }
    tokens += e.ids.size();
    stream.examples.push_back(std::move(e));
    return true;
  });
  if (stream.examples.empty()) {
    throw InvalidArgument(path.string() + ": no prepared examples; the file holds only blank "
                                          "lines");
  }
  stream.description = "prepared jsonl (" + std::to_string(stream.examples.size()) +
                       " examples, " + std::to_string(tokens) + " tokens, " +
                       std::to_string(learned) + " learned)";
  return stream;
}

}  // namespace lema::trainer::detail
