#include "lema/trainer/trainer.hpp"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <spdlog/fmt/fmt.h>
#include <torch/cuda.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <cmath>
#include <map>
#include <mutex>

#include "lema/base/error.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/trainer/distributed.hpp"
#include "lema/trainer/train_state.hpp"

namespace lema::trainer {

struct Trainer::Optimizer {
  torch::optim::AdamW adamw;
};

namespace {

std::string to_hex(const at::Tensor& bytes) {
  const at::Tensor b = bytes.contiguous();
  const auto* p = b.const_data_ptr<std::uint8_t>();
  std::string out;
  out.reserve(static_cast<std::size_t>(b.numel()) * 2);
  for (std::int64_t i = 0; i < b.numel(); ++i) out += fmt::format("{:02x}", p[i]);
  return out;
}

// `hex` was checked by read_train_state (Note [Reading trainer_state.json]); the checks here
// only guard against callers that did not.
at::Tensor from_hex(const std::string& hex, const std::string& what) {
  if (hex.size() % 2 != 0) throw InvalidArgument(what + ": odd-length hex string");
  at::Tensor out = at::empty({static_cast<std::int64_t>(hex.size() / 2)}, at::kByte);
  auto* p = out.data_ptr<std::uint8_t>();
  auto nibble = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    throw InvalidArgument(what + ": '" + std::string(1, c) + "' is not a hex digit");
  };
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    p[i / 2] = static_cast<std::uint8_t>(nibble(hex[i]) * 16 + nibble(hex[i + 1]));
  }
  return out;
}

std::string generator_state(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return to_hex(gen.get_state());
}

void set_generator_state(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

std::optional<at::Generator> cuda_generator() {
  if (!torch::cuda::is_available()) return std::nullopt;
  return at::globalContext().defaultGenerator(at::kCUDA);
}

std::string shape_text(at::IntArrayRef sizes) {
  std::string out;
  for (const auto d : sizes) out += (out.empty() ? "" : "x") + std::to_string(d);
  return "[" + out + "]";
}

double total_grad_norm(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> norms;
  for (const auto& p : params) {
    if (p.grad().defined()) norms.push_back(p.grad().norm(2));
  }
  if (norms.empty()) return 0.0;
  return at::stack(norms).norm(2).item<double>();
}

// A [rows, cols] int64 copy of `v` on `device`; undefined when `v` is empty.
at::Tensor batch_tensor(std::vector<std::int64_t>& v, const TokenBatch& batch, at::Device device) {
  if (v.empty()) return {};
  return at::from_blob(v.data(), {batch.rows, batch.cols}, at::kLong)
      .to(at::TensorOptions().device(device), /*non_blocking=*/false, /*copy=*/true);
}

// The loss of one batch: of every next id, or of the labelled ones of prepared examples.
at::Tensor batch_loss(TrainableModel& model, TokenBatch& batch, at::Device device) {
  const at::Tensor ids = batch_tensor(batch.ids, batch, device);
  if (batch.labels.empty()) return model.loss(ids);
  return model.masked_loss(ids, batch_tensor(batch.labels, batch, device),
                           {batch_tensor(batch.attention_mask, batch, device),
                            batch_tensor(batch.positions, batch, device)});
}

}  // namespace

at::Tensor TrainableModel::masked_loss(const at::Tensor&, const at::Tensor&,
                                       const SequenceLayout&) {
  throw InvalidArgument("this model takes no labels; give it plain token data");
}

