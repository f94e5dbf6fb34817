#include "lema/trainer/adapter.hpp"

#include <spdlog/fmt/fmt.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <system_error>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/trainer/model_config.hpp"
#include "lema/trainer/weights.hpp"

namespace lema::trainer {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kConfigFile = kAdapterConfigFile;
constexpr const char* kWeightsFile = kAdapterWeightsFile;

io::Dtype to_io_dtype(at::ScalarType t, const std::string& name) {
  switch (t) {
    case at::kFloat:
      return io::Dtype::F32;
    case at::kBFloat16:
      return io::Dtype::BF16;
    case at::kHalf:
      return io::Dtype::F16;
    case at::kDouble:
      return io::Dtype::F64;
    default:
      throw InvalidArgument(
          fmt::format("adapter tensor '{}' has dtype {}; adapters are saved as "
                      "float32, bfloat16, float16 or float64",
                      name, c10::toString(t)));
  }
}

// The fields peft's LoraConfig has had for many releases; newer ones default when absent.
json adapter_config(const LoraSettings& lora, const std::string& base_model) {
  return json{{"alpha_pattern", json::object()},
              {"auto_mapping", nullptr},
              {"base_model_name_or_path", base_model},
              {"bias", "none"},
              {"fan_in_fan_out", lora.fan_in_fan_out},
              {"inference_mode", true},
              {"init_lora_weights", true},
              {"layers_pattern", nullptr},
              {"layers_to_transform", nullptr},
              {"lora_alpha", lora.alpha},
              {"lora_dropout", lora.dropout},
              {"modules_to_save", nullptr},
              {"peft_type", "LORA"},
              {"r", lora.rank},
              {"rank_pattern", json::object()},
              {"revision", nullptr},
              {"target_modules", lora.target_modules},
              {"task_type", "CAUSAL_LM"},
              {"use_dora", false},
              {"use_rslora", false}};
}

[[noreturn]] void bad_config(const fs::path& file, const std::string& what) {
  throw InvalidArgument(fmt::format("{}: {}", file.string(), what));
}

LoadedAdapter read_config(const fs::path& file) {
  std::ifstream in(file);
  if (!in) {
    bad_config(file,
               "cannot be read; an adapter directory holds adapter_config.json and "
               "adapter_model.safetensors");
  }
  std::stringstream text;
  text << in.rdbuf();
  const json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) bad_config(file, "is not a JSON object");
  if (j.value("peft_type", std::string()) != "LORA") {
    bad_config(file, fmt::format("peft_type is {}; only LoRA adapters (\"LORA\") are supported",
                                 j.contains("peft_type") ? j["peft_type"].dump() : "missing"));
  }
  LoadedAdapter out;
  const auto r = j.find("r");
  if (r == j.end() || !r->is_number_integer() || r->get<std::int64_t>() < 1) {
    bad_config(file, "'r' (the LoRA rank) must be a positive integer");
  }
  out.lora.rank = r->get<std::int64_t>();
  const auto alpha = j.find("lora_alpha");
  out.lora.alpha = alpha != j.end() && alpha->is_number() ? alpha->get<double>() : 8.0;
  const auto dropout = j.find("lora_dropout");
  out.lora.dropout = dropout != j.end() && dropout->is_number() ? dropout->get<double>() : 0.0;
  const auto targets = j.find("target_modules");
  if (targets == j.end() || !targets->is_array() || targets->empty()) {
    bad_config(file,
               "'target_modules' must be a non-empty list of module names (a regular "
               "expression is not supported)");
  }
  out.lora.target_modules.clear();
  for (const json& t : *targets) {
    if (!t.is_string()) bad_config(file, "'target_modules' must list strings");
    out.lora.target_modules.push_back(t.get<std::string>());
  }
  out.lora.fan_in_fan_out = j.value("fan_in_fan_out", false);
  for (const char* flag : {"use_rslora", "use_dora"}) {
    if (j.value(flag, false)) bad_config(file, fmt::format("'{}' is true; not supported", flag));
  }
  for (const char* pattern : {"rank_pattern", "alpha_pattern"}) {
    if (const auto it = j.find(pattern); it != j.end() && it->is_object() && !it->empty()) {
      bad_config(
          file, fmt::format("'{}' is set; per-module ranks and alphas are not supported", pattern));
    }
  }
  if (const auto it = j.find("base_model_name_or_path"); it != j.end() && it->is_string()) {
    out.base_model_name_or_path = it->get<std::string>();
  }
  return out;
}

