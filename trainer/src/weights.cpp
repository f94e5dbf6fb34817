#include "lema/trainer/weights.hpp"

#include <ATen/ops/empty.h>
#include <spdlog/fmt/fmt.h>

#include <cerrno>
#include <fstream>
#include <memory>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/torch/dtype_map.hpp"
#include "lema/torch/virtual_checkpoint.hpp"

namespace lema::trainer {

WeightLookup lookup_in(std::map<std::string, at::Tensor> weights) {
  auto shared = std::make_shared<const std::map<std::string, at::Tensor>>(std::move(weights));
  return [shared](const std::string& name) -> at::Tensor {
    const auto it = shared->find(name);
    if (it == shared->end()) {
      throw InvalidArgument(
          fmt::format("no weight named '{}' among the {} given", name, shared->size()));
    }
    return it->second;
  };
}

WeightLookup lookup_in(const torch::VirtualCheckpoint& checkpoint) {
  return [checkpoint](const std::string& name) { return checkpoint.tensor(name); };
}

std::map<std::string, at::Tensor> read_tensors(const std::filesystem::path& path) {
  const io::Checkpoint checkpoint = io::Checkpoint::open(path);
  std::map<std::string, at::Tensor> out;
  std::vector<std::ifstream> files;
  for (const io::FileInfo& f : checkpoint.files()) files.emplace_back(f.path, std::ios::binary);
  for (const io::TensorInfo& t : checkpoint.tensors()) {
    const std::string& file = checkpoint.files().at(t.file).path.string();
    const auto type = torch::to_scalar_type(t.dtype);
    if (!type) {
      throw io::CheckpointError(file, t.name, "unsupported-dtype",
                                fmt::format("tensor '{}' has dtype {}, which torch cannot hold",
                                            t.name, io::dtype_name(t.dtype)));
    }
    at::Tensor tensor = at::empty(t.shape, at::TensorOptions().dtype(*type));
    std::ifstream& in = files.at(t.file);
    in.seekg(static_cast<std::streamoff>(t.offset));
    in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(t.nbytes));
    if (!in || static_cast<std::uint64_t>(in.gcount()) != t.nbytes) {
      throw io::ReadError(file, t.offset, t.nbytes, errno,
                          fmt::format("reading tensor '{}' failed", t.name));
    }
    out.emplace(t.name, std::move(tensor));
  }
  return out;
}

}  // namespace lema::trainer
