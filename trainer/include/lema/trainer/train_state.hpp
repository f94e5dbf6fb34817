// Training-state checkpoints: what a run needs to continue exactly where it stopped.
//
//   <out>/checkpoint-<step>/adapter_model.safetensors, adapter_config.json   (save_adapter)
//                           optimizer.safetensors   AdamW exp_avg / exp_avg_sq per parameter
//                                                   ("<PEFT key>.exp_avg"), its step count in
//                                                   the metadata ("step")
//                           trainer_state.json      step, data position, torch's RNG states,
//                                                   and the settings a resume must match
//   <out>/latest             the name of the newest complete checkpoint directory
//
// Note [Checkpoint publication]: a checkpoint is written into a hidden temporary directory
// beside its final name (each file fsync'ed), the directory is fsync'ed and renamed into place,
// the parent fsync'ed, and only then is `latest` replaced (temp file, fsync, rename). A process
// killed at any moment leaves either the previous checkpoint or the new one complete and
// named; partial temporaries are never read and are removed by the next save.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lema/base/unique_fd.hpp"
#include "lema/trainer/adapter.hpp"
#include "lema/trainer/token_batches.hpp"

namespace lema::trainer {

inline constexpr const char* kTrainStateFile = "trainer_state.json";
inline constexpr const char* kOptimizerStateFile = "optimizer.safetensors";
inline constexpr const char* kLatestFile = "latest";

/// Identifies a base model: FNV-1a 64 (16 hex digits) over the bytes of `model_dir/config.json`
/// (when present) and every tensor's name, dtype and shape. Throws CheckpointError when the
/// directory holds no readable safetensors checkpoint.
std::string model_fingerprint(const std::filesystem::path& model_dir);

/// The contents of trainer_state.json.
struct TrainState {
  std::int64_t step = 0;
  DataPosition data;
  std::string rng_cpu;   // torch's default CPU generator state, hex
  std::string rng_cuda;  // the default CUDA generator's, hex; empty without CUDA

  // Settings a resume must match (check_resumable).
  std::string model_fingerprint;
  std::string base_model_name_or_path;
  LoraSettings lora;
  std::int64_t seq_len = 0;
  std::int64_t batch = 0;
  std::int64_t grad_accum = 0;
  std::uint64_t seed = 0;
  std::string data_fingerprint;  // TokenBatches::fingerprint(), hex
  std::uint64_t data_sequences = 0;

