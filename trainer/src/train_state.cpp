#include "lema/trainer/train_state.hpp"

#include <spdlog/fmt/fmt.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"

namespace lema::trainer {

namespace {

constexpr int kFormatVersion = 1;

class Fnv1a {
 public:
  void add(std::string_view bytes) {
    for (const char c : bytes) {
      h_ ^= static_cast<unsigned char>(c);
      h_ *= 0x100000001B3ULL;
    }
  }
  std::uint64_t value() const { return h_; }

 private:
  std::uint64_t h_ = 0xCBF29CE484222325ULL;
};

std::string hex64(std::uint64_t v) {
  return fmt::format("{:016x}", v);
}

std::string read_text_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw InvalidArgument("cannot read " + file.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ",") + s;
  return out;
}

}  // namespace

std::string model_fingerprint(const std::filesystem::path& model_dir) {
  Fnv1a h;
  const auto config = model_dir / "config.json";
  std::error_code ec;
  if (std::filesystem::is_regular_file(config, ec)) h.add(read_text_file(config));
  h.add("\n");
  const auto checkpoint = io::Checkpoint::open(model_dir);
  for (const auto& t : checkpoint.tensors()) {
    h.add(t.name);
    h.add(" ");
    h.add(io::dtype_name(t.dtype));
    for (const auto d : t.shape) h.add(" " + std::to_string(d));
    h.add("\n");
  }
  return hex64(h.value());
}

void write_train_state(const std::filesystem::path& file, const TrainState& s) {
  nlohmann::ordered_json j;
  j["format_version"] = kFormatVersion;
  j["step"] = s.step;
  j["data_position"] = {{"epoch", s.data.epoch}, {"index", s.data.index}};
  j["rng"] = {{"cpu", s.rng_cpu}, {"cuda", s.rng_cuda}};
  j["model_fingerprint"] = s.model_fingerprint;
  j["base_model_name_or_path"] = s.base_model_name_or_path;
  j["lora"] = {{"r", s.lora.rank},
               {"lora_alpha", s.lora.alpha},
               {"lora_dropout", s.lora.dropout},
               {"target_modules", s.lora.target_modules}};
  j["seq_len"] = s.seq_len;
  j["batch"] = s.batch;
  j["grad_accum"] = s.grad_accum;
  j["seed"] = s.seed;
  j["data_fingerprint"] = s.data_fingerprint;
  j["data_sequences"] = s.data_sequences;
  j["lr"] = s.lr;
  j["steps"] = s.steps;
  if (!s.eval_losses.empty()) {
    j["eval_losses"] = nlohmann::ordered_json::array();
    for (const auto& [step, loss] : s.eval_losses) {
      j["eval_losses"].push_back({{"step", step}, {"eval_loss", loss}});
    }
  }
  io::write_file_atomically(file, j.dump(2) + "\n");
}

namespace {

// Note [Reading trainer_state.json]
// Every field is checked for its JSON type and its range before it is used, and a bad one is
// refused in one line naming the file, the field, the value and what to do. nlohmann's get<>
// alone would convert silently: -3 into 2^64 - 3 for an unsigned field, 2.5 into 2 for an
// integer one. Consistency with the run and with the other files of the checkpoint (the
// directory's step, the data position, the optimizer's step) is Trainer::resume_from's.
class StateFields {
 public:
  StateFields(const std::filesystem::path& file, const nlohmann::json& root)
      : file_(file), root_(root) {}

  [[noreturn]] void bad(std::string_view field, const std::string& value,
                        std::string_view rule) const {
    throw_bad_state_field(file_, field, value, rule);
  }

  const nlohmann::json& at(std::string_view field) const {
    const nlohmann::json* j = &root_;
    std::string_view rest = field;
    while (!rest.empty()) {
      const auto dot = rest.find('.');
      const std::string key(rest.substr(0, dot));
      if (!j->is_object() || !j->contains(key)) bad(field, "missing", "it must be present");
      j = &(*j)[key];
      rest = dot == std::string_view::npos ? std::string_view() : rest.substr(dot + 1);
    }
    return *j;
  }

  std::int64_t integer(std::string_view field, std::int64_t min) const {
    const auto& j = at(field);
    if (!j.is_number_integer()) bad(field, shown(j), "it must be an integer");
    if (j.is_number_unsigned() && j.get<std::uint64_t>() > std::numeric_limits<std::int64_t>::max())
      bad(field, shown(j), "it is beyond the range of a step count");
    const auto v = j.get<std::int64_t>();
    if (v < min) bad(field, shown(j), fmt::format("it must be at least {}", min));
    return v;
  }

