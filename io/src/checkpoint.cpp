#include "lema/io/checkpoint.hpp"

#include <algorithm>
#include <set>
#include <system_error>

#include "detail/safetensors_file.hpp"
#include "detail/strict_json.hpp"

namespace lema::io {

namespace fs = std::filesystem;

namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";

// Names come from the files and may be of any length: messages quote an excerpt.
std::string quoted(const std::string& s) {
  return "'" + detail::excerpt(s) + "'";
}

// One shard named by the index, with the tensors the index assigns to it.
struct IndexedShard {
  std::string name;                  // as written in the index, relative to the directory
  std::vector<std::string> tensors;  // sorted (the weight_map is iterated in key order)
};

struct ShardIndex {
  std::map<std::string, std::string> weight_map;  // tensor -> shard name
  std::vector<IndexedShard> shards;               // sorted by name
};

bool escapes_directory(const std::string& name) {
  if (name.empty() || name.find('\0') != std::string::npos) return true;
  const fs::path p(name);
  if (p.is_absolute() || p.has_root_name() || p.has_root_directory()) return true;
  return std::any_of(p.begin(), p.end(), [](const fs::path& part) { return part == ".."; });
}

std::string read_small_file(const fs::path& path, const std::string& label) {
  const detail::RegularFile file = detail::open_regular_file(path, label);
  if (file.size > kMaxHeaderBytes) {
    throw CheckpointError(label, "", "bad-index",
                          "index is " + std::to_string(file.size) + " bytes, over the limit of " +
                              std::to_string(kMaxHeaderBytes));
  }
  std::string text(file.size, '\0');
  detail::pread_exact(file.fd.get(), text.data(), file.size, 0, label, "reading the index");
  return text;
}

ShardIndex read_index(const fs::path& index_path) {
  const std::string label = index_path.string();
  const std::string text = read_small_file(index_path, label);
  nlohmann::json root;
  try {
    root = detail::parse_strict_json(text, label, "index");
  } catch (const CheckpointError& e) {
    throw CheckpointError(label, e.tensor(), "bad-index", e.detail());
  }
  if (!root.is_object() || !root.contains("weight_map") || !root["weight_map"].is_object()) {
    throw CheckpointError(label, "", "bad-index",
                          "index has no \"weight_map\" object mapping tensor names to shard files");
  }
  ShardIndex index;
  std::map<std::string, std::vector<std::string>> by_shard;
  for (const auto& [tensor, shard] : root["weight_map"].items()) {
    if (!shard.is_string()) {
      throw CheckpointError(label, tensor, "bad-index",
                            "weight_map entry of tensor " + quoted(tensor) + " is " +
                                detail::describe_type(shard) + ", expected a shard file name");
    }
    const auto& name = shard.get_ref<const std::string&>();
    if (escapes_directory(name)) {
      throw CheckpointError(label, tensor, "bad-shard-path",
                            "weight_map sends tensor " + quoted(tensor) + " to shard " +
                                quoted(name) +
                                ", which is not a relative path inside the checkpoint directory");
    }
    index.weight_map.emplace(tensor, name);
    by_shard[name].push_back(tensor);
  }
  for (auto& [name, tensors] : by_shard) index.shards.push_back({name, std::move(tensors)});
  return index;
}

}  // namespace

std::uint64_t TensorInfo::numel() const {
  std::uint64_t n = 1;
  for (auto d : shape) n *= static_cast<std::uint64_t>(d);  // validated not to overflow
  return n;
}

