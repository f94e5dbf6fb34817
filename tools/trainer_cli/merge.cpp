// `lema merge`: base weights + a LoRA adapter → one safetensors file of merged weights,
// W' = W + (alpha / r) · B·A for every adapted projection, everything else copied as it is.
//
// Streamed under the budget: the output file is produced piece by piece by the writer, and each
// piece reads only the rows it covers through the pager (pinned while they are read), so neither
// the model nor a whole weight need be in memory at once. Each merged row is computed in float32
// and rounded once to the weight's dtype.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/torch/dtype_map.hpp"
#include "lema/trainer/adapter.hpp"
#include "lema/trainer/model_config.hpp"
#include "model_session.hpp"

namespace lema::tools {
namespace {

namespace fs = std::filesystem;

struct MergeArgs {
  std::string model;
  std::string adapter;
  std::string out;
  bool force = false;
  PagingArgs paging;
};

/// The files of a model directory that describe it besides the weights.
const std::vector<std::string>& companion_files() {
  static const std::vector<std::string> names = {
      "config.json",    "generation_config.json", "tokenizer.model",
      "tokenizer.json", "tokenizer_config.json",  "special_tokens_map.json",
  };
  return names;
}

std::string read_whole(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw SystemError("cannot read " + path.string(), errno);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

/// One adapted projection: its weight and the adapter's matrices.
// W + left · right · scaling, row by row of W as stored: left = B [out, r] and right = A [r, in]
// for a Linear's [out, in] weight, left = Aᵀ [in, r] and right = Bᵀ [r, out] for a Conv1D's
// [in, out] (GPT-2).
struct Delta {
  at::Tensor left;   // float32
  at::Tensor right;  // float32
  double scaling = 1.0;
};

/// Calls `visit(piece, offset_in_tensor, piece_bytes)` for bytes [offset, offset + bytes) of
/// `name`, each piece pinned while it is visited (MappedCheckpoint::read_tensor_range).
template <typename Visit>
void visit_pinned(torch::VirtualCheckpoint& weights, const std::string& name, std::uint64_t offset,
                  std::uint64_t bytes, const Visit& visit) {
  std::uint64_t at = offset;
  weights.mapped().read_tensor_range(name, offset, bytes,
                                     [&](const std::byte* piece, std::uint64_t n) {
                                       visit(piece, at, n);
                                       at += n;
                                     });
}

/// The merged bytes [offset, offset + out.size()) of weight `info`.
void fill_merged(torch::VirtualCheckpoint& weights, const io::TensorInfo& info, const Delta& d,
                 std::span<std::byte> out, std::uint64_t offset) {
  const c10::ScalarType type = *torch::to_scalar_type(info.dtype);
  const std::int64_t cols = info.shape[1];
  const std::uint64_t item = io::dtype_bits(info.dtype) / 8;
  const std::uint64_t row_bytes = static_cast<std::uint64_t>(cols) * item;
  const std::uint64_t first_row = offset / row_bytes;
  const std::uint64_t end_row = (offset + out.size() + row_bytes - 1) / row_bytes;
  // Whole rows are read (and pinned in pieces) so each is merged from all of its columns.
  std::vector<std::byte> rows((end_row - first_row) * row_bytes);
  visit_pinned(weights, info.name, first_row * row_bytes, rows.size(),
               [&](const std::byte* src, std::uint64_t at, std::uint64_t n) {
                 std::memcpy(rows.data() + (at - first_row * row_bytes), src, n);
               });
  const auto row_count = static_cast<std::int64_t>(end_row - first_row);
  const at::Tensor w = at::from_blob(rows.data(), {row_count, cols}, at::TensorOptions(type));
  const at::Tensor left = d.left.narrow(0, static_cast<std::int64_t>(first_row), row_count);
  const at::Tensor merged =
      (w.to(at::kFloat) + at::matmul(left, d.right) * d.scaling).to(type).contiguous();
  const auto* bytes = static_cast<const std::byte*>(merged.data_ptr());
  std::memcpy(out.data(), bytes + (offset - first_row * row_bytes), out.size());
}

void run(const MergeArgs& args) {
  const fs::path out_dir = args.out;
  if (fs::exists(out_dir) && fs::equivalent(out_dir, args.model)) {
    throw InvalidArgument(fmt::format(
        "--out {} is the model directory itself; merge into a new directory", args.out));
  }
  if (fs::exists(out_dir / "model.safetensors") && !args.force) {
    throw InvalidArgument(fmt::format(
        "--out {} already holds model.safetensors; choose another directory or pass --force",
        args.out));
  }
  PagingArgs paging = args.paging;
  paging.mode = "guard";  // the merge pins what it reads
  ModelSession session = ModelSession::open(args.model, paging);
  const trainer::LoadedAdapter adapter = trainer::load_adapter(args.adapter);
  const io::Checkpoint checkpoint = io::Checkpoint::open(args.model);

  // PEFT keys: base_model.model.<module>.lora_A.weight → the weight <module>.weight.
  std::map<std::string, Delta> deltas;
  const std::string prefix = "base_model.model.";
  for (const auto& [key, tensor] : adapter.tensors) {
    const auto a_at = key.rfind(".lora_A.weight");
    if (a_at == std::string::npos) continue;
    const std::string module = key.substr(0, a_at);
    if (module.rfind(prefix, 0) != 0) {
      throw InvalidArgument(
          fmt::format("{}: adapter key '{}' does not start with '{}'", args.adapter, key, prefix));
    }
    std::string weight = module.substr(prefix.size()) + ".weight";
    const auto b_it = adapter.tensors.find(module + ".lora_B.weight");
    if (b_it == adapter.tensors.end()) {
      throw InvalidArgument(
          fmt::format("{}: '{}' has no matching lora_B.weight", args.adapter, key));
    }
    const io::TensorInfo* info = nullptr;
    for (const std::string& name : trainer::checkpoint_names(weight)) {
      if (info == nullptr && (info = checkpoint.find(name)) != nullptr) weight = name;
    }
    if (info == nullptr) {
      throw InvalidArgument(fmt::format("{}: the adapter adapts '{}', which {} does not hold",
                                        args.adapter, weight, args.model));
    }
    const at::Tensor a = tensor.to(at::kFloat);
    const at::Tensor b = b_it->second.to(at::kFloat);
    const bool conv1d = session.config().family == trainer::ModelFamily::kGpt2;
    const std::size_t in_dim = conv1d ? 0 : 1;
    if (info->shape.size() != 2 || a.dim() != 2 || b.dim() != 2 || a.size(0) != b.size(1) ||
        a.size(1) != info->shape[in_dim] || b.size(0) != info->shape[1 - in_dim]) {
      throw InvalidArgument(fmt::format(
          "{}: '{}' is [{}, {}] but lora_A is {} and lora_B is {}; the adapter was trained "
          "for another model",
          args.adapter, weight, info->shape.empty() ? 0 : info->shape[0],
          info->shape.size() < 2 ? 0 : info->shape[1], fmt::join(a.sizes(), "x"),
          fmt::join(b.sizes(), "x")));
    }
    deltas[weight] = conv1d ? Delta{a.t().contiguous(), b.t().contiguous(), adapter.lora.scaling()}
                            : Delta{b, a, adapter.lora.scaling()};
  }
  if (deltas.empty()) {
    throw InvalidArgument(
        fmt::format("{}: the adapter holds no lora_A/lora_B pairs", args.adapter));
  }

  std::vector<io::TensorToWrite> tensors;
  torch::VirtualCheckpoint& weights = session.weights();
  for (const io::TensorInfo& info : checkpoint.tensors()) {
    io::TensorToWrite t{info.name, info.dtype, info.shape, {}};
    if (auto it = deltas.find(info.name); it != deltas.end()) {
      const Delta* d = &it->second;
      t.fill = [&weights, &info, d](std::span<std::byte> out, std::uint64_t offset) {
        fill_merged(weights, info, *d, out, offset);
      };
    } else {
      t.fill = [&weights, &info](std::span<std::byte> out, std::uint64_t offset) {
        visit_pinned(weights, info.name, offset, out.size(),
                     [&](const std::byte* src, std::uint64_t at, std::uint64_t n) {
                       std::memcpy(out.data() + (at - offset), src, n);
                     });
      };
    }
    tensors.push_back(std::move(t));
  }
  fs::create_directories(out_dir);
  for (const std::string& name : companion_files()) {
    const fs::path from = fs::path(args.model) / name;
    if (fs::exists(from)) io::write_file_atomically(out_dir / name, read_whole(from));
  }
  io::write_safetensors(
      out_dir / "model.safetensors", std::move(tensors),
      {{"format", "pt"}, {"merged_adapter", fs::absolute(args.adapter).string()}});
  const auto s = weights.stats();
  std::printf("merged %zu projections of %s with %s into %s; weights: %s; peak resident %s\n",
              deltas.size(), args.model.c_str(), args.adapter.c_str(),
              (out_dir / "model.safetensors").c_str(), session.describe().c_str(),
              format_size(s.peak_resident_bytes).c_str());
}

}  // namespace

void register_merge(CLI::App& app) {
  auto args = std::make_shared<MergeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "merge", "Merge a LoRA adapter into the base weights (streamed under the budget)");
  cmd->add_option("--model", args->model, "Hugging Face model directory")->required();
  cmd->add_option("--adapter", args->adapter, "LoRA adapter directory (PEFT layout)")->required();
  cmd->add_option("--out", args->out, "Output model directory")->required();
  cmd->add_flag("--force", args->force, "Replace an existing model.safetensors in --out");
  add_paging_options(*cmd, args->paging);
  cmd->callback([args] { run(*args); });
}

}  // namespace lema::tools