  std::uint64_t unsigned_integer(std::string_view field, std::uint64_t min = 0) const {
    const auto& j = at(field);
    if (!j.is_number_integer()) bad(field, shown(j), "it must be an integer");
    if (!j.is_number_unsigned()) bad(field, shown(j), "it must be ≥ 0");
    const auto v = j.get<std::uint64_t>();
    if (v < min) bad(field, shown(j), fmt::format("it must be at least {}", min));
    return v;
  }

  double number(std::string_view field, bool (*ok)(double), std::string_view rule) const {
    const auto& j = at(field);
    if (!j.is_number()) bad(field, shown(j), "it must be a number");
    const auto v = j.get<double>();
    if (!std::isfinite(v) || !ok(v)) bad(field, shown(j), rule);
    return v;
  }

  std::string string(std::string_view field, bool allow_empty = false) const {
    const auto& j = at(field);
    if (!j.is_string()) bad(field, shown(j), "it must be a string");
    auto v = j.get<std::string>();
    if (v.empty() && !allow_empty) bad(field, shown(j), "it must not be empty");
    return v;
  }

  // Lower-case hex digits; `digits` of them when nonzero, else an even number.
  std::string hex(std::string_view field, std::size_t digits, bool allow_empty = false) const {
    auto v = string(field, allow_empty);
    const bool all_hex = std::all_of(v.begin(), v.end(), [](char c) {
      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
    });
    if (!all_hex) bad(field, shown(at(field)), "it must be lower-case hex digits");
    if (digits != 0 && v.size() != digits) {
      bad(field, shown(at(field)), fmt::format("it must be {} hex digits", digits));
    }
    if (digits == 0 && v.size() % 2 != 0) {
      bad(field, shown(at(field)), "it must be an even number of hex digits (whole bytes)");
    }
    return v;
  }

  std::vector<std::string> strings(std::string_view field) const {
    const auto& j = at(field);
    if (!j.is_array() || j.empty()) bad(field, shown(j), "it must be a non-empty list of names");
    std::vector<std::string> out;
    for (const auto& item : j) {
      if (!item.is_string() || item.get<std::string>().empty()) {
        bad(field, shown(j), "it must be a non-empty list of names");
      }
      out.push_back(item.get<std::string>());
    }
    return out;
  }

 private:
  static std::string shown(const nlohmann::json& j) {
    std::string text = j.dump();
    if (text.size() > 40) text = text.substr(0, 37) + "...";
    return text;
  }

  const std::filesystem::path& file_;
  const nlohmann::json& root_;
};

}  // namespace

void throw_bad_state_field(const std::filesystem::path& file, std::string_view field,
                           const std::string& value, std::string_view rule) {
  throw InvalidArgument(fmt::format(
      "{}: field '{}' is {}; {}. The checkpoint is damaged or was edited: remove {} to resume "
      "from an older checkpoint, or train into another --out",
      file.string(), field, value, rule, file.parent_path().string()));
}

