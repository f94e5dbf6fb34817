// The Backend's public entry points: the caller's preconditions checked once for every backend
// (Note [Backend contract] in backend.hpp), then the backend's primitive.
#include "lema/runtime/backend.hpp"

#include <cstdint>
#include <cstdio>
#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::runtime {
namespace {

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%#llx",
                static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(p)));
  return buf;
}

bool aligned(const void* p, std::uint64_t to) {
  return reinterpret_cast<std::uintptr_t>(p) % to == 0;
}

void check_memory(const Backend& b, const PhysicalPool& pool, const char* op) {
  LEMA_EXPECTS(!pool.memory_released(),
               std::string(op) + ": the " + std::string(b.name()) +
                   " backend's pool memory is released; restore it first "
                   "(restore_pool_memory)");
}

void check_page(const Backend& b, const PhysicalPool& pool, std::size_t chunk,
                const std::byte* addr, const char* op) {
  check_memory(b, pool, op);
  LEMA_EXPECTS(chunk < pool.chunk_count(), std::string(op) + ": chunk " + std::to_string(chunk) +
                                               " is outside the pool of " +
                                               std::to_string(pool.chunk_count()) + " chunks");
  // Pages lie at base + k × page size in a reservation aligned to the granularity, so a page
  // address is aligned to the granularity, not necessarily to the (larger) chunk.
  LEMA_EXPECTS(addr != nullptr && aligned(addr, b.granularity()),
               std::string(op) + ": address " + hex(addr) + " is not aligned to the " +
                   std::string(b.name()) + " backend's granularity of " +
                   format_size(b.granularity()));
}

}  // namespace

Reservation Backend::reserve(std::uint64_t bytes) {
  LEMA_EXPECTS(bytes > 0 && bytes % granularity() == 0,
               "reserve: " + std::to_string(bytes) + " bytes is not a positive multiple of " +
                   format_size(granularity()));
  return do_reserve(bytes);
}

std::unique_ptr<PhysicalPool> Backend::create_pool(std::size_t chunks, std::uint64_t chunk_bytes) {
  LEMA_EXPECTS(chunks > 0 && chunk_bytes > 0 && chunk_bytes % granularity() == 0,
               "create_pool: need at least one chunk of a multiple of " +
                   format_size(granularity()));
  auto pool = do_create_pool(chunks, chunk_bytes);
  // The capabilities are what callers rely on instead of probing: a pool that disagrees is a
  // backend's bug, reported here rather than as wrong bytes later.
  const bool window = pool->window(0) != nullptr;
  if (window != capabilities().host_window)
    throw Error("the " + std::string(name()) + " backend's capabilities say host_window=" +
                (window ? "false" : "true") + " but its pool " +
                (window ? "has" : "has no") + " host window");
  return pool;
}

void Backend::release_pool_memory(PhysicalPool& pool) {
  LEMA_EXPECTS(!pool.memory_released(), "release_pool_memory: the " + std::string(name()) +
                                            " backend's pool memory is released already");
  do_release_pool_memory(pool);
  pool.memory_released_ = true;
}

void Backend::restore_pool_memory(PhysicalPool& pool) {
  LEMA_EXPECTS(pool.memory_released(), "restore_pool_memory: the " + std::string(name()) +
                                           " backend's pool memory was not released");
  do_restore_pool_memory(pool);
  pool.memory_released_ = false;
}

void Backend::do_release_pool_memory(PhysicalPool&) {
  throw InvalidArgument("the " + std::string(name()) +
                        " backend cannot release its pool's memory while keeping the "
                        "addresses (its memory is behind every reserved address, not in a "
                        "pool); close the checkpoint to free it");
}

void Backend::do_restore_pool_memory(PhysicalPool&) {
  throw InvalidArgument("the " + std::string(name()) + " backend cannot restore pool memory");
}

void Backend::map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) {
  check_page(*this, pool, chunk, addr, "map");
  do_map(pool, chunk, addr, access);
}

void Backend::map_pages(PhysicalPool& pool, std::span<const PageMapping> pages, Access access) {
  if (pages.empty()) return;
  for (const PageMapping& p : pages) check_page(*this, pool, p.chunk, p.addr, "map_pages");
  do_map_pages(pool, pages, access);
}

void Backend::do_map_pages(PhysicalPool& pool, std::span<const PageMapping> pages,
                           Access access) {
  std::size_t mapped = 0;
  try {
    for (; mapped < pages.size(); ++mapped)
      do_map(pool, pages[mapped].chunk, pages[mapped].addr, access);
  } catch (...) {
    // The map's error is the one reported; an unmap failing as well is not its cause.
    while (mapped-- > 0) {
      try {
        do_unmap(pages[mapped].addr, pool.chunk_bytes());
      } catch (...) {
      }
    }
    throw;
  }
}

void Backend::unmap(std::byte* addr, std::uint64_t bytes) {
  const std::uint64_t g = granularity();
  LEMA_EXPECTS(addr != nullptr && aligned(addr, g) && bytes > 0 && bytes % g == 0,
               "unmap: [" + hex(addr) + ", +" + std::to_string(bytes) +
                   ") is not a range of whole " + format_size(g) + " pages of the " +
                   std::string(name()) + " backend");
  do_unmap(addr, bytes);
}

bool Backend::set_unmapped_pages(UnmappedPages* pages) noexcept {
  return capabilities().host_pages && do_set_unmapped_pages(pages);
}

std::uint64_t Backend::written_bytes(const std::byte* addr, std::uint64_t bytes) {
  if (!tracks_writes())
    throw InvalidArgument("the " + std::string(name()) +
                          " backend cannot tell which weight pages were written");
  return do_written_bytes(addr, bytes);
}

std::unique_ptr<StagingBuffer> Backend::allocate_staging(std::uint64_t bytes) {
  LEMA_EXPECTS(bytes > 0, "allocate_staging: a staging buffer needs at least one byte");
  return do_allocate_staging(bytes);
}

Fence Backend::copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                             std::span<const std::byte> src) {
  check_memory(*this, pool, "copy_to_chunk");
  LEMA_EXPECTS(chunk < pool.chunk_count() && offset <= pool.chunk_bytes() &&
                   src.size() <= pool.chunk_bytes() - offset,
               "copy_to_chunk: " + std::to_string(src.size()) + " bytes at offset " +
                   std::to_string(offset) + " of chunk " + std::to_string(chunk) +
                   " are out of the pool's " + std::to_string(pool.chunk_count()) +
                   " chunks of " + format_size(pool.chunk_bytes()));
  return do_copy_to_chunk(pool, chunk, offset, src);
}

}  // namespace lema::runtime
