// `lema inspect`: the tensor table of a checkpoint, per-layer totals, or the same as JSON.
// Only headers are read; opening validates them (errors propagate to main).
#include <spdlog/fmt/fmt.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"

namespace lema::tools {
namespace {

std::string shape_text(const std::vector<std::int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// "model.layers.12" for a layer's tensor; the tensor's own name otherwise.
std::string group_of(const std::string& name) {
  constexpr std::string_view kPrefix = "model.layers.";
  if (name.starts_with(kPrefix)) {
    std::size_t i = kPrefix.size();
    while (i < name.size() && std::isdigit(static_cast<unsigned char>(name[i]))) ++i;
    if (i > kPrefix.size() && i < name.size() && name[i] == '.') return name.substr(0, i);
  }
  return name;
}

// Orders names with their digit runs compared as numbers (layers.2 before layers.10).
bool natural_less(const std::string& a, const std::string& b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = std::isdigit(static_cast<unsigned char>(a[i]));
    const bool db = std::isdigit(static_cast<unsigned char>(b[j]));
    if (da && db) {
      std::size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      // Compare by length once leading zeros are skipped, then digit by digit.
      std::size_t is = i, js = j;
      while (is + 1 < ie && a[is] == '0') ++is;
      while (js + 1 < je && b[js] == '0') ++js;
      if (ie - is != je - js) return ie - is < je - js;
      const int c = a.compare(is, ie - is, b, js, je - js);
      if (c != 0) return c < 0;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]);
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

void print_json(const io::Checkpoint& ckpt) {
  nlohmann::ordered_json doc = nlohmann::ordered_json::object();
  auto& files = doc["files"] = nlohmann::ordered_json::array();
  for (const auto& f : ckpt.files()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : f.metadata) meta[k] = v;
    files.push_back({{"path", f.path.string()},
                     {"header_bytes", f.header_bytes},
                     {"metadata", std::move(meta)}});
  }
  auto& tensors = doc["tensors"] = nlohmann::ordered_json::array();
  for (const auto& t : ckpt.tensors()) {
    tensors.push_back({{"name", t.name},
                       {"dtype", std::string(io::dtype_name(t.dtype))},
                       {"shape", t.shape},
                       {"file", ckpt.files().at(t.file).path.string()},
                       {"offset", t.offset},
                       {"nbytes", t.nbytes}});
  }
  doc["total_bytes"] = ckpt.total_bytes();
  // Names are reproduced as they are; invalid UTF-8 cannot pass validation in the first place.
  fmt::print("{}\n", doc.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace));
}

void print_table(const io::Checkpoint& ckpt) {
  const auto& files = ckpt.files();
  std::size_t name_w = 4, shape_w = 5, file_w = 4;
  for (const auto& t : ckpt.tensors()) {
    name_w = std::max(name_w, t.name.size());
    shape_w = std::max(shape_w, shape_text(t.shape).size());
    file_w = std::max(file_w, files[t.file].path.filename().string().size());
  }
  fmt::print("{:<{}}  {:<7}  {:<{}}  {:<{}}  {:>14}  {:>14}\n", "name", name_w, "dtype", "shape",
             shape_w, "file", file_w, "offset", "bytes");
  for (const auto& t : ckpt.tensors()) {
    fmt::print("{:<{}}  {:<7}  {:<{}}  {:<{}}  {:>14}  {:>14}\n", t.name, name_w,
               io::dtype_name(t.dtype), shape_text(t.shape), shape_w,
               files[t.file].path.filename().string(), file_w, t.offset, t.nbytes);
  }

  struct Group {
    std::size_t tensors = 0;
    std::uint64_t bytes = 0;
  };
  std::map<std::string, Group, decltype(&natural_less)> groups(&natural_less);
  for (const auto& t : ckpt.tensors()) {
    auto& g = groups[group_of(t.name)];
    ++g.tensors;
    g.bytes += t.nbytes;
  }
  std::size_t group_w = 5;
  for (const auto& [name, g] : groups) group_w = std::max(group_w, name.size());
  fmt::print("\n{:<{}}  {:>7}  {:>14}  {:>10}\n", "group", group_w, "tensors", "bytes", "size");
  for (const auto& [name, g] : groups) {
    fmt::print("{:<{}}  {:>7}  {:>14}  {:>10}\n", name, group_w, g.tensors, g.bytes,
               format_size(g.bytes));
  }
  fmt::print("\n{} tensors in {} file{}, total {} ({} bytes)\n", ckpt.tensors().size(),
             files.size(), files.size() == 1 ? "" : "s", format_size(ckpt.total_bytes()),
             ckpt.total_bytes());
  for (const auto& f : files) {
    fmt::print("  {}  header {} bytes", f.path.string(), f.header_bytes);
    if (!f.metadata.empty()) {
      std::vector<std::string> pairs;
      for (const auto& [k, v] : f.metadata) pairs.push_back(k + "=" + v);
      fmt::print("  metadata {}", fmt::join(pairs, " "));
    }
    fmt::print("\n");
  }
}

}  // namespace

void register_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "inspect", "Validate a safetensors checkpoint and print its tensors and per-layer sizes");
  struct Settings {
    std::string path;
    bool json = false;
  };
  auto s = std::make_shared<Settings>();
  cmd->add_option("PATH", s->path,
                  "A .safetensors file, a directory with one, or a sharded directory with "
                  "model.safetensors.index.json")
      ->required();
  cmd->add_flag("--json", s->json,
                "Print {files:[{path,header_bytes,metadata}], tensors:[{name,dtype,shape,file,"
                "offset,nbytes}], total_bytes}; offset is absolute in the file");
  cmd->callback([s] {
    const auto ckpt = io::Checkpoint::open(s->path);
    if (s->json) {
      print_json(ckpt);
    } else {
      print_table(ckpt);
    }
  });
}

}  // namespace lema::tools
