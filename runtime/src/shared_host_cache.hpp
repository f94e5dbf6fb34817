// The shared host cache tier: pages read from a checkpoint's files kept in one shared memory
// segment per checkpoint, for every process on the machine that opens that checkpoint, so N
// local processes (the ranks of a training job) read each page from disk once, not N times.
// Sits below the pool (and below the private HostPageCache of a device pool): a fill that misses
// every tier above asks it before reading the files. See Note [Shared host cache].
//
// Thread safety: every member may be called from any thread of any attached process; the
// segment's robust process-shared mutex guards its metadata and is a leaf (Note [Pager lock
// order]). A slot handed out by try_begin() with Outcome::fill belongs to the caller until
// publish() or abandon().
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "lema/runtime/layout.hpp"

namespace lema::runtime {

/// What names a checkpoint's shared segment: a SHA-1 over what identifies the files' contents
/// and the page geometry (Note [Shared cache key]).
using SharedCacheKey = std::array<std::uint8_t, 20>;

/// The key of `layout`'s pages: each file's device, inode, size, mtime and ctime (ns) and its
/// safetensors header bytes, plus the page size and count. Throws SystemError naming the file
/// when one cannot be read.
SharedCacheKey shared_cache_key(const Layout& layout);

class SharedHostCache {
 public:
  enum class Outcome {
    copied,  // the page was ready: its bytes are in `dest`
    fill,    // the caller reads the page, then publish() or abandon() the slot
    busy,    // another live process is filling it: wait_and_copy() later
    bypass,  // every slot is being filled: read the page without sharing it
  };

  /// Attaches to the segment of `key` (creating it, `bytes` of pages, when none exists; an
  /// existing one keeps its size), registered as one of its users. A segment left by processes
  /// that died is reused once its header checks out, else rebuilt. Throws InvalidArgument when
  /// `bytes` holds no page or LEMA_SHARED_CACHE_WAIT is not seconds, OutOfMemory when /dev/shm
  /// cannot hold it, SystemError otherwise.
  SharedHostCache(const SharedCacheKey& key, std::uint64_t page_size, std::uint64_t page_count,
                  std::uint64_t bytes);
  /// Unregisters; the last user out removes the segment.
  ~SharedHostCache();
  SharedHostCache(const SharedHostCache&) = delete;
  SharedHostCache& operator=(const SharedHostCache&) = delete;

  /// Never waits (beyond the segment's lock): copies a ready page into `dest` (page_size bytes),
  /// or claims a slot for the caller to fill (`*slot`), or says who else fills it.
  Outcome try_begin(PageId page, std::byte* dest, std::uint32_t* slot);
  /// try_begin() until the page is not busy: its filler publishes, abandons or dies (then the
  /// caller takes the fill over). Never returns busy; returns bypass when a live filler took
  /// longer than LEMA_SHARED_CACHE_WAIT (Note [Slow fillers]): read the page without sharing it.
  Outcome wait_and_copy(PageId page, std::byte* dest, std::uint32_t* slot);
  /// Where the ready page's bytes are in the segment, pinned for the caller (`*slot`) until
  /// unpin(): the slot is not reused meanwhile, so a copy may read them in place (Note
  /// [Registered shared tier] in fill_pipeline.cpp). Null when the page is not ready.
  const std::byte* pin_ready(PageId page, std::uint32_t* slot);
  /// Undoes one pin_ready() of `slot`.
  void unpin(std::uint32_t slot) noexcept;
  /// The caller's fill of `slot` read these bytes (page_size of them): ready for everyone.
  void publish(std::uint32_t slot, const std::byte* bytes);
  /// The caller's fill of `slot` failed: the page is absent again (a waiter fills it).
  void abandon(std::uint32_t slot) noexcept;

  std::uint64_t bytes() const noexcept;        // the pages' bytes (slots × page size)
  const std::string& name() const noexcept;    // the segment's shm name ("/lema-shc-...")
  /// Processes registered now (live or not yet purged), for tests.
  std::uint32_t users() const;
  /// The pages' memory (slots × page size).
  std::byte* data() const noexcept;
  /// For tests: takes the segment's lock and keeps it, as a process that dies in the middle of
  /// an update would.
  void hold_lock_for_test();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The shm name of `key`'s segment (for tests and `lema` tools).
std::string shared_cache_name(const SharedCacheKey& key);

}  // namespace lema::runtime
