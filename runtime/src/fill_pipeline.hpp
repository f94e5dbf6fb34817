// The fill pipeline: reads claimed pages into their chunks and maps them, on a host-visible pool
// through its window, on a device pool through host memory (a slot of the host cache tier, else
// a staging buffer) and a copy on the backend's copy queue. It owns the staging buffers and the
// copies still in flight, and gives their host memory back once the copy completed.
//
// Runs without the page table's lock: a page in the `filling` state belongs to the one thread
// that claimed it, and so do its chunk and its (unmapped) model address. Its own lock guards the
// free staging buffers and the copies in flight, and is a leaf (Note [Pager lock order]).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "device_errors.hpp"
#include "host_page_cache.hpp"
#include "shared_host_cache.hpp"
#include "lema/io/reader.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/stats.hpp"
#include "spill_store.hpp"

namespace lema::runtime {

/// A page given a chunk to fill, and the outcome.
struct FillClaim {
  PageId page = 0;
  std::uint32_t chunk = 0;
  std::exception_ptr error;  // set when the read or the map failed
  Fence ready;               // the copy into a device chunk (see PageEntry::ready)
};

/// Who fills: a caller that faulted (and waits), or the prefetch thread.
enum class FillOrigin { demand, prefetch };

class FillPipeline {
 public:
  /// What fills read from and write to; all must outlive the pipeline. `cache` and `spill` may
  /// be null (no host cache tier; pages not written).
  struct Parts {
    AddressSpace& space;
    Backend& backend;
    PhysicalPool& pool;
    io::Reader& reader;
    HostPageCache* cache = nullptr;
    SpillStore* spill = nullptr;
    SharedHostCache* shared = nullptr;  // the shared host cache tier (below the others)
    /// The shared tier's pages are registered with the backend: copies to a device chunk read
    /// them in place (Note [Registered shared tier]).
    bool shared_registered = false;
    PagerCounters& counters;
    DeviceErrors& device_errors;
    Access access = Access::read;
  };
  explicit FillPipeline(const Parts& parts);
  FillPipeline(const FillPipeline&) = delete;
  FillPipeline& operator=(const FillPipeline&) = delete;
  /// Copies still in flight keep their host memory: drain() first.
  ~FillPipeline();

  /// Whether fills copy into device chunks (a pool without a host window): only then may a
  /// page's bytes still be on their way when it is mapped (Note [Device fills]).
  bool copies_to_device() const noexcept { return copies_to_device_; }

  /// Reads each claim's page into its chunk, then maps the pages read at their model addresses
  /// with one Backend::map_pages call (Note [Map after fill]); when that map fails, every claim
  /// of it fails. Errors are stored per claim; throws nothing but std::bad_alloc. Copies into
  /// device chunks are left running: each claim's `ready` fence says when its bytes are there.
  void fill_and_map(std::span<FillClaim> claims, FillOrigin origin);
  /// Gives back the host memory of completed copies; waits on the host for the oldest ones while
  /// more than `keep` are in flight (bounding pinned staging memory). A copy whose completion
  /// the device cannot confirm keeps its host memory for good (Note [Device errors without a
  /// caller] in pager.cpp).
  void retire_copies(std::size_t keep) noexcept;
  /// For teardown: retires every copy. False when the device could not confirm one of them.
  bool drain() noexcept;

 private:
  struct Fill;  // one claim's fill in progress (fill_pipeline.cpp)
  /// Host memory a copy to the device still reads from: a staging buffer or a host cache slot,
  /// given back once the copy completed.
  struct CopyInFlight {
    Fence copied;
    std::unique_ptr<StagingBuffer> staging;
    std::optional<std::size_t> cache_slot;
    std::optional<std::uint32_t> shared_pin;  // a shared tier slot the copy reads in place
  };

  void start_read(Fill& f, FillOrigin origin);
  void submit_read(Fill& f, FillOrigin origin);
  void wait_shared(Fill& f, FillOrigin origin);
  void abandon_shared(Fill& f) noexcept;
  void finish_read(Fill& f);
  void map_batch(std::span<Fill> fills);
  void give_back_host_memory(std::span<Fill> fills);
  std::unique_ptr<StagingBuffer> take_staging();
  void give_back_staging(std::unique_ptr<StagingBuffer> b);

  AddressSpace& space_;
  const Layout& layout_;
  Backend& backend_;
  PhysicalPool& pool_;
  io::Reader& reader_;
  HostPageCache* cache_;
  SpillStore* spill_;
  SharedHostCache* shared_;
  const bool shared_registered_;
  PagerCounters& counters_;
  DeviceErrors& device_errors_;
  const Access access_;
  const std::uint64_t page_size_;
  const bool copies_to_device_;

  // ---- guarded by mutex_ (a leaf: nothing else is taken while it is held) ----
  std::mutex mutex_;
  std::vector<std::unique_ptr<StagingBuffer>> staging_free_;
  std::deque<CopyInFlight> in_flight_;  // oldest first
  bool leaked_ = false;                 // a copy's host memory was kept for good
};

}  // namespace lema::runtime
