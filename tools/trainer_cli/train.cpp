// `lema train`: fine-tunes a LoRA adapter on a Hugging Face Llama-family checkpoint under a
// memory budget, with each step's loss, speed, paging and memory in front of the user.
//
// Everything a user can get wrong is checked before the first step: the settings, the model
// (architecture, config against tensor shapes), the data (format, length, ids against the
// vocabulary), the output directory, and on --resume the checkpoint against this run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/trainer/distributed.hpp"
#include "lema/trainer/llama_model.hpp"
#include "lema/trainer/token_batches.hpp"
#include "lema/trainer/token_source.hpp"
#include "lema/trainer/tokenizer.hpp"
#include "lema/trainer/train_state.hpp"
#include "lema/trainer/trainer.hpp"
#include "lema/torch/allocator.hpp"
#include "launch.hpp"
#include "model_session.hpp"
#include "progress_line.hpp"

namespace lema::tools {
namespace {

namespace fs = std::filesystem;

struct TrainArgs {
  std::string model;
  std::string data;
  std::string data_format = "auto";
  std::string eval_data;
  std::int64_t eval_every = 0;
  bool pack = false;
  std::string out = "lema-out";
  bool resume = false;
  std::string log_json;
  std::string dtype = "f32";
  bool no_activation_checkpointing = false;
  bool no_expert_demote = false;
  int threads = 0;
  trainer::TrainOptions train;
  trainer::LoraSettings lora;
  bool targets_given = false;  // --target-modules on the command line
  PagingArgs paging;
  int nproc = 1;
  double dist_timeout_s = 60;
  double bucket_mb = 25;
  std::string dist_backend = "auto";
};

// The settings every rank must share, compared across the ranks before the first collective
// (ProcessGroup::check_same). Paths are left out: each machine may keep the model elsewhere.
std::vector<std::pair<std::string, std::string>> shared_settings(
    const TrainArgs& args, const std::string& fingerprint, std::uint64_t model_bytes,
    const trainer::TokenBatches& data) {
  const trainer::TrainOptions& t = args.train;
  std::string targets;
  for (const auto& m : args.lora.target_modules) targets += (targets.empty() ? "" : ",") + m;
  return {
      {"the model (fingerprint of config.json and tensor shapes)", fingerprint},
      {"the model's size in bytes", std::to_string(model_bytes)},
      {"--lora-rank", std::to_string(args.lora.rank)},
      {"--lora-alpha", fmt::format("{}", args.lora.alpha)},
      {"--lora-dropout", fmt::format("{}", args.lora.dropout)},
      {"--target-modules", targets},
      {"--seed", std::to_string(t.seed)},
      {"--seq-len", std::to_string(t.seq_len)},
      {"--batch", std::to_string(t.batch)},
      {"--grad-accum", std::to_string(t.grad_accum)},
      {"--steps", std::to_string(t.steps)},
      {"--lr", fmt::format("{}", t.lr)},
      {"--dtype", args.dtype},
      {"--data (sequences, fingerprint)",
       fmt::format("{} {:016x}", data.num_sequences(), data.fingerprint())},
      {"--resume", args.resume ? "on" : "off"},
  };
}

std::uint64_t peak_rss_bytes() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<std::uint64_t>(u.ru_maxrss) * 1024;
}

// 1 GiB of uint32 ids: far beyond what trying or measuring the trainer needs, and well within
// the memory of the machines it runs on.
constexpr std::uint64_t kMaxSyntheticTokens = std::uint64_t{1} << 28;

// Note [Thread bound]
// --threads sizes torch's intra-op pool. Threads beyond the CPUs this process may run on only
// contend for them, and each costs a stack; tens of thousands exhaust the process limits, and
// torch then crashes at exit. Four per CPU leaves room for experiments with oversubscription
// while refusing what can only be a typo. The bound follows the machine (its affinity mask, as
// in a container), not a constant that would be too small on big hosts and too large on small.
void check_threads(int threads) {
  if (threads < 0) {
    throw InvalidArgument(
        fmt::format("--threads {} is negative; give a count of threads (0: torch's default)",
                    threads));
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  const long cpus = ::sched_getaffinity(0, sizeof(set), &set) == 0
                        ? CPU_COUNT(&set)
                        : std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
  if (threads > 4 * cpus) {
    throw InvalidArgument(fmt::format(
        "--threads {} is more than 4 per CPU this process may use ({} CPUs); give at most {} "
        "(0: torch's default)",
        threads, cpus, 4 * cpus));
  }
}

void check_lora(const trainer::LoraSettings& lora) {
  if (lora.rank < 1) {
    throw InvalidArgument(fmt::format("--lora-rank {} is out of range: it must be at least 1",
                                      lora.rank));
  }
  if (!(std::isfinite(lora.alpha) && lora.alpha > 0)) {
    throw InvalidArgument(fmt::format(
        "--lora-alpha {} is out of range: it must be positive and finite (scaling alpha / r)",
        lora.alpha));
  }
  if (!(lora.dropout >= 0 && lora.dropout < 1)) {
    throw InvalidArgument(
        fmt::format("--lora-dropout {} is out of range: it must be in [0, 1)", lora.dropout));
  }
}

// One micro-batch's logits alone take batch × seq-len × vocab elements of at least 2 bytes; a
// micro-batch whose logits exceed the machine's memory can only end in an allocator's error
// after the model and the data have loaded.
void check_micro_batch(const trainer::TrainOptions& o, std::int64_t vocab) {
  const double logits = static_cast<double>(o.batch) * static_cast<double>(o.seq_len) *
                        static_cast<double>(vocab) * 2.0;
  const double memory =
      static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (memory > 0 && logits > memory) {
    throw InvalidArgument(fmt::format(
        "--batch {} × --seq-len {} tokens need at least {} for one micro-batch's logits "
        "(vocabulary {}), more than this machine's {} of memory; lower --batch or --seq-len "
        "(and raise --grad-accum)",
        o.batch, o.seq_len, format_size(static_cast<std::uint64_t>(std::min(logits, 1.8e19))),
        vocab, format_size(static_cast<std::uint64_t>(memory))));
  }
}

c10::ScalarType parse_compute_dtype(const std::string& name) {
  if (name == "f32") return at::kFloat;
  if (name == "bf16") return at::kBFloat16;
  if (name == "f16") return at::kHalf;
  throw InvalidArgument("--dtype must be f32, bf16 or f16 (got '" + name + "')");
}

/// Without --data: a fixed pseudo-random token stream from the seed, long enough that the run
/// never repeats a sequence; for trying the trainer and measuring it, not for learning.
/// With several ranks every rank makes the stream of the global batch (ranks × batch), so that
/// N ranks × batch B train on what one process with batch N·B does.
trainer::TokenBatches synthetic_data(const trainer::TrainOptions& o, std::int64_t vocab,
                                     int world_size) {
  // validate() has made sure the product does not overflow; past the token limit it is refused
  // below anyway, so capping it there keeps the multiplication by world_size (≤ 2^16) in range.
  const std::uint64_t sequences =
      std::min<std::uint64_t>(static_cast<std::uint64_t>(o.steps * o.grad_accum * o.batch),
                              kMaxSyntheticTokens) *
          static_cast<std::uint64_t>(world_size) +
      1;
  std::uint64_t total = 0;
  if (__builtin_mul_overflow(sequences, static_cast<std::uint64_t>(o.seq_len), &total) ||
      total > kMaxSyntheticTokens) {
    throw InvalidArgument(fmt::format(
        "--steps {} × --grad-accum {} × --batch {} × --seq-len {} is more synthetic tokens than "
        "the {} this command generates; give --data, or fewer steps",
        o.steps, o.grad_accum, o.batch, o.seq_len, kMaxSyntheticTokens));
  }
  std::vector<std::uint32_t> tokens(total);
  std::mt19937_64 rng(o.seed ^ 0x5eed'da7aULL);
  for (auto& t : tokens) t = static_cast<std::uint32_t>(rng() % static_cast<std::uint64_t>(vocab));
  return trainer::TokenBatches(std::move(tokens), "synthetic tokens", o.seq_len, o.batch, o.seed);
}

void run(TrainArgs args) {
  if (args.nproc < 1) {
    throw InvalidArgument(fmt::format("--nproc {} is out of range: it must be at least 1",
                                      args.nproc));
  }
  if (!(args.dist_timeout_s > 0 && args.dist_timeout_s <= 86400)) {
    throw InvalidArgument(fmt::format(
        "--dist-timeout {} is out of range: give seconds in (0, 86400]", args.dist_timeout_s));
  }
  if (!(args.bucket_mb > 0 && args.bucket_mb <= 4096)) {
    throw InvalidArgument(
        fmt::format("--bucket-mb {} is out of range: give MiB in (0, 4096]", args.bucket_mb));
  }
  const auto dist_timeout = std::chrono::milliseconds(
      static_cast<std::int64_t>(args.dist_timeout_s * 1000.0));
  const std::optional<trainer::DistributedEnv> dist = trainer::distributed_env_from_environment();
  // Note [Backend choice]. Naming a backend trains through a process group even of one rank
  // (--nproc 1, or torchrun with one), which runs the collectives' path on a single GPU.
  const trainer::DistBackend backend = trainer::choose_dist_backend(
      args.dist_backend, args.paging.device, trainer::nccl_in_build());
  const bool backend_named = args.dist_backend != "auto";
  if (!dist && (args.nproc > 1 || backend_named)) {
    // Checked once here, not N times by the ranks: no GPU, or fewer than the ranks need.
    if (backend == trainer::DistBackend::kNccl) {
      trainer::check_nccl_devices(args.paging.device, args.nproc);
    }
    std::fflush(stderr);
    std::exit(launch_local_ranks(args.nproc, dist_timeout));
  }
  // Each rank saves its own profile: LEMA_PROFILE=p.lprof becomes p.rank<R>.lprof (the
  // runtime reads it when the first pager opens, below).
  if (dist && dist->world_size > 1) {
    if (const char* profile = std::getenv("LEMA_PROFILE"); profile != nullptr && *profile != 0) {
      const fs::path path(profile);
      const std::string ranked =
          (path.parent_path() / (path.stem().string() + ".rank" + std::to_string(dist->rank) +
                                 path.extension().string()))
              .string();
      ::setenv("LEMA_PROFILE", ranked.c_str(), 1);
    }
  }
  const std::string device_given = args.paging.device;
  // Note [Slow fillers] in the runtime: a rank waits for another's read of a shared page at most
  // half of --dist-timeout (unless LEMA_SHARED_CACHE_WAIT says), so a stuck reader costs the
  // others a read of their own, not a collective's timeout.
  if (dist && dist->world_size > 1 && std::getenv("LEMA_SHARED_CACHE_WAIT") == nullptr) {
    const std::string wait = fmt::format("{}", std::min(30.0, args.dist_timeout_s / 2));
    ::setenv("LEMA_SHARED_CACHE_WAIT", wait.c_str(), 1);
  }
  // Each local rank takes a GPU of its own: --device cuda means cuda:LOCAL_RANK.
  if (dist && dist->local_world_size > 1 && args.paging.device == "cuda") {
    args.paging.device = fmt::format("cuda:{}", dist->local_rank);
  }
  std::unique_ptr<trainer::ProcessGroup> group;
  if (dist && (dist->world_size > 1 || backend_named)) {
    c10::Device group_device(c10::kCPU);
    if (backend == trainer::DistBackend::kNccl) {
      trainer::check_nccl_devices(device_given, dist->local_world_size);
      group_device = c10::Device(args.paging.device);
      if (!group_device.has_index()) {
        group_device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(dist->local_rank));
      }
    }
    group = trainer::ProcessGroup::join(*dist, dist_timeout, backend, group_device);
  }
  const bool rank0 = !group || group->rank() == 0;
  args.train.out_dir = args.out;
  if (args.train.schedule_steps == 0) args.train.schedule_steps = args.train.steps;
  trainer::validate(args.train);
  const c10::ScalarType compute = parse_compute_dtype(args.dtype);
  check_threads(args.threads);
  check_lora(args.lora);
  if (args.threads > 0) at::set_num_threads(args.threads);

  ModelSession session = ModelSession::open(args.model, args.paging);
  // --budget-covers all: every CPU tensor from here on (the model's LoRA weights, activations,
  // gradients, optimizer state) shares the weights' budget (Note [One budget]).
  std::optional<torch::AllocatorScope> covers_all;
  if (session.budget_covers_all()) covers_all.emplace(torch::use_allocator(session.weights()));
  const trainer::ModelConfig& config = session.config();
  // By default every projection the model has, under the names peft gives them.
  if (!args.targets_given) args.lora.target_modules = trainer::lora_target_candidates(config);
  args.lora.fan_in_fan_out = config.family == trainer::ModelFamily::kGpt2;
  if (args.lora.rank > config.hidden_size) {
    throw InvalidArgument(fmt::format(
        "--lora-rank {} is larger than the model's hidden size {}, past which a low-rank "
        "adapter is no longer low-rank; lower it",
        args.lora.rank, config.hidden_size));
  }
  if (config.family == trainer::ModelFamily::kGpt2 &&
      args.train.seq_len > config.max_position_embeddings) {
    throw InvalidArgument(fmt::format(
        "--seq-len {} is longer than the {} learned positions of {} (n_positions); give at most "
        "{}",
        args.train.seq_len, config.max_position_embeddings, config.source.string(),
        config.max_position_embeddings));
  }
  check_micro_batch(args.train, config.vocab_size);
  // Before the data loads (which may take a while): a second run on the same --out is refused
  // at once, and nothing touches --out before every setting has been checked.
  // Only rank 0 writes into --out (the other ranks read checkpoints from it on --resume).
  std::optional<trainer::OutputDirLock> lock;
  if (rank0) {
    lock = trainer::OutputDirLock::acquire(args.train.out_dir);
    for (const auto& path : lock->removed()) {
      std::fprintf(stderr, "removed %s, left by an interrupted save\n", path.c_str());
    }
  }

  std::unique_ptr<trainer::Tokenizer> tokenizer;
  std::optional<trainer::TokenBatches> data;
  if (args.data.empty()) {
    data.emplace(synthetic_data(args.train, config.vocab_size, group ? group->world_size() : 1));
  } else {
    trainer::TokenSourceOptions source;
    source.vocab_size = config.vocab_size;
    source.format = trainer::parse_token_file_format(args.data_format);
    tokenizer = trainer::open_tokenizer(session.dir(), config.vocab_size,
                                       config.model_type == "llama" || config.model_type == "mistral");
    source.tokenizer = tokenizer.get();
    data.emplace(trainer::load_tokens(args.data, source), args.train.seq_len, args.train.batch,
                 args.train.seed, args.pack);
  }
  if (args.pack && !data->has_labels()) {
    throw InvalidArgument(fmt::format(
        "--pack packs prepared examples (python -m lema.data); {} is a token stream, which is "
        "always cut into full rows; leave out --pack",
        args.data.empty() ? "the synthetic data" : args.data));
  }

  trainer::LlamaModelOptions model_options;
  model_options.lora = args.lora;
  model_options.seed = args.train.seed;
  model_options.compute_dtype = compute;
  model_options.activation_checkpointing = !args.no_activation_checkpointing;
  if (config.is_moe()) {
    model_options.expert_prefetch = [&weights = session.weights()](const std::vector<std::string>& names) {
      weights.prefetch(names);
    };
    if (!args.no_expert_demote) {
      model_options.expert_demote = [&weights = session.weights()](
                                        const std::vector<std::string>& names) {
        weights.demote(names);
      };
    }
  }
  trainer::LlamaModel model(config, session.lookup(), model_options);

  std::optional<trainer::TokenBatches> eval;
  if (!args.eval_data.empty()) {
    trainer::TokenSourceOptions source;
    source.vocab_size = config.vocab_size;
    source.format = trainer::parse_token_file_format(args.data_format);
    if (!tokenizer) {
      tokenizer = trainer::open_tokenizer(session.dir(), config.vocab_size,
                                          config.model_type == "llama" ||
                                              config.model_type == "mistral");
    }
    source.tokenizer = tokenizer.get();
    eval.emplace(trainer::load_tokens(args.eval_data, source), args.train.seq_len, 1,
                 args.train.seed, args.pack);
  } else if (args.eval_every != 0) {
    throw InvalidArgument("--eval-every needs --eval-data FILE (the validation data)");
  }

  trainer::RunIdentity identity{trainer::model_fingerprint(session.dir()),
                                fs::absolute(session.dir()).lexically_normal().string(),
                                args.lora};
  if (group) {
    group->check_same(
        shared_settings(args, identity.model_fingerprint, session.model_bytes(), *data));
  }
  trainer::Trainer trainer(model, std::move(*data), args.train, identity, std::move(lock),
                           group.get(),
                           static_cast<std::int64_t>(args.bucket_mb * 1024.0 * 1024.0));
  if (eval) trainer.set_eval_data(std::move(*eval), args.eval_every);
  std::optional<fs::path> resumed;
  if (args.resume) resumed = trainer.resume();
  if (group) {
    group->check_same({{"the checkpoint resumed from (its step)",
                        resumed ? std::to_string(trainer.step_count()) : "none"}});
  }

  std::ofstream log;
  if (!args.log_json.empty() && rank0) {
    log.open(args.log_json, resumed ? std::ios::app : std::ios::trunc);
    if (!log) {
      throw InvalidArgument(fmt::format("--log-json {}: cannot open it for writing ({})",
                                        args.log_json, std::strerror(errno)));
    }
  }

  if (group && rank0) {
    std::fprintf(stderr, "%d rank%s (%s on %s, rendezvous at %s:%d): global batch %ld\n",
                 group->world_size(), group->world_size() == 1 ? "" : "s",
                 trainer::dist_backend_name(group->backend()), group->device().str().c_str(),
                 group->env().master_addr.c_str(), group->env().master_port,
                 static_cast<long>(trainer.global_batch()));
  }
  if (rank0) std::fprintf(stderr,
               "model %s: %s, %ld layers, hidden %ld, vocab %ld; %s\n"
               "data: %s, %llu %ssequences of %ld tokens; LoRA rank %ld alpha %g on %zu modules, "
               "%s compute\n",
               args.model.c_str(), config.model_type.c_str(),
               static_cast<long>(config.num_hidden_layers), static_cast<long>(config.hidden_size),
               static_cast<long>(config.vocab_size), session.describe().c_str(),
               trainer.data().source().c_str(),
               static_cast<unsigned long long>(trainer.data().num_sequences()),
               trainer.data().packed() ? "packed " : "", static_cast<long>(args.train.seq_len),
               static_cast<long>(args.lora.rank), args.lora.alpha, args.lora.target_modules.size(),
               args.dtype.c_str());
  if (resumed && rank0) {
    std::fprintf(stderr, "resumed from %s at step %ld\n", resumed->c_str(),
                 static_cast<long>(trainer.step_count()));
  }

  ProgressLine progress(args.train.steps, rank0 && ::isatty(STDERR_FILENO) != 0);
  const auto start = std::chrono::steady_clock::now();
  std::int64_t tokens = 0;
  double first_loss = 0, last_loss = 0;
  const std::int64_t first_step = trainer.step_count() + 1;
  runtime::PagerStats before = session.weights().stats();
  trainer.run([&](const trainer::StepResult& r) {
    const runtime::PagerStats s = session.weights().stats();
    tokens += r.tokens;
    if (r.step == first_step) first_loss = r.loss;
    last_loss = r.loss;
    if (rank0) progress.update(r, s);
    if (r.eval_loss && rank0) {
      progress.finish();
      std::fprintf(stderr, "step %ld: eval loss %.4f\n", static_cast<long>(r.step), *r.eval_loss);
    }
    if (log.is_open()) {
      nlohmann::json j;
      j["step"] = r.step;
      j["loss"] = r.loss;
      j["tokens"] = r.tokens;
      j["step_time_s"] = r.step_time_s;
      j["tokens_per_s"] = r.step_time_s > 0 ? static_cast<double>(r.tokens) / r.step_time_s : 0;
      j["lr"] = r.lr;
      j["grad_norm"] = r.grad_norm;
      if (group) {
        j["world_size"] = group->world_size();
        j["dist_backend"] = trainer::dist_backend_name(group->backend());
      }
      if (r.eval_loss) j["eval_loss"] = *r.eval_loss;
      j["faults"] = s.faults;
      j["hits"] = s.hits;
      j["step_faults"] = s.faults - before.faults;
      j["step_prefetches"] = s.prefetches_issued - before.prefetches_issued;
      j["page_size"] = s.page_size;
      if (!s.uvm_counters.empty()) {  // unified memory: what the driver did (CUPTI)
        j["uvm_counters"] = s.uvm_counters;
        j["step_gpu_faults"] = s.gpu_faults - before.gpu_faults;
        j["step_migrated_to_device_bytes"] =
            s.migrated_to_device_bytes - before.migrated_to_device_bytes;
        j["step_migrated_to_host_bytes"] = s.migrated_to_host_bytes - before.migrated_to_host_bytes;
      }
      j["bytes_read"] = s.bytes_read;
      j["step_bytes_read"] = s.bytes_read - before.bytes_read;
      j["stall_s"] = static_cast<double>(s.stall_ns - before.stall_ns) * 1e-9;
      j["resident_bytes"] = s.resident_bytes;
      j["peak_resident_bytes"] = s.peak_resident_bytes;
      j["spilled_bytes"] = s.spilled_bytes;
      j["budget_bytes"] = s.budget_bytes;
      j["peak_rss_bytes"] = peak_rss_bytes();
      log << j.dump() << '\n' << std::flush;
    }
    before = s;
  });
  progress.finish();
  if (!rank0) return;  // rank 0 speaks for the group

  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const runtime::PagerStats s = session.weights().stats();
  std::fprintf(stderr,
               "done: steps %ld-%ld in %.1f s, %.0f tokens/s; loss %.4f -> %.4f\n"
               "paging: %llu faults, %llu hits, %s read, stall %.1f s (%.0f%% of the time), "
               "prefetches %llu used / %llu wasted, peak resident %s of a %s budget (model %s)\n"
               "memory: peak RSS %s\n"
               "adapter: %s (adapter_model.safetensors, adapter_config.json)\n",
               static_cast<long>(first_step), static_cast<long>(trainer.step_count()), seconds,
               seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0, first_loss, last_loss,
               static_cast<unsigned long long>(s.faults), static_cast<unsigned long long>(s.hits),
               format_size(s.bytes_read).c_str(), static_cast<double>(s.stall_ns) * 1e-9,
               seconds > 0 ? 100.0 * static_cast<double>(s.stall_ns) * 1e-9 / seconds : 0.0,
               static_cast<unsigned long long>(s.prefetches_used),
               static_cast<unsigned long long>(s.prefetches_wasted),
               format_size(s.peak_resident_bytes).c_str(), format_size(s.budget_bytes).c_str(),
               format_size(session.model_bytes()).c_str(), format_size(peak_rss_bytes()).c_str(),
               args.out.c_str());
}

}  // namespace

void register_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  args->train.steps = 100;
  args->train.seq_len = 256;
  args->train.batch = 1;
  CLI::App* cmd = app.add_subcommand(
      "train", "Fine-tune a LoRA adapter on a model larger than the memory budget");
  trainer::TrainOptions& t = args->train;
  cmd->add_option("--model", args->model,
                  "Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3 or GPT-2)")
      ->required();
  cmd->add_option("--steps", t.steps, "Optimizer steps")->capture_default_str();
  cmd->add_option("--seq-len", t.seq_len, "Tokens per sequence")->capture_default_str();
  cmd->add_option("--batch", t.batch, "Sequences per micro-batch")->capture_default_str();
  cmd->add_option("--grad-accum", t.grad_accum, "Micro-batches per optimizer step")
      ->capture_default_str();
  cmd->add_option("--lr", t.lr, "Peak learning rate")->capture_default_str();
  cmd->add_option("--warmup-steps", t.warmup_steps, "Linear warm-up steps")->capture_default_str();
  cmd->add_option("--schedule-steps", t.schedule_steps,
                  "Step at which the cosine decay ends (default --steps); a run trained in parts "
                  "keeps its schedule when every part gives the same value");
  cmd->add_option("--min-lr-ratio", t.min_lr_ratio, "Cosine decay floor, as a fraction of --lr")
      ->capture_default_str();
  cmd->add_option("--weight-decay", t.weight_decay, "AdamW weight decay")->capture_default_str();
  cmd->add_option("--max-grad-norm", t.max_grad_norm, "Gradient clipping (0: off)")
      ->capture_default_str();
  cmd->add_option("--seed", t.seed, "Seed of the adapters, dropout and data order")
      ->check(CLI::NonNegativeNumber)  // an unsigned option would take -1 as 2^64 - 1
      ->capture_default_str();
  cmd->add_option("--save-every", t.save_every, "Checkpoint every K steps (0: only at the end)")
      ->capture_default_str();
  cmd->add_option("--lora-rank", args->lora.rank, "LoRA rank r")->capture_default_str();
  cmd->add_option("--lora-alpha", args->lora.alpha, "LoRA alpha (scaling alpha / r)")
      ->capture_default_str();
  cmd->add_option("--lora-dropout", args->lora.dropout, "Dropout on the adapters' input")
      ->capture_default_str();
  CLI::Option* targets =
      cmd->add_option("--target-modules", args->lora.target_modules,
                      "Projections to adapt (comma-separated; default: every projection, e.g. "
                      "q_proj,...,down_proj, or GPT-2's c_attn,c_proj,c_fc)")
          ->delimiter(',');
  cmd->add_option("--data", args->data,
                  "Token ids (.bin uint16/uint32, .npy) or text (.jsonl with \"text\", plain); "
                  "without it, synthetic tokens");
  cmd->add_option("--data-format", args->data_format, "auto, bin, npy, jsonl or text")
      ->capture_default_str();
  cmd->add_option("--eval-data", args->eval_data,
                  "Validation data (any --data format); its loss is printed, logged and kept in "
                  "trainer_state.json");
  cmd->add_option("--eval-every", args->eval_every,
                  "Evaluate every K steps (0: only after the last step)")
      ->capture_default_str();
  cmd->add_flag("--pack", args->pack,
                "Prepared examples: pack several into each --seq-len row, attention kept within "
                "each (default: one padded example per row)");
  cmd->add_option("--out", args->out, "Checkpoints and the final adapter")->capture_default_str();
  cmd->add_flag("--resume", args->resume, "Continue from the newest checkpoint in --out");
  cmd->add_option("--log-json", args->log_json, "Write one JSON object per step to this file");
  cmd->add_option("--dtype", args->dtype, "Compute dtype: f32, bf16 or f16")
      ->capture_default_str();
  cmd->add_flag("--no-activation-checkpointing", args->no_activation_checkpointing,
                "Keep every layer's activations instead of recomputing them in backward");
  cmd->add_flag("--no-expert-demote", args->no_expert_demote,
                "Mixtral, Qwen2-MoE: leave out the hint that evicts the experts a router did not "
                "choose first (to measure what it saves)");
  cmd->add_option("--threads", args->threads, "Intra-op threads (0: torch's default)");
  cmd->add_option("--nproc", args->nproc,
                  "Start this many local ranks (data parallel, as torchrun --standalone); under "
                  "torchrun the ranks come from its environment instead")
      ->capture_default_str();
  cmd->add_option("--dist-timeout", args->dist_timeout_s,
                  "Seconds a collective or the ranks' meeting may take before the run stops "
                  "with an error naming the rank lost")
      ->capture_default_str();
  cmd->add_option("--dist-backend", args->dist_backend,
                  "Collectives between the ranks: auto (nccl on --device cuda, gloo on the CPU), "
                  "gloo, or nccl; naming one trains through a process group even with --nproc 1")
      ->capture_default_str();
  cmd->add_option("--bucket-mb", args->bucket_mb,
                  "MiB of gradients per all-reduce (several ranks)")
      ->capture_default_str();
  add_paging_options(*cmd, args->paging);
  cmd->add_option("--budget-covers", args->paging.budget_covers,
                  "weights: the budget pages the model's weights; all: also every other CPU "
                  "tensor of the run (activations, LoRA, optimizer state); needs --mode fault")
      ->check(CLI::IsMember({"weights", "all"}))
      ->capture_default_str();
  add_device_options(*cmd, args->paging);
  cmd->callback([args, targets] {
    args->targets_given = targets->count() > 0;
    run(*args);
  });
}

}  // namespace lema::tools
