// The host backend: address space from mmap, physical memory from one memfd.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/memory_mapping.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "detail/fork_guard.hpp"

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

std::string huge_page_advice(std::uint64_t pages_needed, const HugePagePool& pool) {
  return "it needs " + std::to_string(pages_needed) + " huge pages of " +
         format_size(pool.page_bytes) + " and the system has " + std::to_string(pool.available) +
         " free; reserve more as root (sysctl vm.nr_hugepages=N, or echo N > "
         "/proc/sys/vm/nr_hugepages), or run without huge pages";
}

class HostBackend final : public Backend {
 public:
  HostBackend(std::uint64_t granularity, HostPages pages)
      : granularity_(granularity), pages_(pages) {}
  std::string_view name() const noexcept override { return "host"; }
  std::uint64_t granularity() const noexcept override { return granularity_; }
  BackendCapabilities capabilities() const noexcept override {
    return {.residency = BackendCapabilities::Residency::mapped,
            .host_window = true,
            .host_accessible = true,
            .host_pages = true,
            .tracks_writes = true};
  }

 private:
  Reservation do_reserve(std::uint64_t bytes) override {
    // Aligned to the granularity, so that every page boundary is one for the pool's memory too
    // (a huge page can be mapped only at an address aligned to its size).
    const std::uint64_t slack = granularity_;
    void* p = ::mmap(nullptr, bytes + slack, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      if (err == ENOMEM)
        throw OutOfMemory("cannot reserve " + format_size(bytes) +
                          " of address space (mmap: ENOMEM); check ulimit -v");
      detail::throw_system_error(__FILE__, __LINE__, "mmap(PROT_NONE reservation)", err);
    }
    auto* raw = static_cast<std::byte*>(p);
    auto* base = reinterpret_cast<std::byte*>(align_up(reinterpret_cast<std::uintptr_t>(raw),
                                                       static_cast<std::uintptr_t>(slack)));
    if (base > raw) ::munmap(raw, static_cast<std::size_t>(base - raw));
    if (std::byte* tail = base + bytes; tail < raw + bytes + slack)
      ::munmap(tail, static_cast<std::size_t>(raw + bytes + slack - tail));
    protect_in_children(base, bytes);  // Note [Fork] in fork_guard.cpp
    return Reservation(this, base, bytes);
  }

