// The training loop, its schedule and its checkpoints, driven with a tiny stand-in model
// (frozen embedding and head, a LoRA pair on the head, dropout): the loop learns, gradient
// accumulation equals a larger batch, clipping bounds the norm, and a run split by a
// checkpoint and a resume equals the straight run bit for bit — also after a save that was
// killed half-way — while a resume into another run's directory is refused by name.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <functional>
#include <memory>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/trainer/train_state.hpp"
#include "lema/trainer/trainable_model.hpp"
#include "lema/trainer/trainer.hpp"
#include "runtime_fixture.hpp"

namespace lema::trainer {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr std::int64_t kVocab = 48;
constexpr std::int64_t kHidden = 16;

// logits = dropout(E[x]) · (W + s · B·A)ᵀ; only A and B train.
class TinyLoraModel final : public TrainableModel {
 public:
  explicit TinyLoraModel(std::int64_t rank = 4, double dropout = 0.1) : dropout_(dropout) {
    auto gen = at::detail::createCPUGenerator(1234);
    embed_ = at::randn({kVocab, kHidden}, gen, at::kFloat);
    head_ = at::randn({kVocab, kHidden}, gen, at::kFloat) * 0.1;
    lora_a_ = (at::randn({rank, kHidden}, gen, at::kFloat) * 0.1).set_requires_grad(true);
    lora_b_ = at::zeros({kVocab, rank}, at::kFloat).set_requires_grad(true);
    scaling_ = 8.0 / static_cast<double>(rank);
  }

  at::Tensor loss(const at::Tensor& ids) override {
    const auto n = ids.size(1);
    at::Tensor x = at::embedding(embed_, ids.slice(1, 0, n - 1));
    x = at::dropout(x, dropout_, training_);
    const at::Tensor logits =
        at::matmul(x, head_.t()) + scaling_ * at::matmul(at::matmul(x, lora_a_.t()), lora_b_.t());
    return at::cross_entropy_loss(logits.reshape({-1, kVocab}), ids.slice(1, 1, n).reshape({-1}));
  }
  std::vector<std::pair<std::string, at::Tensor>> named_trainable() override {
    return {{"base_model.model.lm_head.lora_A.weight", lora_a_},
            {"base_model.model.lm_head.lora_B.weight", lora_b_}};
  }
  void set_training(bool training) override { training_ = training; }
  std::int64_t vocab_size() const override { return kVocab; }

 private:
  double dropout_;
  bool training_ = true;
  double scaling_;
  at::Tensor embed_, head_, lora_a_, lora_b_;
};

// A learnable stream: a fixed, noisy walk through the vocabulary.
std::vector<std::uint32_t> corpus(std::size_t n) {
  std::vector<std::uint32_t> t(n);
  std::uint32_t v = 0;
  for (std::size_t i = 0; i < n; ++i) {
    v = (v * 5 + 3 + static_cast<std::uint32_t>(i % 7 == 0)) % kVocab;
    t[i] = v;
  }
  return t;
}

std::string file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << path;
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

class TrainerLoop : public ::testing::Test {
 protected:
  void SetUp() override { at::set_num_threads(1); }  // reductions in one fixed order

  TrainOptions options(const std::string& out, std::int64_t steps) const {
    TrainOptions o;
    o.steps = steps;
    o.batch = 2;
    o.seq_len = 12;
    o.grad_accum = 2;
    o.lr = 2e-2;
    o.warmup_steps = 2;
    o.seed = 17;
    o.out_dir = dir_.path() / out;
    return o;
  }
  static RunIdentity identity(std::int64_t rank = 4) {
    RunIdentity id;
    id.model_fingerprint = "0123456789abcdef";
    id.base_model_name_or_path = "tiny";
    id.lora.rank = rank;
    id.lora.alpha = 8;
    id.lora.dropout = 0.1;
    id.lora.target_modules = {"lm_head"};
    return id;
  }
  static TokenBatches data(const TrainOptions& o, std::size_t tokens = 600) {
    return TokenBatches(corpus(tokens), "corpus", o.seq_len, o.batch, o.seed);
  }

