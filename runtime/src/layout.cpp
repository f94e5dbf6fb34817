#include "lema/runtime/layout.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <limits>
#include <string>
#include <tuple>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"

namespace lema::runtime {

std::uint64_t resolve_page_size(std::optional<std::uint64_t> requested, std::uint64_t granularity,
                                std::string_view setting) {
  const std::uint64_t size = requested.value_or(granularity);
  const bool ok =
      size >= granularity && size % granularity == 0 && is_power_of_two(size / granularity);
  LEMA_EXPECTS(ok, std::string(setting) + " " + format_size(size) + " is not a power-of-two multiple of the " +
                       "backend's granularity " + format_size(granularity) + "; use " +
                       format_size(granularity) + ", " + format_size(2 * granularity) + ", " +
                       format_size(4 * granularity) + ", ...");
  return size;
}

namespace {

// Sort key of a tensor: (section, layer, rank inside the layer, name).
// Sections: 0 embedding, 1 layers, 2 tail (model.norm, lm_head, the rest).
struct OrderKey {
  int section = 2;
  std::uint64_t layer = 0;
  int rank = 0;
};

constexpr std::string_view kLayerPrefix = "model.layers.";

// Execution order inside a decoder layer; names are matched as the component after the layer
// prefix ("self_attn.q_proj.weight" contains "q_proj").
constexpr std::array<std::string_view, 9> kLayerOrder = {
    "input_layernorm",          "q_proj",    "k_proj",  "v_proj",   "o_proj",
    "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"};

bool has_component(std::string_view rest, std::string_view component) {
  // Match whole dot-separated components so "q_proj" does not match "xq_proj".
  std::size_t pos = 0;
  while ((pos = rest.find(component, pos)) != std::string_view::npos) {
    const bool start_ok = pos == 0 || rest[pos - 1] == '.';
    const std::size_t end = pos + component.size();
    const bool end_ok = end == rest.size() || rest[end] == '.';
    if (start_ok && end_ok) return true;
    pos = end;
  }
  return false;
}

OrderKey order_key(std::string_view name) {
  OrderKey key;
  if (name.starts_with(kLayerPrefix)) {
    std::string_view rest = name.substr(kLayerPrefix.size());
    std::uint64_t layer = 0;
    auto [ptr, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), layer);
    if (ec == std::errc{} && ptr != rest.data() && ptr < rest.data() + rest.size() && *ptr == '.') {
      key.section = 1;
      key.layer = layer;
      rest = rest.substr(static_cast<std::size_t>(ptr - rest.data()) + 1);
      key.rank = static_cast<int>(kLayerOrder.size());
      for (std::size_t i = 0; i < kLayerOrder.size(); ++i) {
        if (has_component(rest, kLayerOrder[i])) {
          key.rank = static_cast<int>(i);
          break;
        }
      }
      return key;
    }
  }
  if (has_component(name, "embed_tokens")) {
    key.section = 0;
    return key;
  }
  key.section = 2;
  if (name.starts_with("model.norm.") || name == "model.norm") {
    key.rank = 0;
  } else if (name.starts_with("lm_head.") || name == "lm_head") {
    key.rank = 1;
  } else {
    key.rank = 2;
  }
  return key;
}

}  // namespace

Layout Layout::plan(const io::Checkpoint& checkpoint, std::uint64_t page_size) {
  std::vector<std::filesystem::path> files;
  files.reserve(checkpoint.files().size());
  for (const auto& f : checkpoint.files()) files.push_back(f.path);
  return plan(checkpoint.tensors(), std::move(files), page_size);
}