Trainer::Trainer(TrainableModel& model, TokenBatches data, TrainOptions options,
                 RunIdentity identity, std::optional<OutputDirLock> lock, ProcessGroup* group,
                 std::int64_t bucket_bytes)
    : model_(model),
      data_(std::move(data)),
      options_(std::move(options)),
      identity_(std::move(identity)),
      group_(group) {
  validate(options_);
  if (data_.batch() != options_.batch || data_.seq_len() != options_.seq_len ||
      data_.seed() != options_.seed) {
    throw InvalidArgument(fmt::format(
        "the data was packed with batch {}, seq-len {}, seed {} but the run has --batch {}, "
        "--seq-len {}, --seed {}; pack it with the run's settings",
        data_.batch(), data_.seq_len(), data_.seed(), options_.batch, options_.seq_len,
        options_.seed));
  }
  params_ = model_.named_trainable();
  if (params_.empty()) {
    throw InvalidArgument("the model has no trainable parameters; check the LoRA target modules");
  }
  std::vector<at::Tensor> tensors;
  for (const auto& [name, p] : params_) {
    LEMA_EXPECTS(p.requires_grad(), "trainable parameter '" + name + "' does not require grad");
    tensors.push_back(p);
  }
  if (group_) data_.set_shard(group_->rank(), group_->world_size());
  if (!writes_output()) {
    LEMA_EXPECTS(!lock, "only rank 0 locks the output directory");
  } else if (lock) {
    LEMA_EXPECTS(lock->dir() == options_.out_dir,
                 "the lock given to the trainer is " + lock->dir().string() + "'s, not --out " +
                     options_.out_dir.string() + "'s");
    lock_ = std::move(lock);
  } else {
    lock_ = OutputDirLock::acquire(options_.out_dir);
  }
  torch::manual_seed(options_.seed);
  auto adamw_options = torch::optim::AdamWOptions(options_.lr)
                           .betas({options_.beta1, options_.beta2})
                           .eps(options_.eps)
                           .weight_decay(options_.weight_decay);
  optimizer_ = std::make_unique<Optimizer>(Optimizer{torch::optim::AdamW(tensors, adamw_options)});
  if (group_) {
    {
      at::NoGradGuard no_grad;
      group_->broadcast_from_rank0(tensors);
    }
    buckets_ = std::make_unique<GradientBuckets>(*group_, tensors, bucket_bytes);
  }
}

Trainer::~Trainer() = default;

bool Trainer::writes_output() const noexcept { return group_ == nullptr || group_->rank() == 0; }

std::int64_t Trainer::global_batch() const noexcept {
  return options_.batch * (group_ ? group_->world_size() : 1);
}

StepResult Trainer::step() {
  const auto start = std::chrono::steady_clock::now();
  auto& adamw = optimizer_->adamw;
  model_.set_training(true);
  adamw.zero_grad();

  const at::Device device = params_.front().second.device();
  double loss_sum = 0;
  for (std::int64_t micro = 0; micro < options_.grad_accum; ++micro) {
    // Gradients are averaged over the ranks once per step, as the last micro-step's backward
    // completes them (Note [Overlapping the all-reduce]).
    if (buckets_ && micro + 1 == options_.grad_accum) buckets_->arm();
    TokenBatch batch = data_.next();
    const at::Tensor loss = batch_loss(model_, batch, device);
    LEMA_EXPECTS(loss.numel() == 1, "the model's loss must be a scalar");
    (loss / static_cast<double>(options_.grad_accum)).backward();
    loss_sum += loss.item<double>();
  }

  if (buckets_) {
    buckets_->finish();
    // The step's loss is the mean over the global batch (Note [Gradient averaging]).
    std::vector<at::Tensor> sum{at::full({1}, loss_sum, at::kDouble)};
    group_->average(sum);
    loss_sum = sum[0].item<double>();
  }
  std::vector<at::Tensor> tensors;
  for (const auto& [name, p] : params_) tensors.push_back(p);
  const double grad_norm = options_.max_grad_norm > 0
                               ? torch::nn::utils::clip_grad_norm_(tensors, options_.max_grad_norm)
                               : total_grad_norm(tensors);
  const double loss = loss_sum / static_cast<double>(options_.grad_accum);
  if (!std::isfinite(grad_norm)) {
    throw Error(fmt::format(
        "step {}: the gradients are not finite (loss {}, gradient norm {}); the adapters were "
        "left unchanged; lower --lr or compute in float32",
        step_ + 1, loss, grad_norm));
  }

  const double lr = scheduled_lr(options_, step_ + 1);
  for (auto& group : adamw.param_groups()) group.options().set_lr(lr);
  adamw.step();
  ++step_;

  StepResult result;
  result.step = step_;
  result.loss = loss;
  result.tokens = options_.grad_accum * global_batch() * options_.seq_len;
  result.step_time_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.lr = lr;
  result.grad_norm = grad_norm;
  return result;
}

bool Trainer::checkpoint_due() const noexcept {
  return options_.save_every > 0 && step_ > 0 && step_ % options_.save_every == 0;
}

void Trainer::set_eval_data(TokenBatches eval, std::int64_t every) {
  if (every < 0) {
    throw InvalidArgument(fmt::format("--eval-every {} is negative; give a step count (0: only "
                                      "after the last step)",
                                      every));
  }
  if (eval.batch() != 1) throw InvalidArgument("evaluation data must be packed with batch 1");
  eval_data_.emplace(std::move(eval));
  eval_every_ = every;
}