  test::TempDir dir_{"trainer-loop"};
};

TEST_F(TrainerLoop, LossFalls) {
  TinyLoraModel model;
  auto o = options("learn", 40);
  Trainer trainer(model, data(o), o, identity());
  std::vector<double> losses;
  for (int i = 0; i < 40; ++i) {
    const StepResult r = trainer.step();
    EXPECT_EQ(r.step, i + 1);
    EXPECT_EQ(r.tokens, 2 * 2 * 12);
    EXPECT_DOUBLE_EQ(r.lr, scheduled_lr(o, i + 1));
    EXPECT_TRUE(std::isfinite(r.loss));
    losses.push_back(r.loss);
  }
  const double first = (losses[0] + losses[1] + losses[2]) / 3;
  const double last = (losses[37] + losses[38] + losses[39]) / 3;
  EXPECT_LT(last, first * 0.8) << "first " << first << ", last " << last;
  EXPECT_TRUE(trainer.finished());
}

TEST_F(TrainerLoop, GradientAccumulationEqualsALargerBatch) {
  auto train = [&](std::int64_t batch, std::int64_t accum, const std::string& out) {
    TinyLoraModel model(4, /*dropout=*/0.0);
    auto o = options(out, 4);
    o.batch = batch;
    o.grad_accum = accum;
    Trainer trainer(model, data(o), o, identity());
    std::vector<double> losses;
    for (int i = 0; i < 4; ++i) losses.push_back(trainer.step().loss);
    std::vector<at::Tensor> adapters;
    for (auto& [name, p] : model.named_trainable()) adapters.push_back(p.detach().clone());
    return std::make_pair(losses, adapters);
  };
  const auto [accum_losses, accum_adapters] = train(2, 2, "accum");
  const auto [batch_losses, batch_adapters] = train(4, 1, "batch");
  for (std::size_t i = 0; i < accum_losses.size(); ++i) {
    EXPECT_NEAR(accum_losses[i], batch_losses[i], 1e-5 * std::abs(batch_losses[i])) << i;
  }
  for (std::size_t i = 0; i < accum_adapters.size(); ++i) {
    EXPECT_TRUE(at::allclose(accum_adapters[i], batch_adapters[i], 1e-4, 1e-6)) << i;
  }
  EXPECT_GT(batch_adapters[1].abs().max().item<float>(), 0.0f);  // B moved off zero
}

TEST_F(TrainerLoop, ClippingBoundsTheTotalNorm) {
  TinyLoraModel model;
  auto o = options("clip", 3);
  o.max_grad_norm = 1e-3;
  Trainer trainer(model, data(o), o, identity());
  for (int i = 0; i < 3; ++i) {
    const StepResult r = trainer.step();
    EXPECT_GT(r.grad_norm, 1e-3);  // so the clip had work to do
    double sq = 0;
    for (auto& [name, p] : model.named_trainable()) sq += p.grad().pow(2).sum().item<double>();
    EXPECT_LE(std::sqrt(sq), 1e-3 * (1 + 1e-4));
  }
}

TEST(Schedule, WarmUpThenCosineToTheFloor) {
  TrainOptions o;
  o.steps = 10;
  o.lr = 1.0;
  o.warmup_steps = 2;
  o.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(scheduled_lr(o, 1), 0.5);
  EXPECT_DOUBLE_EQ(scheduled_lr(o, 2), 1.0);
  EXPECT_NEAR(scheduled_lr(o, 6), 0.55, 1e-12);  // half-way down the cosine
  EXPECT_NEAR(scheduled_lr(o, 10), 0.1, 1e-12);
  EXPECT_NEAR(scheduled_lr(o, 12), 0.1, 1e-12);  // past the horizon it stays at the floor
  for (std::int64_t s = 3; s < 10; ++s) EXPECT_LT(scheduled_lr(o, s + 1), scheduled_lr(o, s));
  o.schedule_steps = 20;
  EXPECT_NEAR(scheduled_lr(o, 11), 0.55, 1e-12);
  o.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(scheduled_lr(o, 0), 1.0);
}

TEST(Schedule, SettingsOutOfRangeAreNamed) {
  TrainOptions o;
  o.steps = 1;
  o.seq_len = 8;
  o.out_dir = "x";
  EXPECT_NO_THROW(validate(o));
  o.grad_accum = 0;
  try {
    validate(o);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_THAT(std::string(e.what()), HasSubstr("--grad-accum 0"));
  }
}

// ---- checkpoints and resume ------------------------------------------------------------

class TrainerResume : public TrainerLoop {
 protected:
  static constexpr std::int64_t kSteps = 6;

