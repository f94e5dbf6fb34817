// The layout planner: where each tensor of a checkpoint lives in the virtual range, and which
// file bytes fill each page.
//
// Tensors are placed layer-major in execution order, not in file order, so one layer is a few
// contiguous pages:
//   1. tensors named *embed_tokens* (the embedding),
//   2. each `model.layers.N.` group in N order; inside a group: input_layernorm, q, k, v, o
//      projections, post_attention_layernorm, gate, up, down projections, then any other
//      tensors of the layer sorted by name,
//   3. model.norm, lm_head, then every other tensor sorted by name.
// Each of these groups (the embedding, every layer, the tail) starts on a page boundary; inside a
// group tensors are packed at 256-byte alignment. The bytes between tensors and after the last
// one of a page are zero.
//
// Thread safety: a Layout is immutable once planned; const access from any thread is safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "lema/runtime/policy.hpp"

namespace lema::io {
class Checkpoint;
struct TensorInfo;
}  // namespace lema::io

namespace lema::runtime {

/// Alignment of every tensor inside a group.
inline constexpr std::uint64_t kTensorAlignment = 256;

/// The page size to use: `requested` (nullopt = the backend's granularity) checked to be a
/// power-of-two multiple of `granularity`. Throws InvalidArgument naming the setting as
/// `setting` ("--page-size" on the command line).
std::uint64_t resolve_page_size(std::optional<std::uint64_t> requested, std::uint64_t granularity,
                                std::string_view setting = "page_size");

/// Bytes of one file that fill part of a page.
struct FillExtent {
  std::uint32_t file = 0;         // index into Layout::files()
  std::uint64_t file_offset = 0;  // absolute offset in the file
  std::uint64_t length = 0;
  std::uint64_t page_offset = 0;  // where the bytes go inside the page
};

/// Where one tensor lives.
struct TensorPlacement {
  std::string name;
  std::uint64_t offset = 0;  // from the start of the virtual range; 256-byte aligned
  std::uint64_t nbytes = 0;
  std::uint32_t file = 0;
  std::uint64_t file_offset = 0;
  std::size_t group = 0;  // index of its group in layout order (0 = first group)
};

class Layout {
 public:
  /// Plans the checkpoint's tensors. `page_size` must already be resolved (resolve_page_size).
  static Layout plan(const io::Checkpoint& checkpoint, std::uint64_t page_size);
  /// Same, from a tensor table and the file list it indexes (for tests and tools).
  static Layout plan(std::span<const io::TensorInfo> tensors,
                     std::vector<std::filesystem::path> files, std::uint64_t page_size);

  std::uint64_t page_size() const noexcept { return page_size_; }
  std::size_t page_count() const noexcept { return page_first_extent_.size() - 1; }
  /// Bytes of the virtual range: page_count() × page_size().
  std::uint64_t virtual_bytes() const noexcept { return page_count() * page_size_; }
  /// Sum of the tensors' bytes.
  std::uint64_t tensor_bytes() const noexcept { return tensor_bytes_; }

  /// Tensors in layout order (ascending offset).
  const std::vector<TensorPlacement>& tensors() const noexcept { return tensors_; }
  /// nullptr when absent.
  const TensorPlacement* find(std::string_view name) const;
  /// The files the extents index (Checkpoint::files() order).
  const std::vector<std::filesystem::path>& files() const noexcept { return files_; }

  /// The fill of page `page`: extents sorted by page_offset, non-overlapping; bytes of the page
  /// that no extent covers are zero.
  std::span<const FillExtent> extents(PageId page) const;
  /// Sum of the extents' lengths of `page` (the bytes a fill reads).
  std::uint64_t page_fill_bytes(PageId page) const;

  /// Appends `bytes` (rounded up to whole pages) of anonymous memory after the tensors: pages no
  /// file fills, zero on their first touch (Note [Page source] in the runtime), for memory
  /// handed out by allocate/deallocate under the same pager and budget as the weights (Note
  /// [One budget] in allocator/vmm). Throws InvalidArgument when the page count overflows.
  void append_anonymous(std::uint64_t bytes);
  /// Where the anonymous pages begin (a page boundary; virtual_bytes() when there are none) and
  /// how many bytes they span.
  std::uint64_t anonymous_offset() const noexcept { return virtual_bytes() - anonymous_bytes_; }
  std::uint64_t anonymous_bytes() const noexcept { return anonymous_bytes_; }

 private:
  std::uint64_t page_size_ = 0;
  std::uint64_t tensor_bytes_ = 0;
  std::uint64_t anonymous_bytes_ = 0;
  std::vector<TensorPlacement> tensors_;
  std::unordered_map<std::string, std::size_t> by_name_;
  std::vector<std::filesystem::path> files_;
  std::vector<FillExtent> extents_;
  std::vector<std::size_t> page_first_extent_ = {0};  // page p: [first[p], first[p+1])
};

}  // namespace lema::runtime