  std::unique_ptr<PhysicalPool> do_create_pool(std::size_t chunks,
                                               std::uint64_t chunk_bytes) override {
    const std::uint64_t bytes = chunks * chunk_bytes;
    const bool huge = pages_ == HostPages::huge;
    HugePagePool hugetlb;
    if (huge) {
      hugetlb = huge_page_pool();
      const std::uint64_t needed = bytes / hugetlb.page_bytes;
      if (needed > hugetlb.available)
        throw OutOfMemory("cannot take the page pool of " + format_size(bytes) +
                          " from huge pages: " + huge_page_advice(needed, hugetlb));
    }
    const int fd_flags = MFD_CLOEXEC | (huge ? MFD_HUGETLB : 0);
    const int raw_fd = ::memfd_create(huge ? "lema-pool-huge" : "lema-pool", fd_flags);
    if (raw_fd < 0 && huge)
      throw SystemError("cannot create a huge-page memfd for the page pool (memfd_create with "
                        "MFD_HUGETLB); this kernel may lack hugetlbfs: run without huge pages",
                        errno);
    UniqueFd fd(LEMA_SYS_TRY(raw_fd));
    if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
      int err = errno;
      if (err == ENOSPC || err == ENOMEM || err == EFBIG)
        throw OutOfMemory("cannot size the page pool to " + format_size(bytes) + ": " +
                          std::to_string(err));
      detail::throw_system_error(__FILE__, __LINE__, "ftruncate(memfd)", err);
    }
    // A shared hugetlb mapping takes its huge pages from the pool here, or fails with ENOMEM.
    void* w = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (w == MAP_FAILED) {
      const int err = errno;
      if (huge && err == ENOMEM)
        throw OutOfMemory("cannot take the page pool of " + format_size(bytes) +
                          " from huge pages: " +
                          huge_page_advice(bytes / hugetlb.page_bytes, huge_page_pool()));
      detail::throw_system_error(__FILE__, __LINE__, "mmap(pool window)", err);
    }
    return std::make_unique<HostPool>(std::move(fd), MemoryMapping(w, bytes), chunks, chunk_bytes);
  }

  // Note [Private weight pages]
  // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
  // A page mapped read_write is a MAP_PRIVATE mapping of its chunk: reads share the chunk's
  // memory, and the first write to each system page copies it into private anonymous memory
  // (copy-on-write), so the chunk keeps the bytes the fill put there and the written bytes live
  // only at the model address until the page is unmapped. written_bytes() finds the copies in
  // /proc/self/pagemap (Note [Dirty pages] in pager_evict.cpp); the fill still goes through the
  // shared pool window before the map (Note [Map after fill]). A read-only page stays a
  // MAP_SHARED PROT_READ mapping, which a write cannot change.
  //
  // Huge pages: the copy of a written hugetlb page is another huge page. Mapped with
  // MAP_NORESERVE, a write finding none free would get SIGBUS; without it the kernel reserves
  // one per mapped page at map time and the map fails with ENOMEM instead, before any write.
  // So a writable huge-page pool needs twice its pages free.
  void do_map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    auto& host = static_cast<HostPool&>(pool);
    const bool writable = access == Access::read_write;
    const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
    const int flags = MAP_FIXED | (writable ? MAP_PRIVATE : MAP_SHARED);
    void* p = ::mmap(addr, host.chunk_bytes(), prot, flags, host.fd(),
                     static_cast<off_t>(chunk * host.chunk_bytes()));
    if (p == MAP_FAILED) {
      const int err = errno;
      if (writable && pages_ == HostPages::huge && err == ENOMEM) {
        const HugePagePool hugetlb = huge_page_pool();
        throw OutOfMemory("cannot map a writable weight page of " +
                          format_size(host.chunk_bytes()) +
                          " on huge pages: a written huge page is copied into another one, "
                          "reserved when the page is mapped, and " +
                          huge_page_advice(host.chunk_bytes() / hugetlb.page_bytes, hugetlb) +
                          " (a writable pool needs twice its pages); or open the checkpoint "
                          "read-only");
      }
      detail::throw_system_error(__FILE__, __LINE__, "mmap(MAP_FIXED page)", err);
    }
  }

  std::uint64_t do_written_bytes(const std::byte* addr, std::uint64_t bytes) override {
    // One 8-byte entry per system page: bit 63 present, bit 61 "file page or shared anonymous".
    // A present page of a private file mapping without bit 61 is a private copy: written.
    const std::uint64_t n = bytes / os_page_;
    std::vector<std::uint64_t> entries(static_cast<std::size_t>(n));
    const auto first = reinterpret_cast<std::uintptr_t>(addr) / os_page_;
    const auto want = static_cast<ssize_t>(n * sizeof(std::uint64_t));
    std::call_once(pagemap_once_, [this] {
      pagemap_ = UniqueFd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    });
    if (!pagemap_)
      throw SystemError("cannot open /proc/self/pagemap to find written weight pages", errno);
    const ssize_t got = ::pread(pagemap_.get(), entries.data(), static_cast<std::size_t>(want),
                                static_cast<off_t>(first * sizeof(std::uint64_t)));
    if (got != want)
      detail::throw_system_error(__FILE__, __LINE__, "pread(/proc/self/pagemap)",
                                 got < 0 ? errno : EIO);
    std::uint64_t written = 0;
    for (std::uint64_t e : entries) {
      const bool present = (e >> 63) & 1;
      const bool shared_or_file = (e >> 61) & 1;
      if (present && !shared_or_file) written += os_page_;
    }
    return written;
  }

  void do_unmap(std::byte* addr, std::uint64_t bytes) override {
    if (UnmappedPages* pages = unmapped_pages_.load(std::memory_order_acquire)) {
      pages->place(addr, bytes);
      return;
    }
    // Replacing the mapping (not munmap) keeps the address reserved: nothing else can be placed
    // there, and a touch faults instead of reading stale memory.
    void* p = ::mmap(addr, bytes, PROT_NONE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
      detail::throw_system_error(__FILE__, __LINE__, "mmap(PROT_NONE unmap)", errno);
  }

  bool do_set_unmapped_pages(UnmappedPages* pages) noexcept override {
    unmapped_pages_.store(pages, std::memory_order_release);
    return true;
  }

  // Note [Released pool memory] on the host: punching a hole over the whole memfd frees its
  // pages (to the OS, or back to the hugetlb pool) and keeps its size and the pool window, so
  // restoring needs nothing: the next fill's write through the window allocates again.
  void do_release_pool_memory(PhysicalPool& pool) override {
    auto& host = static_cast<HostPool&>(pool);
    const auto bytes = static_cast<off_t>(host.chunk_count() * host.chunk_bytes());
    if (::fallocate(host.fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, bytes) != 0)
      detail::throw_system_error(__FILE__, __LINE__, "fallocate(PUNCH_HOLE, pool memfd)", errno);
  }
  void do_restore_pool_memory(PhysicalPool&) override {}

  std::unique_ptr<StagingBuffer> do_allocate_staging(std::uint64_t bytes) override {
    return std::make_unique<HostStaging>(bytes);
  }

  Fence do_copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                         std::span<const std::byte> src) override {
    std::copy(src.begin(), src.end(), pool.window(chunk) + offset);
    return Fence{};
  }

  Fence do_record_fence(Queue) override { return Fence{}; }
  bool do_fence_complete(const Fence&) override { return true; }
  void do_wait_fence(const Fence&) override {}
  void do_queue_wait(Queue, const Fence&) override {}

  void release(std::byte* base, std::uint64_t bytes) noexcept override {
    forget_in_children(base);
    ::munmap(base, bytes);
  }

  const std::uint64_t granularity_;
  const HostPages pages_;
  std::atomic<UnmappedPages*> unmapped_pages_{nullptr};
  const std::uint64_t os_page_ = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  std::once_flag pagemap_once_;
  UniqueFd pagemap_;
};

