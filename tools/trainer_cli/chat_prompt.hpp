// `lema generate --chat`: the prompt through the model's chat template, rendered by the Python
// reference (Note [Chat prompts through Python]).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace lema::tools {

struct ChatPrompt {
  std::vector<std::int64_t> ids;    // apply_chat_template(..., add_generation_prompt=True)'s
  std::string text;                 // the rendering
  std::optional<std::int64_t> eos;  // the tokenizer's end-of-sequence id, if it has one
};

/// Runs `<python> -m lema.data render-chat --model DIR --prompt TEXT`. Throws InvalidArgument
/// in one line naming the python and what to install when it cannot run or refuses.
ChatPrompt render_chat_prompt(const std::filesystem::path& model_dir, const std::string& prompt);

}  // namespace lema::tools
