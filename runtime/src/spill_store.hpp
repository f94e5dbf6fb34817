// The spill store: where a written (dirty) weight page goes when it is evicted, so that a write
// is kept for the life of the checkpoint object and never reaches the checkpoint's files
// (Note [Dirty pages] in pager_evict.cpp).
//
// One private temporary file per store, created unnamed (O_TMPFILE) in $LEMA_SPILL_DIR, else
// $TMPDIR, else /tmp, and a memfd where the file system refuses O_TMPFILE. Page p lives at
// p × page_size (the file is sparse: only spilled pages take space); a bitmap says which pages
// it holds. A page once spilled stays there: every later fill of it reads the store, and a
// later eviction of a dirty copy overwrites it. Nothing is written back to the checkpoint.
//
// Thread safety: every member may be called from any thread; one mutex guards the bitmap and
// the counters (reads and writes of distinct pages may run concurrently; the callers never
// write and read the same page at once).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "lema/base/unique_fd.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {

class SpillStore {
 public:
  /// Creates the backing file. Throws SystemError naming the directory when neither a temporary
  /// file nor a memfd can be made.
  SpillStore(std::size_t page_count, std::uint64_t page_size);
  SpillStore(const SpillStore&) = delete;
  SpillStore& operator=(const SpillStore&) = delete;

  /// Saves the page's bytes (page_size of them at `src`) and marks it spilled. Throws
  /// SystemError (ENOSPC: names the directory and LEMA_SPILL_DIR).
  void write(PageId page, const std::byte* src);
  /// Reads the spilled page into `dest` (page_size bytes). The page must be spilled.
  void read(PageId page, std::byte* dest) const;
  bool holds(PageId page) const;
  /// The page's bytes are no longer wanted (freed anonymous memory): it is no longer spilled,
  /// so its next fill is a zero page, and its file space is given back where the file system
  /// can punch holes.
  void forget(PageId page);

  std::uint64_t spilled_pages() const;
  std::uint64_t bytes_written() const;
  std::uint64_t writes() const;
  std::uint64_t reads() const;
  /// Where the file is ("memfd" when no directory took an unnamed file).
  const std::string& where() const noexcept { return where_; }

 private:
  std::uint64_t page_size_;
  UniqueFd fd_;
  std::string where_;
  mutable std::mutex mutex_;
  std::vector<bool> spilled_;
  std::uint64_t spilled_pages_ = 0;
  std::uint64_t writes_ = 0;
  mutable std::uint64_t reads_ = 0;
};

}  // namespace lema::runtime