// Every key is a lora_A/lora_B weight of rank r, and A and B come in pairs.
void check_tensors(const fs::path& file, const LoadedAdapter& a) {
  if (a.tensors.empty()) {
    throw io::CheckpointError(file.string(), "", "empty-adapter", "holds no tensors");
  }
  const std::string a_suffix = ".lora_A.weight", b_suffix = ".lora_B.weight";
  const auto ends_with = [](const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  for (const auto& [name, t] : a.tensors) {
    const bool is_a = ends_with(name, a_suffix), is_b = ends_with(name, b_suffix);
    if (!is_a && !is_b) {
      throw io::CheckpointError(file.string(), name, "not-lora",
                                fmt::format("tensor '{}' is not a LoRA matrix (…lora_A.weight or "
                                            "…lora_B.weight)",
                                            name));
    }
    const std::int64_t rank_dim = is_a ? 0 : 1;
    if (t.dim() != 2 || t.size(rank_dim) != a.lora.rank) {
      throw io::CheckpointError(
          file.string(), name, "bad-shape",
          fmt::format("tensor '{}' has shape {} but r = {} needs a 2-D matrix with {} on "
                      "dimension {}",
                      name, shape_string(t.sizes().vec()), a.lora.rank, a.lora.rank, rank_dim));
    }
    const std::string stem = name.substr(0, name.size() - a_suffix.size());
    const std::string partner = stem + (is_a ? b_suffix : a_suffix);
    if (!a.tensors.count(partner)) {
      throw io::CheckpointError(file.string(), name, "missing-pair",
                                fmt::format("tensor '{}' has no partner '{}'", name, partner));
    }
  }
}

}  // namespace

void save_adapter(const std::filesystem::path& dir,
                  const std::vector<std::pair<std::string, at::Tensor>>& named_tensors,
                  const LoraSettings& lora, const std::string& base_model_name_or_path) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw SystemError(
        fmt::format("cannot create the adapter directory {}: {}", dir.string(), ec.message()),
        ec.value());
  }
  std::vector<io::TensorToWrite> tensors;
  for (const auto& [name, tensor] : named_tensors) {
    const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    tensors.push_back({name, to_io_dtype(t.scalar_type(), name), t.sizes().vec(),
                       [t](std::span<std::byte> out, std::uint64_t offset) {
                         std::memcpy(out.data(),
                                     static_cast<const std::byte*>(t.data_ptr()) + offset,
                                     out.size());
                       }});
  }
  io::write_safetensors(dir / kWeightsFile, std::move(tensors), {{"format", "pt"}});
  io::write_file_atomically(dir / kConfigFile,
                            adapter_config(lora, base_model_name_or_path).dump(2) + "\n");
}

LoadedAdapter load_adapter(const std::filesystem::path& dir) {
  LoadedAdapter out = read_config(dir / kConfigFile);
  const fs::path weights = dir / kWeightsFile;
  if (!fs::exists(weights)) {
    const bool has_bin = fs::exists(dir / "adapter_model.bin");
    throw InvalidArgument(fmt::format(
        "{}: missing{}", weights.string(),
        has_bin ? "; the adapter is stored as adapter_model.bin (pickle), which is not read: "
                  "save it with safetensors"
                : ""));
  }
  out.tensors = read_tensors(weights);
  check_tensors(weights, out);
  return out;
}

}  // namespace lema::trainer
