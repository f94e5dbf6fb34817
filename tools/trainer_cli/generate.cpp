// `lema generate`: samples a continuation of a prompt through the same paged weights the trainer
// uses, with or without an adapter, so a user can see what the adapter learned.
//
// The prompt runs once; each new token then runs alone through the layers against the keys and
// values kept from earlier positions (KvCache), so a reply of n tokens costs n one-token passes
// rather than n passes over the whole growing sequence. --no-cache runs the whole sequence for
// every token instead (for measuring the difference, and as a cross-check: both give the same
// tokens).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "chat_prompt.hpp"
#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/trainer/adapter.hpp"
#include "lema/trainer/kv_cache.hpp"
#include "lema/trainer/llama_model.hpp"
#include "lema/trainer/tokenizer.hpp"
#include "model_session.hpp"
#include "stop_ids.hpp"

namespace lema::tools {
namespace {

struct GenerateArgs {
  std::string model;
  std::string adapter;
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_ids;
  bool chat = false;
  std::int64_t max_new_tokens = 32;
  bool greedy = false;
  double top_p = 0.9;
  double temperature = 1.0;
  std::uint64_t seed = 0;
  bool ignore_eos = false;
  std::vector<std::int64_t> stop_ids;  // given: these instead of the model's (Note [Stop ids])
  bool json = false;
  bool no_cache = false;
  PagingArgs paging;
};

std::vector<std::int64_t> parse_ids(const std::string& text, std::int64_t vocab) {
  std::vector<std::int64_t> ids;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item(text.data() + start, comma - start);
    std::int64_t id = -1;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), id);
    if (ec != std::errc() || end != item.data() + item.size() || id < 0) {
      throw InvalidArgument(fmt::format(
          "--prompt-ids: '{}' (item {}) is not a token id; give comma-separated non-negative "
          "integers like 1,2,3",
          item, ids.size()));
    }
    if (id >= vocab) {
      throw InvalidArgument(fmt::format(
          "--prompt-ids: id {} (item {}) is outside the model's vocabulary of {} ids", id,
          ids.size(), vocab));
    }
    ids.push_back(id);
    start = comma + 1;
  }
  return ids;
}

/// What `output` adds to the text of `prompt`: the decoding of the whole sequence past the
/// decoding of the prompt, as transformers' TextStreamer prints it. Decoding the reply alone
/// would lose what depends on its neighbours: a SentencePiece-style decoder strips the space of
/// a first word, and a character whose bytes began in the prompt would show as U+FFFD.
std::string continuation_text(const trainer::Tokenizer& tokenizer,
                              const std::vector<std::int64_t>& prompt,
                              const std::vector<std::int64_t>& output) {
  std::vector<std::uint32_t> ids(prompt.begin(), prompt.end());
  const std::string head = tokenizer.decode(ids);
  ids.insert(ids.end(), output.begin(), output.end());
  const std::string whole = tokenizer.decode(ids);
  if (whole.starts_with(head)) return whole.substr(head.size());
  return tokenizer.decode(std::vector<std::uint32_t>(output.begin(), output.end()));
}

/// The next token from the last position's logits ([vocab] float32).
std::int64_t sample(const at::Tensor& logits, const GenerateArgs& args, at::Generator& gen) {
  if (args.greedy) return logits.argmax().item<std::int64_t>();
  const at::Tensor probs = at::softmax(logits / args.temperature, -1);
  const auto [sorted, order] = probs.sort(/*dim=*/-1, /*descending=*/true);
  // Nucleus: keep the smallest prefix whose mass reaches top_p (always at least one token).
  const at::Tensor before = sorted.cumsum(-1) - sorted;
  const at::Tensor kept = sorted.masked_fill(before >= args.top_p, 0.0);
  const at::Tensor pick = at::multinomial(kept, 1, /*replacement=*/false, gen);
  return order.index({pick}).item<std::int64_t>();
}