double Trainer::evaluate() {
  LEMA_EXPECTS(eval_data_.has_value(), "no evaluation data was given");
  model_.set_training(false);
  at::NoGradGuard no_grad;
  TokenBatches data = *eval_data_;
  data.restore({0, 0});
  const at::Device device = params_.front().second.device();
  double sum = 0, count = 0;
  for (std::uint64_t i = 0; i < data.num_sequences(); ++i) {
    TokenBatch batch = data.next();
    const double n =
        batch.labels.empty()
            ? static_cast<double>(batch.cols - 1)
            : static_cast<double>(std::count_if(batch.labels.begin() + 1, batch.labels.end(),
                                                [](std::int64_t l) { return l != kIgnoreLabel; }));
    const at::Tensor loss = batch_loss(model_, batch, device);
    sum += loss.item<double>() * n;
    count += n;
  }
  model_.set_training(true);  // step() sets it again anyway
  return sum / count;
}

void Trainer::run(const std::function<void(const StepResult&)>& on_step) {
  while (!finished()) {
    StepResult result = step();
    if (eval_data_ && ((eval_every_ > 0 && step_ % eval_every_ == 0) || finished())) {
      result.eval_loss = evaluate();
      eval_losses_.emplace_back(step_, *result.eval_loss);
    }
    if (on_step) on_step(result);
    if (checkpoint_due() && !finished()) save_checkpoint();
  }
  save_final();
}

namespace {

TrainState identity_state(const TrainOptions& options, const RunIdentity& identity,
                          const TokenBatches& data) {
  // The global batch: what decides the data position and the gradient of a step.
  TrainState s;
  s.model_fingerprint = identity.model_fingerprint;
  s.base_model_name_or_path = identity.base_model_name_or_path;
  s.lora = identity.lora;
  s.seq_len = options.seq_len;
  s.batch = options.batch * data.shard_world_size();
  s.grad_accum = options.grad_accum;
  s.seed = options.seed;
  s.data_fingerprint = fmt::format("{:016x}", data.fingerprint());
  s.data_sequences = data.num_sequences();
  s.lr = options.lr;
  s.steps = options.steps;
  return s;
}

}  // namespace

std::filesystem::path Trainer::save_checkpoint() {
  if (!writes_output()) {
    last_saved_step_ = step_;
    return options_.out_dir / checkpoint_name(step_);
  }
  TrainState state = identity_state(options_, identity_, data_);
  state.step = step_;
  state.data = data_.position();
  state.rng_cpu = generator_state(at::detail::getDefaultCPUGenerator());
  if (const auto cuda = cuda_generator()) state.rng_cuda = generator_state(*cuda);
  state.eval_losses = eval_losses_;

  OptimizerState optimizer;
  auto& adamw_state = optimizer_->adamw.state();
  for (const auto& [name, p] : params_) {
    const auto it = adamw_state.find(p.unsafeGetTensorImpl());
    if (it == adamw_state.end()) continue;  // no step has touched it yet
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    optimizer.step = s.step();
    optimizer.exp_avg.emplace_back(name, s.exp_avg());
    optimizer.exp_avg_sq.emplace_back(name, s.exp_avg_sq());
  }

  std::vector<std::pair<std::string, at::Tensor>> adapters;
  for (const auto& [name, p] : params_) adapters.emplace_back(name, p.detach());

  const auto dir = publish_checkpoint(
      options_.out_dir, checkpoint_name(step_), [&](const std::filesystem::path& temp) {
        save_adapter(temp, adapters, identity_.lora, identity_.base_model_name_or_path);
        write_optimizer_state(temp / kOptimizerStateFile, optimizer);
        write_train_state(temp / kTrainStateFile, state);
      });
  last_saved_step_ = step_;
  return dir;
}

void Trainer::save_final() {
  if (last_saved_step_ != step_) save_checkpoint();
  if (!writes_output()) return;
  std::vector<std::pair<std::string, at::Tensor>> adapters;
  for (const auto& [name, p] : params_) adapters.emplace_back(name, p.detach());
  save_adapter(options_.out_dir, adapters, identity_.lora, identity_.base_model_name_or_path);
}