  // For the record (a resume may change them): the schedule and optimizer settings.
  double lr = 0;
  std::int64_t steps = 0;
  /// Validation losses so far, (step, loss), oldest first; written as "eval_losses": [{"step",
  /// "eval_loss"}, ...] when there are any.
  std::vector<std::pair<std::int64_t, double>> eval_losses;
};

void write_train_state(const std::filesystem::path& file, const TrainState& state);
/// Checks every field's type and range (Note [Reading trainer_state.json]); throws
/// InvalidArgument, one line naming the file, the field, its value and what to do.
TrainState read_train_state(const std::filesystem::path& file);
/// That one line: "<file>: field '<field>' is <value>; <rule>. The checkpoint is damaged ...".
[[noreturn]] void throw_bad_state_field(const std::filesystem::path& file, std::string_view field,
                                        const std::string& value, std::string_view rule);

/// Throws InvalidArgument, one line naming the first setting that differs between the
/// checkpoint in `checkpoint_dir` (`saved`) and this run (`now`) and both values, e.g.
/// "cannot resume from out/checkpoint-3: it was trained with --lora-rank 8, this run has
/// --lora-rank 16; use the same setting or another --out".
void check_resumable(const TrainState& saved, const TrainState& now,
                     const std::filesystem::path& checkpoint_dir);

/// AdamW's state, keyed by the parameters' PEFT names.
struct OptimizerState {
  std::int64_t step = 0;
  std::vector<std::pair<std::string, at::Tensor>> exp_avg;
  std::vector<std::pair<std::string, at::Tensor>> exp_avg_sq;
};

void write_optimizer_state(const std::filesystem::path& file, const OptimizerState& state);
/// Throws CheckpointError / InvalidArgument naming the file and what is wrong.
OptimizerState read_optimizer_state(const std::filesystem::path& file);

/// Creates `out_dir` if needed and proves it writable; InvalidArgument naming the directory,
/// the reason and what to do otherwise.
void prepare_output_dir(const std::filesystem::path& out_dir);

// Note [Output directory lock]
// One run at a time owns an output directory: it holds flock(LOCK_EX) on <out>/.lema.lock for
// its whole life, and a second run on the same --out is refused at once instead of racing the
// first for `latest` and mixing two runs' checkpoints. flock belongs to the open file, so the
// kernel drops it when the holder exits however it exits (kill -9 included): a lock file left
// by a dead run never blocks. The holder writes its pid into the file after locking it, for the
// refusal message; a refused run re-reads it until the pid it reads is alive, since the file
// may still name the dead previous holder for the moment between the new holder's flock and
// its write. The file stays in the directory: removing it would let a third run lock a new
// file while the second still holds the old one.
inline constexpr const char* kLockFile = ".lema.lock";

/// The exclusive lock of an output directory (Note [Output directory lock]). Move-only.
class OutputDirLock {
 public:
  /// prepare_output_dir, then takes the lock and removes what interrupted saves left
  /// (remove_interrupted_saves). Throws InvalidArgument naming the directory and the pid of the
  /// run that holds it ("output directory out is in use by another run (pid 1234); ...").
  static OutputDirLock acquire(const std::filesystem::path& out_dir);

  OutputDirLock(OutputDirLock&&) noexcept = default;
  OutputDirLock& operator=(OutputDirLock&&) noexcept = default;
  OutputDirLock(const OutputDirLock&) = delete;
  OutputDirLock& operator=(const OutputDirLock&) = delete;
  ~OutputDirLock() = default;  // closing the file releases the lock

  const std::filesystem::path& dir() const noexcept { return dir_; }
  /// The temporaries that acquire() removed.
  const std::vector<std::filesystem::path>& removed() const noexcept { return removed_; }

 private:
  OutputDirLock(std::filesystem::path dir, UniqueFd fd) : dir_(std::move(dir)), fd_(std::move(fd)) {}

  std::filesystem::path dir_;
  UniqueFd fd_;
  std::vector<std::filesystem::path> removed_;
};

/// Removes from `out_dir` (not its subdirectories) the temporaries that a killed save leaves,
/// and nothing else: `.partial-checkpoint-<N>-<pid>`, `.partial-old-checkpoint-<N>-<pid>`,
/// `.partial-probe-<pid>`, and `.<file>.tmp-<pid>-<n>` of `latest`, adapter_model.safetensors
/// and adapter_config.json (io::is_temporary_of). Only safe while holding the directory's lock.
/// Returns what it removed.
std::vector<std::filesystem::path> remove_interrupted_saves(const std::filesystem::path& out_dir);

/// "checkpoint-<step>"
std::string checkpoint_name(std::int64_t step);

/// Publishes `out_dir/name` as in Note [Checkpoint publication]: `write_files` fills a fresh
/// temporary directory, which then replaces any previous `name` and becomes `latest`.
/// Returns the final path.
std::filesystem::path publish_checkpoint(
    const std::filesystem::path& out_dir, const std::string& name,
    const std::function<void(const std::filesystem::path& dir)>& write_files);

/// The newest complete checkpoint in `out_dir`: the one `latest` names when it holds a
/// trainer_state.json, else the highest-numbered checkpoint-<N> that does; nullopt when none.
std::optional<std::filesystem::path> find_latest_checkpoint(const std::filesystem::path& out_dir);

}  // namespace lema::trainer