Layout Layout::plan(std::span<const io::TensorInfo> tensors,
                    std::vector<std::filesystem::path> files, std::uint64_t page_size) {
  LEMA_EXPECTS(page_size > 0 && is_power_of_two(page_size) && page_size >= kTensorAlignment,
               "layout: page size " + std::to_string(page_size) +
                   " must be a power of two of at least 256 bytes");
  struct Item {
    OrderKey key;
    const io::TensorInfo* info;
  };
  std::vector<Item> items;
  items.reserve(tensors.size());
  for (const auto& t : tensors) {
    LEMA_EXPECTS(t.file < files.size(), "layout: tensor '" + t.name + "' names file " +
                                            std::to_string(t.file) + " of " +
                                            std::to_string(files.size()));
    items.push_back({order_key(t.name), &t});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return std::tie(a.key.section, a.key.layer, a.key.rank, a.info->name) <
           std::tie(b.key.section, b.key.layer, b.key.rank, b.info->name);
  });

  Layout out;
  out.page_size_ = page_size;
  out.files_ = std::move(files);
  out.tensors_.reserve(items.size());

  std::uint64_t cursor = 0;
  std::size_t group = 0;
  const OrderKey* prev = nullptr;
  for (const Item& item : items) {
    const bool new_group =
        prev != nullptr && (prev->section != item.key.section ||
                            (item.key.section == 1 && prev->layer != item.key.layer));
    if (new_group) {
      cursor = align_up(cursor, page_size);
      ++group;
    }
    cursor = align_up(cursor, kTensorAlignment);
    LEMA_EXPECTS(item.info->nbytes <= std::numeric_limits<std::uint64_t>::max() / 2 - cursor,
                 "layout: tensor '" + item.info->name + "' does not fit in 64-bit offsets");
    out.by_name_.emplace(item.info->name, out.tensors_.size());
    out.tensors_.push_back(
        {item.info->name, cursor, item.info->nbytes, item.info->file, item.info->offset, group});
    out.tensor_bytes_ += item.info->nbytes;
    cursor += item.info->nbytes;
    prev = &item.key;
  }
  const std::uint64_t total = align_up(cursor, page_size);
  const std::uint64_t pages = total / page_size;
  LEMA_EXPECTS(pages < std::numeric_limits<PageId>::max(),
               "layout: " + std::to_string(pages) + " pages of " + format_size(page_size) +
                   " exceed the page id range; raise --page-size");

  // Extents page by page. Tensors are in ascending offset order, so one sweep does it.
  out.page_first_extent_.assign(1, 0);
  std::size_t t = 0;
  for (std::uint64_t p = 0; p < pages; ++p) {
    const std::uint64_t page_begin = p * page_size;
    const std::uint64_t page_end = page_begin + page_size;
    while (t < out.tensors_.size() && out.tensors_[t].offset + out.tensors_[t].nbytes <= page_begin)
      ++t;
    for (std::size_t i = t; i < out.tensors_.size() && out.tensors_[i].offset < page_end; ++i) {
      const TensorPlacement& tp = out.tensors_[i];
      const std::uint64_t begin = std::max(tp.offset, page_begin);
      const std::uint64_t end = std::min(tp.offset + tp.nbytes, page_end);
      if (begin >= end) continue;
      FillExtent e{tp.file, tp.file_offset + (begin - tp.offset), end - begin, begin - page_begin};
      // Tensors adjacent both in the file and in the page become one read.
      if (out.extents_.size() > out.page_first_extent_.back()) {
        FillExtent& last = out.extents_.back();
        if (last.file == e.file && last.file_offset + last.length == e.file_offset &&
            last.page_offset + last.length == e.page_offset) {
          last.length += e.length;
          continue;
        }
      }
      out.extents_.push_back(e);
    }
    out.page_first_extent_.push_back(out.extents_.size());
  }
  return out;
}

void Layout::append_anonymous(std::uint64_t bytes) {
  const std::uint64_t pages = bytes / page_size_ + (bytes % page_size_ != 0 ? 1 : 0);
  LEMA_EXPECTS(pages < std::numeric_limits<PageId>::max() - page_count(),
               "layout: " + format_size(bytes) + " of anonymous memory in pages of " +
                   format_size(page_size_) + " exceed the page id range; ask for less");
  // No extents: each new page ends where it starts (Note [Page source]: a zero page).
  page_first_extent_.insert(page_first_extent_.end(), pages, extents_.size());
  anonymous_bytes_ += pages * page_size_;
}

const TensorPlacement* Layout::find(std::string_view name) const {
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

std::span<const FillExtent> Layout::extents(PageId page) const {
  const std::size_t first = page_first_extent_[page];
  const std::size_t last = page_first_extent_[page + 1];
  return {extents_.data() + first, last - first};
}

std::uint64_t Layout::page_fill_bytes(PageId page) const {
  std::uint64_t n = 0;
  for (const auto& e : extents(page)) n += e.length;
  return n;
}

}  // namespace lema::runtime