namespace {

void expect_finite(const std::filesystem::path& file, const std::string& name,
                   const at::Tensor& t) {
  if (!at::isfinite(t).all().item<bool>()) {
    throw InvalidArgument(fmt::format(
        "{}: '{}' holds NaN or infinite values; the checkpoint is damaged: remove {} to resume "
        "from an older checkpoint, or train into another --out",
        file.string(), name, file.parent_path().string()));
  }
}

// Where the data stands after `served` sequences of n: TokenBatches enters the next epoch only
// when it serves its first sequence, so a finished epoch stays at index n.
DataPosition position_after(std::uint64_t served, std::uint64_t n) {
  if (served == 0) return {0, 0};
  const std::uint64_t epoch = (served - 1) / n;
  return {epoch, served - epoch * n};
}

}  // namespace

void Trainer::check_consistent(const TrainState& saved, const std::filesystem::path& dir) const {
  const auto state_file = dir / kTrainStateFile;
  // The directory's name is the step it was published under (publish_checkpoint).
  const std::string name = dir.filename().string();
  if (name.starts_with("checkpoint-") && name != checkpoint_name(saved.step)) {
    throw_bad_state_field(state_file, "step", std::to_string(saved.step),
                          "it must be the step in the directory's name, " + name);
  }
  // check_resumable has matched batch, grad_accum and the data, so the sequences served are
  // known exactly; overflow cannot happen for a step ≤ --steps (validate).
  const auto served = static_cast<std::uint64_t>(saved.step) *
                      static_cast<std::uint64_t>(options_.grad_accum * global_batch());
  const DataPosition expected = position_after(served, data_.num_sequences());
  if (saved.data != expected) {
    throw_bad_state_field(
        state_file, "data_position",
        fmt::format("epoch {} index {}", saved.data.epoch, saved.data.index),
        fmt::format("{} steps of {} sequences each over data of {} sequences end at epoch {} "
                    "index {}",
                    saved.step, options_.grad_accum * global_batch(), data_.num_sequences(),
                    expected.epoch, expected.index));
  }
}

std::optional<std::filesystem::path> Trainer::resume() {
  auto latest = find_latest_checkpoint(options_.out_dir);
  if (!latest) return latest;
  resume_from(*latest);
  // A run killed between a checkpoint's rename and the pointer's update leaves `latest` naming
  // the one before (or nothing): point it at what this run continues from, so readers of the
  // pointer see the same checkpoint even when this run has no step left to save.
  if (writes_output()) {
    std::ifstream in(options_.out_dir / kLatestFile);
    std::string named;
    if (!in || !std::getline(in, named) || named != latest->filename().string())
      io::write_file_atomically(options_.out_dir / kLatestFile,
                                latest->filename().string() + "\n");
  }
  return latest;
}