std::uint64_t read_number(const std::string& path) {
  std::ifstream in(path);
  std::uint64_t n = 0;
  return (in >> n) ? n : 0;
}

}  // namespace

HugePagePool huge_page_pool() {
  HugePagePool pool;
  std::ifstream meminfo("/proc/meminfo");
  for (std::string key; meminfo >> key;) {
    if (key == "Hugepagesize:") {
      std::uint64_t kib = 0;
      if (meminfo >> kib) pool.page_bytes = kib * 1024;
      break;
    }
  }
  if (pool.page_bytes == 0) return pool;
  const std::string dir =
      "/sys/kernel/mm/hugepages/hugepages-" + std::to_string(pool.page_bytes / 1024) + "kB/";
  const std::uint64_t free_pages = read_number(dir + "free_hugepages");
  const std::uint64_t promised = read_number(dir + "resv_hugepages");
  // Pages the kernel may add beyond the pool on demand (vm.nr_overcommit_hugepages).
  const std::uint64_t overcommit = read_number(dir + "nr_overcommit_hugepages");
  const std::uint64_t surplus = read_number(dir + "surplus_hugepages");
  pool.available = (free_pages > promised ? free_pages - promised : 0) +
                   (overcommit > surplus ? overcommit - surplus : 0);
  return pool;
}

std::unique_ptr<Backend> make_host_backend(std::uint64_t granularity, HostPages pages) {
  const auto os_page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  LEMA_EXPECTS(is_power_of_two(granularity) && granularity >= os_page,
               "host backend: granularity " + std::to_string(granularity) +
                   " must be a power of two of at least the OS page size " +
                   std::to_string(os_page));
  if (pages == HostPages::huge) {
    const HugePagePool pool = huge_page_pool();
    if (pool.page_bytes == 0)
      throw InvalidArgument(
          "huge pages were asked for, but this kernel has no hugetlb pool (no Hugepagesize in "
          "/proc/meminfo); run without huge pages");
    LEMA_EXPECTS(granularity % pool.page_bytes == 0,
                 "host backend: with huge pages the page size must be a multiple of the "
                 "system's huge page size " +
                     format_size(pool.page_bytes) + ", not " + format_size(granularity));
  }
  return std::make_unique<HostBackend>(granularity, pages);
}

}  // namespace lema::runtime
