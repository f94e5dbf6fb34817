#include "lema/runtime/address_space.hpp"

#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::runtime {

AddressSpace::AddressSpace(Backend& backend, Layout layout)
    : backend_(&backend), layout_(std::move(layout)) {
  LEMA_EXPECTS(layout_.page_size() % backend.granularity() == 0,
               "address space: page size " + format_size(layout_.page_size()) +
                   " is not a multiple of the " + std::string(backend.name()) +
                   " backend's granularity " + format_size(backend.granularity()));
  // An empty checkpoint still gets one page so the range has an address.
  const std::uint64_t bytes = std::max<std::uint64_t>(layout_.virtual_bytes(), layout_.page_size());
  reservation_ = backend.reserve(bytes);
}

bool AddressSpace::contains(const void* ptr) const noexcept {
  const auto* p = static_cast<const std::byte*>(ptr);
  return p >= base() && p < base() + size();
}

std::optional<TensorAddress> AddressSpace::find(std::string_view name) const {
  const TensorPlacement* t = layout_.find(name);
  if (t == nullptr) return std::nullopt;
  return TensorAddress{base() + t->offset, t->nbytes};
}

TensorAddress AddressSpace::tensor(std::string_view name) const {
  auto t = find(name);
  LEMA_EXPECTS(t.has_value(), "no tensor named '" + std::string(name) + "' in the checkpoint");
  return *t;
}

PageId AddressSpace::page_of(const void* ptr) const noexcept {
  return static_cast<PageId>(
      static_cast<std::uint64_t>(static_cast<const std::byte*>(ptr) - base()) / page_size());
}

PageRange AddressSpace::pages_of(const void* ptr, std::uint64_t bytes) const {
  if (bytes == 0) return {};
  const auto* p = static_cast<const std::byte*>(ptr);
  const std::uint64_t limit = layout_.virtual_bytes();
  const bool inside = p >= base() && static_cast<std::uint64_t>(p - base()) < limit &&
                      bytes <= limit - static_cast<std::uint64_t>(p - base());
  LEMA_EXPECTS(inside, "range of " + std::to_string(bytes) +
                           " bytes is not inside the checkpoint's address space");
  const std::uint64_t begin = static_cast<std::uint64_t>(p - base());
  const auto first = static_cast<PageId>(begin / page_size());
  const auto last = static_cast<PageId>((begin + bytes - 1) / page_size());
  return {first, last - first + 1};
}

}  // namespace lema::runtime