namespace {

// Builds the table from files already validated one by one.
struct CheckpointParts {
  std::vector<FileInfo> files;
  std::vector<TensorInfo> tensors;
};

void append_file(CheckpointParts& parts, detail::LoadedFile loaded) {
  const auto index = static_cast<std::uint32_t>(parts.files.size());
  for (auto& t : loaded.header.tensors) {
    t.file = index;
    t.offset += loaded.info.header_bytes;  // relative to the data section -> absolute
    parts.tensors.push_back(std::move(t));
  }
  parts.files.push_back(std::move(loaded.info));
}

CheckpointParts open_sharded(const fs::path& dir) {
  const fs::path index_path = dir / kIndexName;
  const ShardIndex index = read_index(index_path);

  CheckpointParts parts;
  // name -> file index of its first definition, to find names defined twice.
  std::map<std::string, std::uint32_t> defined_in;
  for (const auto& shard : index.shards) {
    const fs::path shard_path = dir / shard.name;
    std::error_code ec;
    if (!fs::exists(shard_path, ec)) {
      const auto& first = shard.tensors.front();
      throw CheckpointError(shard_path.string(), first, "missing-shard",
                            "shard file " + quoted(shard.name) + " does not exist, but " +
                                kIndexName + " places tensor " + quoted(first) +
                                (shard.tensors.size() > 1
                                     ? " and " + std::to_string(shard.tensors.size() - 1) + " more"
                                     : std::string()) +
                                " in it (incomplete download?)");
    }
    const auto file_index = static_cast<std::uint32_t>(parts.files.size());
    auto loaded = detail::load_safetensors_file(shard_path);
    for (const auto& t : loaded.header.tensors) {
      auto [it, inserted] = defined_in.emplace(t.name, file_index);
      if (!inserted) {
        throw CheckpointError(shard_path.string(), t.name, "duplicate-tensor",
                              "tensor " + quoted(t.name) + " is defined both in " +
                                  parts.files[it->second].path.filename().string() + " and in " +
                                  shard.name);
      }
    }
    append_file(parts, std::move(loaded));
  }

  // The index is the truth: each name it lists must be in the shard it names ...
  for (const auto& [tensor, shard_name] : index.weight_map) {
    auto it = defined_in.find(tensor);
    const bool in_named_shard =
        it != defined_in.end() && parts.files[it->second].path == dir / shard_name;
    if (!in_named_shard) {
      throw CheckpointError(
          (dir / shard_name).string(), tensor, "missing-tensor",
          std::string(kIndexName) + " places tensor " + quoted(tensor) + " in " + shard_name +
              ", but that shard does not contain it" +
              (it != defined_in.end()
                   ? " (it is in " + parts.files[it->second].path.filename().string() + ")"
                   : std::string()));
    }
  }
  // ... and a shard may hold nothing the index does not list: otherwise the two disagree about
  // what the checkpoint contains.
  for (const auto& t : parts.tensors) {
    if (!index.weight_map.count(t.name)) {
      throw CheckpointError(parts.files[t.file].path.string(), t.name, "unindexed-tensor",
                            "tensor " + quoted(t.name) +
                                " is in this shard but not in the "
                                "weight_map of " +
                                kIndexName + " (regenerate the index)");
    }
  }
  return parts;
}

CheckpointParts open_plain_directory(const fs::path& dir) {
  std::vector<fs::path> found;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code file_ec;
    if (it->path().extension() == ".safetensors" && it->is_regular_file(file_ec)) {
      found.push_back(it->path());
    }
  }
  if (ec) {
    throw CheckpointError(dir.string(), "", "unreadable",
                          "cannot list the directory: " + ec.message());
  }
  if (found.empty()) {
    throw CheckpointError(dir.string(), "", "no-checkpoint",
                          "directory holds no .safetensors file and no " + std::string(kIndexName));
  }
  std::sort(found.begin(), found.end());
  if (found.size() > 1) {
    std::string names;
    for (std::size_t i = 0; i < found.size() && i < 4; ++i) {
      names += (i ? ", " : "") + found[i].filename().string();
    }
    if (found.size() > 4) names += ", ...";
    throw CheckpointError(dir.string(), "", "ambiguous-directory",
                          "directory holds " + std::to_string(found.size()) +
                              " .safetensors files (" + names + ") and no " + kIndexName +
                              " saying how they form one checkpoint; open one file instead");
  }
  CheckpointParts parts;
  append_file(parts, detail::load_safetensors_file(found.front()));
  return parts;
}

}  // namespace

Checkpoint Checkpoint::open(const fs::path& path) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (!fs::exists(status)) {
    if (ec && ec != std::errc::no_such_file_or_directory && ec != std::errc::not_a_directory) {
      throw CheckpointError(path.string(), "", "unreadable", "cannot access: " + ec.message());
    }
    throw CheckpointError(path.string(), "", "not-found",
                          "no such file or directory; give a .safetensors file or a checkpoint "
                          "directory");
  }

  CheckpointParts parts;
  if (fs::is_directory(status)) {
    parts = fs::exists(path / kIndexName, ec) ? open_sharded(path) : open_plain_directory(path);
  } else {
    parts = CheckpointParts{};
    append_file(parts, detail::load_safetensors_file(path));
  }

  Checkpoint c;
  c.source_ = path;
  c.files_ = std::move(parts.files);
  c.tensors_ = std::move(parts.tensors);
  // Files are appended in order and each file's tensors come sorted by offset, so the table is
  // already ordered by (file, offset).
  c.by_name_.reserve(c.tensors_.size());
  for (std::size_t i = 0; i < c.tensors_.size(); ++i) {
    c.by_name_.emplace(c.tensors_[i].name, i);
    c.total_bytes_ += c.tensors_[i].nbytes;
  }
  return c;
}

const TensorInfo* Checkpoint::find(std::string_view name) const {
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& Checkpoint::at(std::string_view name) const {
  if (const auto* t = find(name)) return *t;
  throw CheckpointError(source_.string(), std::string(name), "no-such-tensor",
                        "no tensor named " + quoted(std::string(name)) + " among the " +
                            std::to_string(tensors_.size()) + " tensors of the checkpoint");
}

}  // namespace lema::io
