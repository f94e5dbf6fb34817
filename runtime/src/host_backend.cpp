// The host backend: address space from mmap, physical memory from one memfd.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <new>
#include <string>
#include <utility>

#include "lema/base/error.hpp"
#include "lema/base/memory_mapping.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "detail/reservation_size.hpp"

namespace lema::runtime {
namespace {

// The default granularity is 2 MiB although the OS page is 4 KiB: pages are the unit of fill and
// eviction, and a fill of 2 MiB amortizes the read and map costs (DESIGN.md, "Physical pool").

class HostPool final : public PhysicalPool {
 public:
  HostPool(UniqueFd memfd, MemoryMapping window, std::size_t chunks, std::uint64_t chunk_bytes)
      : memfd_(std::move(memfd)),
        window_(std::move(window)),
        chunks_(chunks),
        chunk_bytes_(chunk_bytes) {}
  std::size_t chunk_count() const noexcept override { return chunks_; }
  std::uint64_t chunk_bytes() const noexcept override { return chunk_bytes_; }
  std::byte* window(std::size_t chunk) const noexcept override {
    return window_.data() + chunk * chunk_bytes_;
  }
  int fd() const noexcept { return memfd_.get(); }

 private:
  // Released in reverse order: the window mapping, then the memfd.
  UniqueFd memfd_;
  MemoryMapping window_;
  std::size_t chunks_;
  std::uint64_t chunk_bytes_;
};

class HostStaging final : public StagingBuffer {
 public:
  explicit HostStaging(std::uint64_t bytes)
      : data_(static_cast<std::byte*>(std::aligned_alloc(4096, align_up(bytes, 4096)))),
        bytes_(bytes) {
    if (data_ == nullptr) throw OutOfMemory("staging buffer of " + format_size(bytes));
  }
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;
  ~HostStaging() override { std::free(data_); }
  std::span<std::byte> bytes() noexcept override { return {data_, bytes_}; }

 private:
  std::byte* data_;
  std::uint64_t bytes_;
};

class HostBackend final : public Backend {
 public:
  explicit HostBackend(std::uint64_t granularity) : granularity_(granularity) {}
  std::string_view name() const noexcept override { return "host"; }
  std::uint64_t granularity() const noexcept override { return granularity_; }
  bool host_accessible() const noexcept override { return true; }

  Reservation reserve(std::uint64_t bytes) override {
    check_reservation_size(bytes, granularity_);
    void* p = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      if (err == ENOMEM)
        throw OutOfMemory("cannot reserve " + format_size(bytes) +
                          " of address space (mmap: ENOMEM); check ulimit -v");
      detail::throw_system_error(__FILE__, __LINE__, "mmap(PROT_NONE reservation)", err);
    }
    return Reservation(this, static_cast<std::byte*>(p), bytes);
  }

  std::unique_ptr<PhysicalPool> create_pool(std::size_t chunks,
                                            std::uint64_t chunk_bytes) override {
    LEMA_EXPECTS(
        chunks > 0 && chunk_bytes > 0 && chunk_bytes % granularity_ == 0,
        "create_pool: need at least one chunk of a multiple of " + format_size(granularity_));
    const std::uint64_t bytes = chunks * chunk_bytes;
    UniqueFd fd(LEMA_SYS_TRY(::memfd_create("lema-pool", MFD_CLOEXEC)));
    if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
      int err = errno;
      if (err == ENOSPC || err == ENOMEM || err == EFBIG)
        throw OutOfMemory("cannot size the page pool to " + format_size(bytes) + ": " +
                          std::to_string(err));
      detail::throw_system_error(__FILE__, __LINE__, "ftruncate(memfd)", err);
    }
    void* w = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (w == MAP_FAILED) detail::throw_system_error(__FILE__, __LINE__, "mmap(pool window)", errno);
    return std::make_unique<HostPool>(std::move(fd), MemoryMapping(w, bytes), chunks, chunk_bytes);
  }

  void map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    auto& host = static_cast<HostPool&>(pool);
    LEMA_EXPECTS(chunk < host.chunk_count(), "map: chunk index out of range");
    const int prot = access == Access::read ? PROT_READ : PROT_READ | PROT_WRITE;
    void* p = ::mmap(addr, host.chunk_bytes(), prot, MAP_FIXED | MAP_SHARED, host.fd(),
                     static_cast<off_t>(chunk * host.chunk_bytes()));
    if (p == MAP_FAILED)
      detail::throw_system_error(__FILE__, __LINE__, "mmap(MAP_FIXED page)", errno);
  }

  void unmap(std::byte* addr, std::uint64_t bytes) override {
    // Replacing the mapping (not munmap) keeps the address reserved: nothing else can be placed
    // there, and a touch faults instead of reading stale memory.
    void* p = ::mmap(addr, bytes, PROT_NONE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
      detail::throw_system_error(__FILE__, __LINE__, "mmap(PROT_NONE unmap)", errno);
  }

  std::unique_ptr<StagingBuffer> allocate_staging(std::uint64_t bytes) override {
    return std::make_unique<HostStaging>(bytes);
  }

  Fence copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                      std::span<const std::byte> src) override {
    LEMA_EXPECTS(chunk < pool.chunk_count() && offset + src.size() <= pool.chunk_bytes(),
                 "copy_to_chunk: out of the chunk");
    std::copy(src.begin(), src.end(), pool.window(chunk) + offset);
    return Fence{};
  }

  Fence record_fence(Queue) override { return Fence{}; }
  bool fence_complete(const Fence&) override { return true; }
  void wait_fence(const Fence&) override {}
  void queue_wait(Queue, const Fence&) override {}

 protected:
  void release(std::byte* base, std::uint64_t bytes) noexcept override { ::munmap(base, bytes); }

 private:
  const std::uint64_t granularity_;
};

}  // namespace

std::unique_ptr<Backend> make_host_backend(std::uint64_t granularity) {
  const auto os_page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  LEMA_EXPECTS(is_power_of_two(granularity) && granularity >= os_page,
               "host backend: granularity " + std::to_string(granularity) +
                   " must be a power of two of at least the OS page size " +
                   std::to_string(os_page));
  return std::make_unique<HostBackend>(granularity);
}

}  // namespace lema::runtime