  struct Run {
    std::vector<double> losses;
    std::string adapter;    // the final adapter_model.safetensors
    std::string optimizer;  // checkpoint-6/optimizer.safetensors
  };

  // A straight run of 6 steps, saving at step 3.
  Run straight() {
    TinyLoraModel model;
    auto o = options("straight", kSteps);
    o.save_every = 3;
    Trainer trainer(model, data(o), o, identity());
    Run run;
    trainer.run([&](const StepResult& r) { run.losses.push_back(r.loss); });
    run.adapter = file_bytes(o.out_dir / "adapter_model.safetensors");
    run.optimizer = file_bytes(o.out_dir / "checkpoint-6" / kOptimizerStateFile);
    EXPECT_TRUE(std::filesystem::exists(o.out_dir / "checkpoint-3" / kTrainStateFile));
    EXPECT_EQ(file_bytes(o.out_dir / kLatestFile), "checkpoint-6\n");
    return run;
  }

  // `--steps 3` with the 6-step schedule, into `out`; returns its losses.
  std::vector<double> first_half(const std::string& out) {
    TinyLoraModel model;
    auto o = options(out, 3);
    o.schedule_steps = kSteps;
    Trainer trainer(model, data(o), o, identity());
    std::vector<double> losses;
    trainer.run([&](const StepResult& r) { losses.push_back(r.loss); });
    return losses;
  }

  // A resume of `out` that must be refused with an InvalidArgument naming `file` and each of
  // `needles`, changing nothing; returns the message.
  std::string refused_resume(const std::string& out, const std::filesystem::path& file,
                             const std::vector<std::string>& needles) {
    TinyLoraModel model;
    auto o = options(out, kSteps);
    Trainer trainer(model, data(o), o, identity());
    try {
      trainer.resume();
      ADD_FAILURE() << "resumed";
      return {};
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_THAT(what, HasSubstr(file.string()));
      for (const auto& needle : needles) EXPECT_THAT(what, HasSubstr(needle));
      EXPECT_EQ(trainer.step_count(), 0) << "a refused resume changes nothing";
      return what;
    }
  }

  // Resumes `out` to step 6.
  Run second_half(const std::string& out, const std::string& expect_from) {
    TinyLoraModel model;  // fresh adapters: the checkpoint must overwrite them
    auto o = options(out, kSteps);
    Trainer trainer(model, data(o), o, identity());
    const auto from = trainer.resume();
    EXPECT_TRUE(from.has_value());
    if (from) {
      EXPECT_EQ(from->filename(), expect_from);
    }
    EXPECT_EQ(trainer.step_count(), 3);
    Run run;
    trainer.run([&](const StepResult& r) { run.losses.push_back(r.loss); });
    run.adapter = file_bytes(o.out_dir / "adapter_model.safetensors");
    run.optimizer = file_bytes(o.out_dir / "checkpoint-6" / kOptimizerStateFile);
    return run;
  }

