// AdamW's moments in a safetensors file (Note [Checkpoint publication] in train_state.hpp).
#include <ATen/ATen.h>

#include <charconv>
#include <cstring>
#include <set>
#include <fstream>
#include <map>
#include <optional>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/torch/dtype_map.hpp"
#include "lema/trainer/train_state.hpp"

namespace lema::trainer {

namespace {

constexpr std::string_view kExpAvg = ".exp_avg";
constexpr std::string_view kExpAvgSq = ".exp_avg_sq";

std::optional<io::Dtype> to_io_dtype(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float:
      return io::Dtype::F32;
    case c10::ScalarType::Double:
      return io::Dtype::F64;
    case c10::ScalarType::Half:
      return io::Dtype::F16;
    case c10::ScalarType::BFloat16:
      return io::Dtype::BF16;
    default:
      return std::nullopt;
  }
}

void add_tensor(std::vector<io::TensorToWrite>& out, const std::string& name,
                const at::Tensor& tensor) {
  const auto dtype = to_io_dtype(tensor.scalar_type());
  LEMA_EXPECTS(dtype.has_value(), "optimizer state '" + name + "' has dtype " +
                                      std::string(c10::toString(tensor.scalar_type())) +
                                      ", which the optimizer file does not store");
  // A CPU copy the writer's callback reads from; kept alive by the callback.
  at::Tensor host = tensor.detach().to(at::kCPU).contiguous();
  const auto nbytes = static_cast<std::uint64_t>(host.nbytes());
  io::TensorToWrite t;
  t.name = name;
  t.dtype = *dtype;
  t.shape.assign(host.sizes().begin(), host.sizes().end());
  t.fill = [host, nbytes](std::span<std::byte> dst, std::uint64_t offset) {
    LEMA_EXPECTS(offset + dst.size() <= nbytes, "optimizer state read past its end");
    std::memcpy(dst.data(), static_cast<const std::byte*>(host.const_data_ptr()) + offset,
                dst.size());
  };
  out.push_back(std::move(t));
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace

void write_optimizer_state(const std::filesystem::path& file, const OptimizerState& state) {
  std::vector<io::TensorToWrite> tensors;
  for (const auto& [name, t] : state.exp_avg) add_tensor(tensors, name + std::string(kExpAvg), t);
  for (const auto& [name, t] : state.exp_avg_sq) {
    add_tensor(tensors, name + std::string(kExpAvgSq), t);
  }
  io::write_safetensors(file, std::move(tensors),
                        {{"format", "lema-adamw"}, {"step", std::to_string(state.step)}});
}

OptimizerState read_optimizer_state(const std::filesystem::path& file) {
  const auto checkpoint = io::Checkpoint::open(file);
  const auto& meta = checkpoint.files().at(0).metadata;
  const auto format = meta.find("format");
  const auto step = meta.find("step");
  if (format == meta.end() || format->second != "lema-adamw" || step == meta.end()) {
    throw InvalidArgument(file.string() +
                          ": not an optimizer state written by LEMA (no format/step metadata)");
  }
  OptimizerState state;
  const std::string& text = step->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), state.step);
  if (ec != std::errc() || end != text.data() + text.size() || state.step < 0) {
    throw InvalidArgument(file.string() + ": metadata step '" + text +
                          "' is not a step count (an integer ≥ 0); the checkpoint is damaged: "
                          "remove " + file.parent_path().string() +
                          " to resume from an older checkpoint");
  }
  std::set<std::string> seen;
  std::ifstream in(file, std::ios::binary);
  if (!in) throw InvalidArgument("cannot read " + file.string());
  for (const auto& info : checkpoint.tensors()) {
    const auto type = torch::to_scalar_type(info.dtype);
    if (!type || !at::isFloatingType(*type)) {
      throw InvalidArgument(file.string() + ": tensor '" + info.name + "' has dtype " +
                            std::string(io::dtype_name(info.dtype)) + ", unusable as state (optimizer moments are floating point)");
    }
    if (!seen.insert(info.name).second) {
      throw InvalidArgument(file.string() + ": tensor '" + info.name + "' appears twice");
    }
    at::Tensor t = at::empty(std::vector<std::int64_t>(info.shape.begin(), info.shape.end()),
                             at::TensorOptions().dtype(*type));
    in.seekg(static_cast<std::streamoff>(info.offset));
    in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(info.nbytes));
    if (!in) throw InvalidArgument(file.string() + ": cannot read tensor '" + info.name + "'");
    if (ends_with(info.name, kExpAvgSq)) {
      state.exp_avg_sq.emplace_back(info.name.substr(0, info.name.size() - kExpAvgSq.size()), t);
    } else if (ends_with(info.name, kExpAvg)) {
      state.exp_avg.emplace_back(info.name.substr(0, info.name.size() - kExpAvg.size()), t);
    } else {
      throw InvalidArgument(file.string() + ": unexpected tensor '" + info.name +
                            "' (expected <parameter>.exp_avg / .exp_avg_sq)");
    }
  }
  return state;
}

}  // namespace lema::trainer
