// Computes the Llama model's logits and loss for given token ids and writes them as a safetensors
// file ("logits" [batch, seq, vocab] and "loss" [], float32), for the cross-check against
// transformers and peft.
//
//   trainer_logits_dump MODEL_DIR IDS OUT [--adapter DIR] [--random-adapter SEED [--rank R]
//                       [--alpha A] [--targets q_proj,v_proj] --save-adapter DIR]
//                       [--labels IDS [--mask IDS] [--position-ids IDS]]
//
// IDS: comma-separated token ids, rows separated by ';' (a batch). --random-adapter gives every
// adapter matrix (B too) random values from SEED and --save-adapter writes them in the PEFT layout.
// --labels makes "loss" masked_loss with those labels (and the attention mask and position ids as
// its SequenceLayout), computed with gradients: each adapter matrix's gradient is written as
// "grad:<PEFT key>".
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "lema/io/safetensors_writer.hpp"
#include "lema/trainer/adapter.hpp"
#include "lema/trainer/llama_model.hpp"
#include "lema/trainer/model_config.hpp"
#include "lema/trainer/weights.hpp"

namespace {

using lema::trainer::LlamaModel;

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, sep);) out.push_back(part);
  return out;
}

at::Tensor parse_ids(const std::string& text) {
  std::vector<std::vector<std::int64_t>> rows;
  for (const std::string& row : split(text, ';')) {
    rows.emplace_back();
    for (const std::string& id : split(row, ',')) rows.back().push_back(std::stoll(id));
    if (rows.back().size() != rows.front().size()) throw std::runtime_error("ragged IDS");
  }
  at::Tensor ids = at::empty(
      {static_cast<std::int64_t>(rows.size()), static_cast<std::int64_t>(rows.front().size())},
      at::kLong);
  for (std::size_t r = 0; r < rows.size(); ++r) {
    for (std::size_t c = 0; c < rows[r].size(); ++c) {
      ids[static_cast<std::int64_t>(r)][static_cast<std::int64_t>(c)] = rows[r][c];
    }
  }
  return ids;
}

lema::io::TensorToWrite f32_tensor(const std::string& name, const at::Tensor& tensor) {
  const at::Tensor t = tensor.detach().to(at::kFloat).contiguous();
  return {name, lema::io::Dtype::F32, t.sizes().vec(),
          [t](std::span<std::byte> out, std::uint64_t offset) {
            std::memcpy(out.data(), static_cast<const std::byte*>(t.data_ptr()) + offset,
                        out.size());
          }};
}

int run(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: trainer_logits_dump MODEL_DIR IDS OUT [--adapter DIR] "
                 "[--random-adapter SEED [--rank R] [--alpha A] [--targets LIST] "
                 "--save-adapter DIR]\n";
    return 2;
  }
  const std::string model_dir = argv[1];
  const at::Tensor ids = parse_ids(argv[2]);
  const std::string out = argv[3];
  std::optional<std::string> adapter_dir, save_dir;
  std::optional<std::uint64_t> random_seed;
  lema::trainer::LlamaModelOptions options;
  bool targets_given = false;
  at::Tensor labels;
  lema::trainer::SequenceLayout layout;
  for (int i = 4; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--adapter")
      adapter_dir = value;
    else if (flag == "--save-adapter")
      save_dir = value;
    else if (flag == "--random-adapter")
      random_seed = std::stoull(value);
    else if (flag == "--rank")
      options.lora.rank = std::stoll(value);
    else if (flag == "--alpha")
      options.lora.alpha = std::stod(value);
    else if (flag == "--labels")
      labels = parse_ids(value);
    else if (flag == "--mask")
      layout.attention_mask = parse_ids(value);
    else if (flag == "--position-ids")
      layout.position_ids = parse_ids(value);
    else if (flag == "--targets")
      options.lora.target_modules = split(value, ','), targets_given = true;
    else
      throw std::runtime_error("unknown option " + flag);
  }

  const auto config = lema::trainer::ModelConfig::from_hf_dir(model_dir);
  if (!targets_given) options.lora.target_modules = lema::trainer::lora_target_candidates(config);
  lema::trainer::LoadedAdapter adapter;
  if (adapter_dir) {
    adapter = lema::trainer::load_adapter(*adapter_dir);
    options.lora = adapter.lora;
  }
  LlamaModel model(config, lema::trainer::read_tensors(model_dir), options);
  model.set_training(false);
  if (adapter_dir) model.load_adapter_tensors(adapter.tensors);
  if (random_seed) {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(*random_seed);
    std::map<std::string, at::Tensor> values;
    for (const auto& [name, p] : model.named_trainable()) {
      values[name] = 0.2 * at::randn(p.sizes(), g) / std::sqrt(static_cast<double>(p.size(1)));
    }
    model.load_adapter_tensors(values);
  }
  if (save_dir) {
    lema::trainer::save_adapter(*save_dir, model.named_trainable(), model.options().lora,
                                model_dir);
  }

  std::vector<lema::io::TensorToWrite> tensors;
  if (labels.defined()) {
    const at::Tensor loss = model.masked_loss(ids, labels, layout);
    loss.backward();
    tensors.push_back(f32_tensor("loss", loss));
    for (const auto& [name, p] : model.named_trainable()) {
      tensors.push_back(f32_tensor("grad:" + name, p.grad()));
    }
  }
  c10::NoGradGuard no_grad;
  tensors.push_back(f32_tensor("logits", model.logits(ids, nullptr, layout)));
  if (ids.size(1) >= 2 && !labels.defined()) tensors.push_back(f32_tensor("loss", model.loss(ids)));
  lema::io::write_safetensors(out, std::move(tensors));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
