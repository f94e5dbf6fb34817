#include "lema/trainer/train_state.hpp"

#include <spdlog/fmt/fmt.h>
#include <nlohmann/json.hpp>

#include <fstream>
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
  io::write_file_atomically(file, j.dump(2) + "\n");
}

TrainState read_train_state(const std::filesystem::path& file) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(file));
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(file.string() + ": not valid JSON (" + e.what() +
                          "); the checkpoint is damaged, remove it to resume from an older one");
  }
  TrainState s;
  try {
    if (j.at("format_version").get<int>() != kFormatVersion) {
      throw InvalidArgument(file.string() + ": format_version " + j.at("format_version").dump() +
                            " is not " + std::to_string(kFormatVersion) +
                            "; written by another LEMA version");
    }
    s.step = j.at("step").get<std::int64_t>();
    s.data.epoch = j.at("data_position").at("epoch").get<std::uint64_t>();
    s.data.index = j.at("data_position").at("index").get<std::uint64_t>();
    s.rng_cpu = j.at("rng").at("cpu").get<std::string>();
    s.rng_cuda = j.at("rng").at("cuda").get<std::string>();
    s.model_fingerprint = j.at("model_fingerprint").get<std::string>();
    s.base_model_name_or_path = j.at("base_model_name_or_path").get<std::string>();
    const auto& lora = j.at("lora");
    s.lora.rank = lora.at("r").get<std::int64_t>();
    s.lora.alpha = lora.at("lora_alpha").get<double>();
    s.lora.dropout = lora.at("lora_dropout").get<double>();
    s.lora.target_modules = lora.at("target_modules").get<std::vector<std::string>>();
    s.seq_len = j.at("seq_len").get<std::int64_t>();
    s.batch = j.at("batch").get<std::int64_t>();
    s.grad_accum = j.at("grad_accum").get<std::int64_t>();
    s.seed = j.at("seed").get<std::uint64_t>();
    s.data_fingerprint = j.at("data_fingerprint").get<std::string>();
    s.data_sequences = j.at("data_sequences").get<std::uint64_t>();
    s.lr = j.at("lr").get<double>();
    s.steps = j.at("steps").get<std::int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(file.string() + ": missing or malformed field (" + e.what() +
                          "); the checkpoint is damaged or from another program");
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