void run(const GenerateArgs& args) {
  if (args.prompt.has_value() == args.prompt_ids.has_value()) {
    throw InvalidArgument("give exactly one of --prompt TEXT and --prompt-ids 1,2,3");
  }
  if (args.chat && !args.prompt) {
    throw InvalidArgument(
        "--chat takes the user message as --prompt TEXT (ids are already "
        "past the chat template)");
  }
  if (args.max_new_tokens < 1) {
    throw InvalidArgument(
        fmt::format("--max-new-tokens must be at least 1 (got {})", args.max_new_tokens));
  }
  if (!args.greedy && !(args.temperature > 0 && std::isfinite(args.temperature))) {
    throw InvalidArgument(fmt::format(
        "--temperature must be positive and finite (got {}); use --greedy for the most likely "
        "token",
        args.temperature));
  }
  if (!(args.top_p > 0 && args.top_p <= 1)) {
    throw InvalidArgument(fmt::format("--top-p must be in (0, 1] (got {})", args.top_p));
  }
  ModelSession session = ModelSession::open(args.model, args.paging);
  const trainer::ModelConfig& config = session.config();
  const std::unique_ptr<trainer::Tokenizer> tokenizer =
      trainer::open_tokenizer(session.dir(), config.vocab_size,
                                       config.model_type == "llama" || config.model_type == "mistral");

  trainer::LlamaModelOptions options;
  // Without an adapter the model's own projections (B starts at zero: the base model's logits).
  options.lora.target_modules = trainer::lora_target_candidates(config);
  std::optional<trainer::LoadedAdapter> adapter;
  if (!args.adapter.empty()) {
    adapter = trainer::load_adapter(args.adapter);
    options.lora = adapter->lora;
  }
  options.activation_checkpointing = false;
  if (config.is_moe()) {
    options.expert_prefetch = [&weights = session.weights()](const std::vector<std::string>& names) {
      weights.prefetch(names);
    };
    options.expert_demote = [&weights = session.weights()](const std::vector<std::string>& names) {
      weights.demote(names);
    };
  }
  trainer::LlamaModel model(config, session.lookup(), options);
  if (adapter) model.load_adapter_tensors(adapter->tensors);
  model.set_training(false);

  std::vector<std::int64_t> prompt;
  std::optional<ChatPrompt> chat;
  if (args.chat) {
    chat = render_chat_prompt(session.dir(), *args.prompt);
    prompt = chat->ids;
    for (const std::int64_t id : prompt) {
      if (id < 0 || id >= config.vocab_size) {
        throw InvalidArgument(fmt::format(
            "--chat: the chat template gave id {}, outside the model's vocabulary of {} ids; "
            "the tokenizer and the model disagree",
            id, config.vocab_size));
      }
    }
  } else if (args.prompt_ids) {
    prompt = parse_ids(*args.prompt_ids, config.vocab_size);
  } else {
    if (auto bos = tokenizer->bos_id()) prompt.push_back(*bos);
    for (std::uint32_t id : tokenizer->encode(*args.prompt)) prompt.push_back(id);
  }
  if (prompt.empty()) throw InvalidArgument("the prompt is empty; give some text or ids");
  // A sequence past the model's positions is outside what it was trained for (GPT-2 has no
  // table entries beyond them), and an absurd count would run for ever.
  const auto positions = config.max_position_embeddings;
  if (static_cast<std::int64_t>(prompt.size()) >= positions ||
      args.max_new_tokens > positions - static_cast<std::int64_t>(prompt.size())) {
    throw InvalidArgument(fmt::format(
        "--max-new-tokens {} after a prompt of {} tokens runs past the model's {} positions "
        "(max_position_embeddings); give at most {}",
        args.max_new_tokens, prompt.size(), positions,
        std::max<std::int64_t>(0, positions - static_cast<std::int64_t>(prompt.size()))));
  }

  at::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(args.seed);
  std::vector<std::int64_t> sequence = prompt;
  std::vector<std::int64_t> output;
  std::vector<std::int64_t> stops;
  if (!args.stop_ids.empty()) {
    for (const std::int64_t id : args.stop_ids) {
      if (id < 0 || id >= config.vocab_size) {
        throw InvalidArgument(fmt::format(
            "--stop-id {} is outside the model's vocabulary of {} ids", id, config.vocab_size));
      }
    }
    stops = args.stop_ids;
  } else if (!args.ignore_eos) {
    std::vector<std::int64_t> tokenizer_eos;
    if (const auto id = tokenizer->eos_id()) tokenizer_eos.push_back(*id);
    if (chat && chat->eos) tokenizer_eos.push_back(*chat->eos);
    stops = model_stop_ids(session.dir(), config.vocab_size, tokenizer_eos);
  }
  const auto is_stop = [&](std::int64_t id) {
    return !args.ignore_eos && std::find(stops.begin(), stops.end(), id) != stops.end();
  };
  const auto as_ids = [](const std::vector<std::int64_t>& ids) {
    return at::tensor(ids, at::kLong).view({1, static_cast<std::int64_t>(ids.size())});
  };
  const auto start = std::chrono::steady_clock::now();
  trainer::KvCache cache;
  at::Tensor logits =
      model.logits(as_ids(prompt), args.no_cache ? nullptr : &cache).select(0, 0).select(0, -1);
  for (std::int64_t i = 0; i < args.max_new_tokens; ++i) {
    const std::int64_t next = sample(logits, args, gen);
    output.push_back(next);
    sequence.push_back(next);
    if (is_stop(next)) break;
    if (i + 1 == args.max_new_tokens) break;
    logits = (args.no_cache ? model.logits(as_ids(sequence)) : model.logits(as_ids({next}), &cache))
                 .select(0, 0)
                 .select(0, -1);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::vector<std::uint32_t> out_u32(output.begin(), output.end());
  const std::string text = tokenizer->decode(out_u32);
  if (args.json) {
    nlohmann::json j;
    j["prompt_ids"] = prompt;
    j["output_ids"] = output;
    j["text"] = text;  // bytes that are not UTF-8 (a cut multi-byte character) print as U+FFFD
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    // The whole sequence decoded at once, as tokenizer.decode(prompt + output) gives it; a chat
    // shows its rendering (special tokens included) and what the reply adds to it.
    std::vector<std::uint32_t> all(sequence.begin(), sequence.end());
    const std::string shown = chat ? chat->text + continuation_text(*tokenizer, prompt, output)
                                   : tokenizer->decode(all);
    std::fwrite(shown.data(), 1, shown.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);  // the text first, then the paging summary
    const auto s = session.weights().stats();
    std::fprintf(stderr,
                 "%zu new tokens in %.2f s (%.1f tokens/s, %s); weights: %s; faults %llu, read "
                 "%s\n",
                 output.size(), seconds,
                 seconds > 0 ? static_cast<double>(output.size()) / seconds : 0.0,
                 args.no_cache ? "no key/value cache" : "key/value cache",
                 session.describe().c_str(), static_cast<unsigned long long>(s.faults),
                 format_size(s.bytes_read).c_str());
  }
}

}  // namespace

