// One reserved virtual range per checkpoint, laid out by a Layout: every tensor has a fixed
// address for the life of the AddressSpace, whether or not its pages are resident. Residency is
// the Pager's business; this class only does the arithmetic.
//
// Thread safety: immutable after construction; const access from any thread is safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "lema/runtime/backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {

/// Pages [first, first + count).
struct PageRange {
  PageId first = 0;
  std::uint32_t count = 0;
  bool empty() const noexcept { return count == 0; }
};

/// A tensor's bytes at its model address.
struct TensorAddress {
  std::byte* data = nullptr;
  std::uint64_t nbytes = 0;
};

class AddressSpace {
 public:
  /// Reserves layout.virtual_bytes() through `backend` (which must outlive this object; the
  /// layout's page size must be a multiple of backend.granularity()). Throws SystemError.
  AddressSpace(Backend& backend, Layout layout);
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;
  AddressSpace(AddressSpace&&) noexcept = default;
  AddressSpace& operator=(AddressSpace&&) noexcept = default;
  ~AddressSpace() = default;

  Backend& backend() const noexcept { return *backend_; }
  const Layout& layout() const noexcept { return layout_; }
  std::byte* base() const noexcept { return reservation_.base(); }
  std::uint64_t size() const noexcept { return reservation_.bytes(); }
  std::uint64_t page_size() const noexcept { return layout_.page_size(); }
  std::size_t page_count() const noexcept { return layout_.page_count(); }

  /// True when `ptr` lies inside the reserved range.
  bool contains(const void* ptr) const noexcept;
  /// nullopt when the checkpoint has no such tensor.
  std::optional<TensorAddress> find(std::string_view name) const;
  /// Throws InvalidArgument naming the tensor when absent.
  TensorAddress tensor(std::string_view name) const;

  std::byte* page_address(PageId page) const noexcept { return base() + page * page_size(); }
  /// The page holding `ptr` (which must be contained).
  PageId page_of(const void* ptr) const noexcept;
  /// The pages [ptr, ptr + bytes) covers (empty for bytes == 0). Throws InvalidArgument when the
  /// range is not inside the address space.
  PageRange pages_of(const void* ptr, std::uint64_t bytes) const;

 private:
  Backend* backend_;
  Layout layout_;
  Reservation reservation_;
};

}  // namespace lema::runtime