void Trainer::resume_from(const std::filesystem::path& dir) {
  // Everything is read and checked before anything changes, so a failed resume leaves the
  // trainer as it was.
  const auto state_file = dir / kTrainStateFile;
  const TrainState saved = read_train_state(state_file);
  check_resumable(saved, identity_state(options_, identity_, data_), dir);
  check_consistent(saved, dir);
  if (saved.step > options_.steps) {
    throw InvalidArgument(fmt::format(
        "cannot resume from {}: it is at step {}, beyond this run's --steps {}; raise --steps",
        dir.string(), saved.step, options_.steps));
  }
  const LoadedAdapter adapter = load_adapter(dir);
  const OptimizerState optimizer = read_optimizer_state(dir / kOptimizerStateFile);
  const at::Tensor rng_cpu = from_hex(saved.rng_cpu, state_file.string() + " rng.cpu");
  const auto cuda = cuda_generator();
  const at::Tensor rng_cuda = cuda && !saved.rng_cuda.empty()
                                  ? from_hex(saved.rng_cuda, state_file.string() + " rng.cuda")
                                  : at::Tensor();
  if (!optimizer.exp_avg.empty() && optimizer.step != saved.step) {
    throw InvalidArgument(fmt::format(
        "{}: its step {} is not the step {} of {} beside it; the checkpoint is damaged: remove "
        "{} to resume from an older checkpoint, or train into another --out",
        (dir / kOptimizerStateFile).string(), optimizer.step, saved.step, kTrainStateFile,
        dir.string()));
  }

  std::map<std::string, at::Tensor> exp_avg(optimizer.exp_avg.begin(), optimizer.exp_avg.end());
  std::map<std::string, at::Tensor> exp_avg_sq(optimizer.exp_avg_sq.begin(),
                                               optimizer.exp_avg_sq.end());
  auto expect_shape = [&](const std::string& file, const std::string& name, const at::Tensor& t,
                          const at::Tensor& p) {
    if (t.sizes() != p.sizes()) {
      throw InvalidArgument(
          fmt::format("cannot resume from {}: {} holds '{}' of shape {} but the model's is {}",
                      dir.string(), file, name, shape_text(t.sizes()), shape_text(p.sizes())));
    }
  };
  for (const auto& [name, p] : params_) {
    const auto a = adapter.tensors.find(name);
    if (a == adapter.tensors.end()) {
      throw InvalidArgument("cannot resume from " + dir.string() + ": its adapter has no tensor '" +
                            name + "'");
    }
    expect_shape("the adapter", name, a->second, p);
    const bool has_avg = exp_avg.contains(name), has_sq = exp_avg_sq.contains(name);
    if (has_avg != has_sq || (saved.step > 0 && !has_avg)) {
      throw InvalidArgument("cannot resume from " + dir.string() + ": " + kOptimizerStateFile +
                            " lacks the state of '" + name + "'");
    }
    if (has_avg) {
      expect_shape(kOptimizerStateFile, name, exp_avg.at(name), p);
      expect_shape(kOptimizerStateFile, name, exp_avg_sq.at(name), p);
    }
    // Not-finite state would turn the adapters into NaN at the first step, silently.
    expect_finite(dir / kAdapterWeightsFile, name, a->second);
    if (has_avg) {
      expect_finite(dir / kOptimizerStateFile, name + ".exp_avg", exp_avg.at(name));
      expect_finite(dir / kOptimizerStateFile, name + ".exp_avg_sq", exp_avg_sq.at(name));
      if (exp_avg_sq.at(name).lt(0).any().item<bool>()) {
        throw InvalidArgument(fmt::format(
            "{}: '{}.exp_avg_sq' holds negative values, which a running mean of squares cannot; "
            "the checkpoint is damaged: remove {} to resume from an older checkpoint",
            (dir / kOptimizerStateFile).string(), name, dir.string()));
      }
    }
  }
  for (const auto& state : {&exp_avg, &exp_avg_sq}) {
    for (const auto& [name, t] : *state) {
      const bool known = std::any_of(params_.begin(), params_.end(),
                                     [&](const auto& p) { return p.first == name; });
      if (!known) {
        throw InvalidArgument(fmt::format(
            "{}: state of '{}', which the model does not train; the checkpoint belongs to "
            "another run: use another --out",
            (dir / kOptimizerStateFile).string(), name));
      }
    }
  }
  if (saved.data.index > data_.num_sequences()) {
    throw InvalidArgument(
        fmt::format("cannot resume from {}: its data position {} is beyond the "
                    "{} sequences of the data",
                    dir.string(), saved.data.index, data_.num_sequences()));
  }
  if (rng_cpu.numel() != at::detail::getDefaultCPUGenerator().get_state().numel()) {
    throw_bad_state_field(state_file, "rng.cpu", fmt::format("{} bytes", rng_cpu.numel()),
                          fmt::format("torch's CPU generator state is {} bytes (another torch?)",
                                      at::detail::getDefaultCPUGenerator().get_state().numel()));
  }
  if (rng_cuda.defined() && rng_cuda.numel() != cuda->get_state().numel()) {
    throw_bad_state_field(state_file, "rng.cuda", fmt::format("{} bytes", rng_cuda.numel()),
                          fmt::format("torch's CUDA generator state is {} bytes (another torch?)",
                                      cuda->get_state().numel()));
  }
  if (adapter.tensors.size() != params_.size()) {
    throw InvalidArgument(fmt::format(
        "cannot resume from {}: its adapter has {} tensors, the model {}; the LoRA targets differ",
        dir.string(), adapter.tensors.size(), params_.size()));
  }

  {
    at::NoGradGuard no_grad;
    for (auto& [name, p] : params_) p.copy_(adapter.tensors.at(name));
  }
  auto& adamw_state = optimizer_->adamw.state();
  for (const auto& [name, p] : params_) {
    adamw_state.erase(p.unsafeGetTensorImpl());
    if (!exp_avg.contains(name)) continue;
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(optimizer.step);
    s->exp_avg(exp_avg.at(name).to(p.options()).clone());
    s->exp_avg_sq(exp_avg_sq.at(name).to(p.options()).clone());
    adamw_state[p.unsafeGetTensorImpl()] = std::move(s);
  }
  data_.restore(saved.data);
  set_generator_state(at::detail::getDefaultCPUGenerator(), rng_cpu);
  if (rng_cuda.defined()) set_generator_state(*cuda, rng_cuda);
  step_ = saved.step;
  last_saved_step_ = saved.step;
  eval_losses_ = saved.eval_losses;
}

}  // namespace lema::trainer