TrainState read_train_state(const std::filesystem::path& file) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(file));
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(file.string() + ": not valid JSON (" + e.what() +
                          "); the checkpoint is damaged, remove it to resume from an older one");
  }
  if (!j.is_object()) {
    throw InvalidArgument(file.string() + ": not a JSON object; the checkpoint is damaged, "
                                          "remove it to resume from an older one");
  }
  const StateFields f(file, j);
  const auto& version = f.at("format_version");
  if (!version.is_number_integer() || version.get<std::int64_t>() != kFormatVersion) {
    throw InvalidArgument(file.string() + ": format_version " + version.dump() + " is not " +
                          std::to_string(kFormatVersion) + "; written by another LEMA version");
  }
  TrainState s;
  s.steps = f.integer("steps", 1);
  s.step = f.integer("step", 1);  // a checkpoint is written after a step, never before the first
  if (s.step > s.steps) {
    f.bad("step", std::to_string(s.step),
          fmt::format("it must not exceed the field 'steps' ({}) of the run that wrote it", s.steps));
  }
  s.data.epoch = f.unsigned_integer("data_position.epoch");
  s.data.index = f.unsigned_integer("data_position.index");
  s.rng_cpu = f.hex("rng.cpu", 0);
  s.rng_cuda = f.hex("rng.cuda", 0, /*allow_empty=*/true);
  s.model_fingerprint = f.hex("model_fingerprint", 16);
  s.base_model_name_or_path = f.string("base_model_name_or_path");
  s.lora.rank = f.integer("lora.r", 1);
  s.lora.alpha = f.number("lora.lora_alpha", [](double v) { return v > 0; }, "it must be positive");
  s.lora.dropout = f.number("lora.lora_dropout", [](double v) { return v >= 0 && v < 1; },
                            "it must be in [0, 1)");
  s.lora.target_modules = f.strings("lora.target_modules");
  s.seq_len = f.integer("seq_len", 2);
  s.batch = f.integer("batch", 1);
  s.grad_accum = f.integer("grad_accum", 1);
  s.seed = f.unsigned_integer("seed");
  s.data_fingerprint = f.hex("data_fingerprint", 16);
  s.data_sequences = f.unsigned_integer("data_sequences", 1);
  s.lr = f.number("lr", [](double v) { return v > 0; }, "it must be positive");
  // Only a record, but read back so that a resumed run keeps it: each entry a step of this run
  // and a finite loss.
  if (const auto it = j.find("eval_losses"); it != j.end()) {
    if (!it->is_array()) f.bad("eval_losses", it->dump().substr(0, 60), "it must be a list");
    for (const auto& e : *it) {
      const auto step = e.is_object() ? e.find("step") : e.end();
      const auto loss = e.is_object() ? e.find("eval_loss") : e.end();
      if (step == e.end() || loss == e.end() || !step->is_number_integer() ||
          step->get<std::int64_t>() < 1 || step->get<std::int64_t>() > s.step ||
          !loss->is_number() || !std::isfinite(loss->get<double>())) {
        f.bad("eval_losses", e.dump().substr(0, 60),
              "each entry must be {\"step\": a step up to 'step', \"eval_loss\": a finite number}");
      }
      s.eval_losses.emplace_back(step->get<std::int64_t>(), loss->get<double>());
    }
  }
  return s;
}

void check_resumable(const TrainState& saved, const TrainState& now,
                     const std::filesystem::path& checkpoint_dir) {
  auto differ = [&](const std::string& setting, const std::string& then, const std::string& current,
                    const std::string& advice) {
    throw InvalidArgument("cannot resume from " + checkpoint_dir.string() + ": it was trained " +
                          "with " + setting + " " + then + ", this run has " + setting + " " +
                          current + "; " + advice);
  };
  const std::string same = "use the same setting or another --out";
  if (saved.model_fingerprint != now.model_fingerprint) {
    differ("the model",
           saved.base_model_name_or_path + " (fingerprint " + saved.model_fingerprint + ")",
           now.base_model_name_or_path + " (fingerprint " + now.model_fingerprint + ")",
           "resume with the model it was trained on or use another --out");
  }
  auto number = [](auto v) { return fmt::format("{}", v); };
  if (saved.lora.rank != now.lora.rank) {
    differ("--lora-rank", number(saved.lora.rank), number(now.lora.rank), same);
  }
  if (saved.lora.alpha != now.lora.alpha) {
    differ("--lora-alpha", number(saved.lora.alpha), number(now.lora.alpha), same);
  }
  if (saved.lora.dropout != now.lora.dropout) {
    differ("--lora-dropout", number(saved.lora.dropout), number(now.lora.dropout), same);
  }
  if (saved.lora.target_modules != now.lora.target_modules) {
    differ("--lora-targets", join(saved.lora.target_modules), join(now.lora.target_modules), same);
  }
  if (saved.seq_len != now.seq_len) {
    differ("--seq-len", number(saved.seq_len), number(now.seq_len), same);
  }
  if (saved.batch != now.batch) differ("--batch", number(saved.batch), number(now.batch), same);
  if (saved.grad_accum != now.grad_accum) {
    differ("--grad-accum", number(saved.grad_accum), number(now.grad_accum), same);
  }
  if (saved.seed != now.seed) differ("--seed", number(saved.seed), number(now.seed), same);
  if (saved.data_fingerprint != now.data_fingerprint ||
      saved.data_sequences != now.data_sequences) {
    differ("--data",
           number(saved.data_sequences) + " sequences (fingerprint " + saved.data_fingerprint + ")",
           number(now.data_sequences) + " sequences (fingerprint " + now.data_fingerprint + ")",
           "resume with the data it was trained on or use another --out");
  }
}

}  // namespace lema::trainer