void register_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "generate", "Continue a prompt with a model (and an adapter) under a memory budget");
  cmd->add_option("--model", args->model, "Hugging Face model directory")->required();
  cmd->add_option("--adapter", args->adapter, "LoRA adapter directory (PEFT layout)");
  cmd->add_option("--prompt", args->prompt, "Prompt text (tokenized with the model's tokenizer)");
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt token ids, comma-separated");
  cmd->add_option("--max-new-tokens", args->max_new_tokens, "Tokens to generate")
      ->capture_default_str();
  cmd->add_flag("--greedy", args->greedy, "Always take the most likely token");
  cmd->add_option("--top-p", args->top_p, "Nucleus sampling mass")->capture_default_str();
  cmd->add_option("--temperature", args->temperature, "Sampling temperature")
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Sampling seed")
      ->check(CLI::NonNegativeNumber)  // an unsigned option would take -1 as 2^64 - 1
      ->capture_default_str();
  cmd->add_flag("--chat", args->chat,
                "Give --prompt as a user message through the model's chat template (rendered "
                "by transformers: LEMA_PYTHON, else the python beside lema, else python3)");
  CLI::Option* ignore_eos = cmd->add_flag("--ignore-eos", args->ignore_eos,
                                          "Keep going past the end-of-sequence tokens");
  cmd->add_option("--stop-id", args->stop_ids,
                  "Stop at these ids (comma-separated or repeated) instead of the model's "
                  "end-of-sequence ids (generation_config.json's eos_token_id, else "
                  "config.json's, and the tokenizer's)")
      ->delimiter(',')
      ->excludes(ignore_eos);
  cmd->add_flag("--json", args->json,
                "Print {\"prompt_ids\":[...],\"output_ids\":[...],\"text\":...}");
  cmd->add_flag("--no-cache", args->no_cache,
                "Run the whole sequence again for every token instead of keeping keys and values");
  add_paging_options(*cmd, args->paging);
  cmd->callback([args] { run(*args); });
}

}  // namespace lema::tools
