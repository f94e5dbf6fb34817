// Small Llama-shaped checkpoints for the runtime tests, written with the library's safetensors
// writer: deterministic bytes, odd tensor sizes (so 256-byte packing and page straddling are
// exercised), optionally sharded with an index.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"

namespace lema::test {

/// A fresh directory under the build tree, removed on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ = std::filesystem::path(LEMA_BINARY_DIR) / "test-tmp" /
            (tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter()++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  static int& counter() {
    static int c = 0;
    return c;
  }
  std::filesystem::path path_;
};

struct ModelShape {
  int layers = 3;
  std::uint64_t hidden = 40 * 1024 + 13;  // bytes of a projection; odd on purpose
  std::uint64_t norm = 1000;
  std::uint64_t embed = 300 * 1024 + 7;
  int shards = 1;     // > 1: a sharded directory with model.safetensors.index.json
  bool extra = true;  // an unknown per-layer tensor and a stray top-level one
};

struct TensorSpec {
  std::string name;
  std::uint64_t nbytes;
};

inline std::vector<TensorSpec> model_tensors(const ModelShape& m) {
  std::vector<TensorSpec> t;
  t.push_back({"model.embed_tokens.weight", m.embed});
  for (int l = 0; l < m.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", m.norm});
    t.push_back({p + "self_attn.q_proj.weight", m.hidden});
    t.push_back({p + "self_attn.k_proj.weight", m.hidden / 4 + 1});
    t.push_back({p + "self_attn.v_proj.weight", m.hidden / 4 + 3});
    t.push_back({p + "self_attn.o_proj.weight", m.hidden});
    t.push_back({p + "post_attention_layernorm.weight", m.norm});
    t.push_back({p + "mlp.gate_proj.weight", m.hidden * 2 + 5});
    t.push_back({p + "mlp.up_proj.weight", m.hidden * 2 + 5});
    t.push_back({p + "mlp.down_proj.weight", m.hidden * 2 + 5});
    if (m.extra) t.push_back({p + "self_attn.rotary_emb.inv_freq", 64});
  }
  t.push_back({"model.norm.weight", m.norm});
  t.push_back({"lm_head.weight", m.embed});
  if (m.extra) t.push_back({"zz_extra.scale", 9});
  return t;
}

/// Byte `i` of tensor `name`: a hash, so a byte misplaced anywhere is noticed.
inline std::byte pattern_byte(const std::string& name, std::uint64_t i) {
  std::uint64_t h = std::hash<std::string>{}(name) ^ (i * 0x9E3779B97F4A7C15ull);
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return static_cast<std::byte>(h & 0xff);
}

/// Writes the model into `dir` and returns the path to open (a file, or the directory when
/// sharded).
inline std::filesystem::path write_model(const std::filesystem::path& dir, const ModelShape& m) {
  const auto specs = model_tensors(m);
  std::vector<std::vector<io::TensorToWrite>> shards(static_cast<std::size_t>(m.shards));
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec spec = specs[i];
    io::TensorToWrite t;
    t.name = spec.name;
    t.dtype = io::Dtype::U8;
    t.shape = {static_cast<std::int64_t>(spec.nbytes)};
    t.fill = [name = spec.name](std::span<std::byte> out, std::uint64_t offset) {
      for (std::size_t k = 0; k < out.size(); ++k) out[k] = pattern_byte(name, offset + k);
    };
    shards[i % shards.size()].push_back(std::move(t));
  }
  if (m.shards == 1) {
    const auto path = dir / "model.safetensors";
    io::write_safetensors(path, std::move(shards[0]));
    return path;
  }
  std::string index = "{\"metadata\":{},\"weight_map\":{";
  bool first = true;
  for (int s = 0; s < m.shards; ++s) {
    const std::string file = "model-0000" + std::to_string(s + 1) + "-of-0000" +
                             std::to_string(m.shards) + ".safetensors";
    for (const auto& t : shards[static_cast<std::size_t>(s)]) {
      index += std::string(first ? "" : ",") + "\"" + t.name + "\":\"" + file + "\"";
      first = false;
    }
    io::write_safetensors(dir / file, std::move(shards[static_cast<std::size_t>(s)]));
  }
  index += "}}";
  std::ofstream(dir / "model.safetensors.index.json") << index;
  return dir;
}

/// A tensor's bytes as stored in its file.
inline std::vector<std::byte> file_bytes(const io::Checkpoint& ckpt, const io::TensorInfo& t) {
  std::vector<std::byte> out(t.nbytes);
  std::ifstream in(ckpt.files()[t.file].path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(t.offset));
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  if (!in) throw std::runtime_error("cannot read " + ckpt.files()[t.file].path.string());
  return out;
}

}  // namespace lema::test