  static void expect_same(const Run& straight, const std::vector<double>& first,
                          const Run& second) {
    ASSERT_EQ(first.size() + second.losses.size(), straight.losses.size());
    for (std::size_t i = 0; i < straight.losses.size(); ++i) {
      const double got = i < first.size() ? first[i] : second.losses[i - first.size()];
      EXPECT_EQ(got, straight.losses[i]) << "step " << i + 1;  // bit for bit
    }
    EXPECT_TRUE(second.adapter == straight.adapter) << "adapter bytes differ";
    EXPECT_TRUE(second.optimizer == straight.optimizer) << "optimizer bytes differ";
  }
};

TEST_F(TrainerResume, ThreeStepsAndAResumeEqualSixBitForBit) {
  const Run reference = straight();
  const auto first = first_half("split");
  EXPECT_EQ(file_bytes(dir_.path() / "split" / kLatestFile), "checkpoint-3\n");
  expect_same(reference, first, second_half("split", "checkpoint-3"));
}

TEST_F(TrainerResume, AKilledSaveLeavesTheLastCompleteCheckpoint) {
  const Run reference = straight();
  const auto first = first_half("killed");
  const auto out = dir_.path() / "killed";
  // What a process killed inside publish_checkpoint("checkpoint-6") leaves: a partial
  // temporary directory and a half-written temporary of `latest`; and a checkpoint directory
  // missing its state (never produced by the writer, ignored all the same).
  std::filesystem::create_directories(out / ".partial-checkpoint-6-99999");
  std::ofstream(out / ".partial-checkpoint-6-99999" / "adapter_model.safetensors") << "trunc";
  std::ofstream(out / ".latest.tmp") << "checkpoint-";
  std::filesystem::create_directories(out / "checkpoint-5");
  const Run second = second_half("killed", "checkpoint-3");
  expect_same(reference, first, second);
  EXPECT_FALSE(std::filesystem::exists(out / ".partial-checkpoint-6-99999"))
      << "the next save removes what an interrupted one left";
}

TEST_F(TrainerResume, WithoutTheLatestPointerTheNewestCompleteCheckpointIsUsed) {
  const Run reference = straight();
  const auto first = first_half("nopointer");
  std::filesystem::remove(dir_.path() / "nopointer" / kLatestFile);
  expect_same(reference, first, second_half("nopointer", "checkpoint-3"));

  std::ofstream(dir_.path() / "nopointer" / kLatestFile) << "checkpoint-9\n";  // a stale name
  EXPECT_EQ(find_latest_checkpoint(dir_.path() / "nopointer")->filename(), "checkpoint-6");
  EXPECT_FALSE(find_latest_checkpoint(dir_.path() / "absent").has_value());
}

TEST_F(TrainerResume, AnotherRunsDirectoryIsRefusedByName) {
  first_half("theirs");
  auto refused = [&](TrainableModel& model, TrainOptions o, RunIdentity id) -> std::string {
    o.out_dir = dir_.path() / "theirs";
    Trainer trainer(model, data(o), o, id);
    try {
      trainer.resume();
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(trainer.step_count(), 0);
      return e.what();
    }
    ADD_FAILURE() << "resumed";
    return {};
  };
  {
    TinyLoraModel model(8);
    EXPECT_THAT(
        refused(model, options("", kSteps), identity(8)),
        AllOf(HasSubstr("checkpoint-3"), HasSubstr("--lora-rank 4"), HasSubstr("--lora-rank 8")));
  }
  TinyLoraModel model;
  auto other_model = identity();
  other_model.model_fingerprint = "fedcba9876543210";
  EXPECT_THAT(
      refused(model, options("", kSteps), other_model),
      AllOf(HasSubstr("the model"), HasSubstr("0123456789abcdef"), HasSubstr("fedcba9876543210")));
  auto o = options("", kSteps);
  o.seq_len = 10;
  EXPECT_THAT(refused(model, o, identity()),
              AllOf(HasSubstr("--seq-len 12"), HasSubstr("--seq-len 10")));
  o = options("", kSteps);
  o.batch = 3;
  EXPECT_THAT(refused(model, o, identity()), AllOf(HasSubstr("--batch 2"), HasSubstr("--batch 3")));
  auto targets = identity();
  targets.lora.target_modules = {"q_proj"};
  EXPECT_THAT(refused(model, options("", kSteps), targets), HasSubstr("--lora-targets lm_head"));
}

TEST_F(TrainerResume, AnUnwritableOutputDirectoryIsRefusedBeforeTraining) {
  std::ofstream(dir_.path() / "a-file") << "x";
  TinyLoraModel model;
  auto o = options("a-file/out", 2);
  try {
    Trainer trainer(model, data(o), o, identity());
    FAIL() << "accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_THAT(std::string(e.what()), AllOf(HasSubstr("a-file/out"), HasSubstr("--out")));
  }
}

// ---- the output directory's lock and leftovers ------------------------------------------

std::string lock_file_pid(const std::filesystem::path& out) {
  std::string text = file_bytes(out / kLockFile);
  while (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

TEST_F(TrainerResume, ASecondRunOnTheSameDirectoryIsRefusedNamingTheHolder) {
  TinyLoraModel model;
  const auto o = options("locked", 2);
  auto first = std::make_unique<Trainer>(model, data(o), o, identity());
  EXPECT_EQ(lock_file_pid(o.out_dir), std::to_string(::getpid()));
  try {
    TinyLoraModel other;
    Trainer second(other, data(o), o, identity());
    FAIL() << "two trainers hold " << o.out_dir;
  } catch (const InvalidArgument& e) {
    EXPECT_THAT(std::string(e.what()),
                AllOf(HasSubstr(o.out_dir.string()), HasSubstr("in use"),
                      HasSubstr("pid " + std::to_string(::getpid())), HasSubstr("--out")));
  }
  first.reset();  // the lock goes with its holder
  TinyLoraModel other;
  EXPECT_NO_THROW(Trainer(other, data(o), o, identity()));
}

TEST_F(TrainerResume, ALockFileLeftByADeadRunDoesNotBlock) {
  const auto o = options("dead", 2);
  std::filesystem::create_directories(o.out_dir);
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);  // a pid that no process has any more
  std::ofstream(o.out_dir / kLockFile) << child << "\n";
  TinyLoraModel model;
  Trainer trainer(model, data(o), o, identity());
  EXPECT_EQ(lock_file_pid(o.out_dir), std::to_string(::getpid())) << "the live holder's pid";
}

TEST_F(TrainerResume, TakingTheLockRemovesOnlyWhatInterruptedSavesLeft) {
  const auto out = dir_.path() / "leftovers";
  std::filesystem::create_directories(out / "checkpoint-3");
  const std::vector<std::string> ours = {
      ".latest.tmp-4242-0",
      ".adapter_model.safetensors.tmp-4242-1",
      ".adapter_config.json.tmp-17-12",
      ".partial-checkpoint-6-4242",
      ".partial-old-checkpoint-3-4242",
      ".partial-probe-4242",
  };
  const std::vector<std::string> theirs = {
      "notes.txt",
      ".latest.tmp",                        // no pid and counter: not a name the writer gives
      ".latest.tmp-4242",                   // no counter
      ".latest.tmp-4242-0x",                // not a number
      ".model.safetensors.tmp-4242-0",      // not a file the trainer writes
      "x.latest.tmp-4242-0",                // not hidden
      ".partial-notes",                     // not a checkpoint, probe or old checkpoint
      ".partial-checkpoint-6",              // no pid
      ".partial-old-probe-4242",            // probes are never renamed "old"
      ".partial-checkpoint--3-4242",        // not a step
      "checkpoint-3/.latest.tmp-4242-0",    // not at the top of the directory
  };
  for (const auto& name : ours) {
    if (name.starts_with(".partial-checkpoint") || name.starts_with(".partial-old")) {
      std::filesystem::create_directories(out / name);
      std::ofstream(out / name / "adapter_model.safetensors") << "trunc";
    } else {
      std::ofstream(out / name) << "half";
    }
  }
  for (const auto& name : theirs) std::ofstream(out / name) << "keep";

  const OutputDirLock lock = OutputDirLock::acquire(out);
  for (const auto& name : ours) EXPECT_FALSE(std::filesystem::exists(out / name)) << name;
  for (const auto& name : theirs) EXPECT_EQ(file_bytes(out / name), "keep") << name;
  EXPECT_EQ(lock.removed().size(), ours.size());
}

// ---- a damaged or edited checkpoint ------------------------------------------------------

// One named case per field of trainer_state.json: how it is spoiled, and what the one-line
// refusal must name besides the file.
struct BadState {
  const char* name;
  std::function<void(nlohmann::json&)> spoil;
  std::vector<std::string> needles;
};

std::vector<BadState> bad_states() {
  using nlohmann::json;
  return {
      {"format_version_other", [](json& j) { j["format_version"] = 2; }, {"format_version 2"}},
      {"step_negative", [](json& j) { j["step"] = -3; }, {"field 'step' is -3", "at least 1"}},
      {"step_zero", [](json& j) { j["step"] = 0; }, {"field 'step' is 0"}},
      {"step_fraction", [](json& j) { j["step"] = 2.5; }, {"field 'step' is 2.5", "integer"}},
      {"step_text", [](json& j) { j["step"] = "3"; }, {"field 'step' is \"3\"", "integer"}},
      {"step_missing", [](json& j) { j.erase("step"); }, {"field 'step' is missing"}},
      {"step_huge", [](json& j) { j["step"] = 18446744073709551615ULL; }, {"field 'step'"}},
      {"step_beyond_steps", [](json& j) { j["step"] = 4; }, {"field 'step' is 4", "'steps'"}},
      {"step_not_the_directory", [](json& j) { j["step"] = 2; },
       {"field 'step' is 2", "checkpoint-3"}},
      {"steps_zero", [](json& j) { j["steps"] = 0; }, {"field 'steps' is 0"}},
      {"eval_losses_not_a_list", [](json& j) { j["eval_losses"] = 3; },
       {"field 'eval_losses' is 3", "list"}},
      {"eval_loss_after_the_step",
       [](json& j) { j["eval_losses"] = json::array({{{"step", 4}, {"eval_loss", 1.5}}}); },
       {"field 'eval_losses'", "a step up to 'step'"}},
      {"epoch_negative", [](json& j) { j["data_position"]["epoch"] = -1; },
       {"field 'data_position.epoch' is -1"}},
      {"epoch_elsewhere", [](json& j) { j["data_position"]["epoch"] = 7; },
       {"field 'data_position' is epoch 7", "epoch 0 index"}},
      {"index_elsewhere", [](json& j) { j["data_position"]["index"] = 1; },
       {"field 'data_position' is epoch", "index 1"}},
      {"index_text", [](json& j) { j["data_position"]["index"] = "x"; },
       {"field 'data_position.index' is \"x\""}},
      {"position_missing", [](json& j) { j.erase("data_position"); },
       {"field 'data_position.epoch' is missing"}},
      {"rng_cpu_not_hex", [](json& j) { j["rng"]["cpu"] = "zz"; },
       {"field 'rng.cpu' is \"zz\"", "hex"}},
      {"rng_cpu_odd", [](json& j) { j["rng"]["cpu"] = "abc"; }, {"field 'rng.cpu'", "even"}},
      {"rng_cpu_short", [](json& j) { j["rng"]["cpu"] = "00ff"; },
       {"field 'rng.cpu' is 2 bytes", "another torch"}},
      {"rng_cuda_not_hex", [](json& j) { j["rng"]["cuda"] = "--"; }, {"field 'rng.cuda'"}},
      {"model_fingerprint_short", [](json& j) { j["model_fingerprint"] = "0123"; },
       {"field 'model_fingerprint' is \"0123\"", "16 hex digits"}},
      {"base_model_empty", [](json& j) { j["base_model_name_or_path"] = ""; },
       {"field 'base_model_name_or_path'"}},
      {"lora_rank_zero", [](json& j) { j["lora"]["r"] = 0; }, {"field 'lora.r' is 0"}},
      {"lora_alpha_text", [](json& j) { j["lora"]["lora_alpha"] = "big"; },
       {"field 'lora.lora_alpha' is \"big\"", "number"}},
      {"lora_alpha_negative", [](json& j) { j["lora"]["lora_alpha"] = -8.0; },
       {"field 'lora.lora_alpha' is -8.0", "positive"}},
      {"lora_dropout_one", [](json& j) { j["lora"]["lora_dropout"] = 1.5; },
       {"field 'lora.lora_dropout' is 1.5", "[0, 1)"}},
      {"targets_empty", [](json& j) { j["lora"]["target_modules"] = json::array(); },
       {"field 'lora.target_modules' is []"}},
      {"targets_not_names", [](json& j) { j["lora"]["target_modules"] = {1, 2}; },
       {"field 'lora.target_modules' is [1,2]"}},
      {"seq_len_one", [](json& j) { j["seq_len"] = 1; }, {"field 'seq_len' is 1"}},
      {"batch_zero", [](json& j) { j["batch"] = 0; }, {"field 'batch' is 0"}},
      {"grad_accum_negative", [](json& j) { j["grad_accum"] = -2; },
       {"field 'grad_accum' is -2"}},
      {"seed_negative", [](json& j) { j["seed"] = -1; }, {"field 'seed' is -1", "≥ 0"}},
      {"data_fingerprint_upper", [](json& j) { j["data_fingerprint"] = "ABCDEF0123456789"; },
       {"field 'data_fingerprint'", "lower-case hex"}},
      {"data_sequences_zero", [](json& j) { j["data_sequences"] = 0; },
       {"field 'data_sequences' is 0"}},
      {"lr_zero", [](json& j) { j["lr"] = 0.0; }, {"field 'lr' is 0.0", "positive"}},
      {"not_an_object", [](json& j) { j = json::array(); }, {"not a JSON object"}},
  };
}

TEST_F(TrainerResume, EveryBadFieldOfTheStateIsNamed) {
  first_half("edited");
  const auto out = dir_.path() / "edited";
  const auto file = out / "checkpoint-3" / kTrainStateFile;
  const std::string original = file_bytes(file);
  for (const auto& bad : bad_states()) {
    SCOPED_TRACE(bad.name);
    auto j = nlohmann::json::parse(original);
    bad.spoil(j);
    std::ofstream(file, std::ios::trunc) << j.dump(2);
    const std::string what = refused_resume("edited", file, bad.needles);
    EXPECT_EQ(what.find('\n'), std::string::npos) << "one line";
  }
  // The untouched file still resumes.
  std::ofstream(file, std::ios::trunc) << original;
  TinyLoraModel model;
  auto o = options("edited", kSteps);
  Trainer trainer(model, data(o), o, identity());
  EXPECT_TRUE(trainer.resume().has_value());
  EXPECT_EQ(trainer.step_count(), 3);
}

TEST_F(TrainerResume, BadOptimizerStateIsNamed) {
  first_half("optimizer");
  const auto dir = dir_.path() / "optimizer" / "checkpoint-3";
  const auto file = dir / kOptimizerStateFile;
  const OptimizerState original = read_optimizer_state(file);
  struct Case {
    const char* name;
    std::function<void(OptimizerState&)> spoil;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"step_other_than_the_state", [](OptimizerState& s) { s.step = 2; },
       {"its step 2 is not the step 3"}},
      {"moment_nan",
       [](OptimizerState& s) { s.exp_avg[0].second = s.exp_avg[0].second.clone().fill_(NAN); },
       {".exp_avg'", "NaN"}},
      {"square_negative",
       [](OptimizerState& s) {
         s.exp_avg_sq[0].second = s.exp_avg_sq[0].second.clone().fill_(-1.0);
       },
       {".exp_avg_sq'", "negative"}},
      {"unknown_parameter",
       [](OptimizerState& s) {
         s.exp_avg.emplace_back("base_model.model.other.lora_A.weight", s.exp_avg[0].second);
         s.exp_avg_sq.emplace_back("base_model.model.other.lora_A.weight",
                                   s.exp_avg_sq[0].second);
       },
       {"'base_model.model.other.lora_A.weight'", "does not train"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    OptimizerState spoiled = original;
    for (auto& [name, t] : spoiled.exp_avg) t = t.clone();
    for (auto& [name, t] : spoiled.exp_avg_sq) t = t.clone();
    c.spoil(spoiled);
    write_optimizer_state(file, spoiled);
    refused_resume("optimizer", file, c.needles);
  }
}

}  // namespace
}  // namespace lema::trainer
