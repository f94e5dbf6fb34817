// A checkpoint made to look fully resident: the one object a tool or a framework plugin opens.
// It owns the checkpoint's table, the address space and the residency machinery, and owns (or,
// given one of the caller's own, shares) the backend, in one of two modes:
//  - guard: callers make bytes resident around each use (acquire/release on the Pager), over any
//    backend (host, GPU, or the caller's own); what the libtorch plugin's guard does for every
//    op;
//  - fault: userfaultfd demand paging on the host; any code may read the tensors' addresses
//    directly, missing pages are filled by a handler thread under the same budget. Where
//    userfaultfd is refused the checkpoint opens in guard mode and says why (fallback_reason()).
//
// Thread safety: tensor(), read_tensor() and stats() may be called from any threads.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lema/io/checkpoint.hpp"
#include "lema/io/reader.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/policy.hpp"
#include "lema/runtime/stats.hpp"

namespace lema::runtime {

enum class ResidencyMode { guard, fault };

std::optional<ResidencyMode> parse_residency_mode(std::string_view name);
std::string_view residency_mode_name(ResidencyMode mode);

/// How weights on a GPU are kept (MappedCheckpointOptions::cuda_device).
enum class GpuMemory {
  /// The cuda backend: device memory mapped into the model range with the driver's virtual
  /// memory management, filled over a copy stream; the budget is the pool of device memory.
  vmm,
  /// The managed backend: unified memory; the pager prefetches pages to the device ahead of use
  /// and back to the host when it evicts them; GPU page faults serve what the schedule missed.
  managed,
  /// Plain unified memory, the baseline the other two are measured against: the whole model in
  /// managed memory, loaded once on the host, never advised nor prefetched; the driver migrates
  /// pages on the GPU's faults and evicts them when the device is oversubscribed. The pager
  /// cannot bound that, so the budget must hold the whole model.
  unified,
};

std::optional<GpuMemory> parse_gpu_memory(std::string_view name);
std::string_view gpu_memory_name(GpuMemory memory);

struct MappedCheckpointOptions {
  std::uint64_t budget_bytes = 0;
  std::optional<std::uint64_t> page_size;  // nullopt: the backend's granularity
  PolicyKind policy = PolicyKind::lru;
  ResidencyMode mode = ResidencyMode::guard;
  bool prefetch = true;
  /// Take the page pool from the system's huge pages (HostPages::huge): a page is one page-table
  /// entry to map, touch and unmap instead of 512. Guard mode only.
  bool huge_pages = false;
  /// The weights on this GPU instead of in host memory, kept as gpu_memory says. Guard mode
  /// only. With GpuMemory::vmm the pages are not readable by the host, so read_tensor_range()
  /// refuses.
  std::optional<int> cuda_device;
  /// How the GPU's weights are kept (only with cuda_device). managed and unified pages are
  /// readable by the host too.
  GpuMemory gpu_memory = GpuMemory::vmm;
  /// Guard mode over host memory: serve a read of an unmapped page outside any acquire (numpy,
  /// torch.save, a compiled kernel) by demand paging instead of SIGSEGV (Note [Guard fault
  /// fallback] in the runtime). Off only to measure what it costs.
  bool fault_fallback = true;
  /// The host cache tier of a GPU pool (PagerOptions::host_cache_bytes); 0: none.
  std::uint64_t host_cache_bytes = 0;
  /// The shared host cache tier (PagerOptions::shared_host_cache_bytes); 0: none, unless the
  /// LEMA_SHARED_HOST_CACHE environment variable gives a size. Guard mode only.
  std::uint64_t shared_host_cache_bytes = 0;
  /// Weights may be written by default: a written page is kept for the life of the checkpoint
  /// object (in a spill store when evicted; never in the checkpoint's files). read_only maps
  /// them so that a write faults instead (the torch plugin refuses writing ops before they run).
  /// Weights on a GPU are always read-only: their written pages could not be kept yet.
  bool read_only = false;
  /// Fault mode: use userfaultfd write protection to find written pages where the kernel has it
  /// (false: save every evicted page, as where it has not; for tests).
  bool uffd_write_protect = true;
  /// How the checkpoint's files are read (io_uring or pread, queue depth, ...), when
  /// open_reader is empty.
  io::ReaderOptions reader;
  /// How budget and page-size errors name these settings to the user (see SettingNames).
  SettingNames setting_names;
  /// A backend of the caller's own, instead of the one huge_pages / cuda_device / gpu_memory
  /// choose (a test's fake, a backend over another allocator). The checkpoint shares its
  /// ownership; what it is comes from its capabilities() (Note [Backend contract]): weights are
  /// writable only where it tracks_writes, readable by read_tensor() where host_accessible.
  /// Guard mode only.
  std::shared_ptr<Backend> backend;
  /// Anonymous memory after the weights, paged by the same pager (fault mode: the same
  /// userfaultfd region) under the same budget: zero on first touch, written pages kept in the
  /// spill store when evicted (Note [One budget] in allocator/vmm). Host memory only; needs
  /// writable pages (not read_only). anonymous() gives the range; a VmmResource hands it out.
  std::uint64_t anonymous_bytes = 0;
  /// Opens the Reader of the caller's own over the checkpoint's files (given in Layout::files()
  /// order, which extents index), instead of io::Reader::open(files, reader).
  std::function<std::unique_ptr<io::Reader>(const std::vector<std::filesystem::path>& files)>
      open_reader;
};

class MappedCheckpoint {
 public:
  /// Opens `path` (see io::Checkpoint::open) over the backend the options choose: the host's
  /// (huge_pages), a CUDA device's (cuda_device, gpu_memory) or the caller's own (backend).
  /// Throws CheckpointError, BudgetError, InvalidArgument (settings), SystemError, and
  /// CudaUnavailable where a CUDA device was asked for and cannot be used.
  static std::unique_ptr<MappedCheckpoint> open(const std::filesystem::path& path,
                                                MappedCheckpointOptions options);
  /// Anonymous memory only, no checkpoint file: options.anonymous_bytes of it, paged under
  /// options.budget_bytes as open() pages weights (same modes, same fallback from fault to
  /// guard). What a VmmResource of its own opens. Throws what open() throws for its settings.
  static std::unique_ptr<MappedCheckpoint> open_anonymous(MappedCheckpointOptions options);
  virtual ~MappedCheckpoint() = default;

  virtual const io::Checkpoint& checkpoint() const noexcept = 0;
  virtual const Layout& layout() const noexcept = 0;
  /// The mode actually in use (fault may have fallen back to guard).
  virtual ResidencyMode mode() const noexcept = 0;
  /// Why fault mode fell back to guard; empty otherwise.
  virtual const std::string& fallback_reason() const noexcept = 0;
  /// Guard mode: why a read of an unmapped page outside an acquire is not served by the fault
  /// fallback (it then gets SIGSEGV); empty when it is, and in fault mode, where every read is.
  virtual const std::string& fault_fallback_reason() const noexcept;
  /// Whether writes to the weights are kept (false: opened read_only, or weights on a GPU).
  virtual bool writable() const noexcept = 0;

  /// The tensor's fixed address. Throws InvalidArgument naming the tensor when absent.
  virtual TensorAddress tensor(std::string_view name) const = 0;
  /// Calls `visit` with the tensor's bytes at its model address, in order, in pieces that fit
  /// the budget (guard mode pins each piece while it is visited; fault mode visits page by page,
  /// each made resident first). A checkpoint file that cannot be read (EIO, truncated or
  /// rewritten while in use) throws io::ReadError naming the file and offset, in both modes; in
  /// fault mode, code that reads a tensor's address directly gets SIGSEGV instead, after the
  /// error is logged.
  void read_tensor(std::string_view name,
                   const std::function<void(const std::byte*, std::uint64_t)>& visit) {
    read_tensor_range(name, 0, tensor(name).nbytes, visit);
  }
  /// The same for bytes [offset, offset + bytes) of the tensor. Throws InvalidArgument naming
  /// the tensor when the range is outside it.
  virtual void read_tensor_range(
      std::string_view name, std::uint64_t offset, std::uint64_t bytes,
      const std::function<void(const std::byte*, std::uint64_t)>& visit) = 0;
  /// The anonymous memory after the weights (MappedCheckpointOptions::anonymous_bytes), page
  /// aligned; {nullptr, 0} when none was asked for.
  virtual TensorAddress anonymous() const noexcept = 0;
  /// Freed anonymous memory: the whole pages of [ptr, ptr + bytes) (inside anonymous()) are no
  /// longer wanted; fault mode drops them without saving them, and they read as zeros on their
  /// next touch. Guard mode keeps them (they are saved if evicted). The caller guarantees that
  /// no thread uses those bytes any more.
  virtual void discard_anonymous(const std::byte* ptr, std::uint64_t bytes) {
    (void)ptr;
    (void)bytes;
  }
  /// The pager (guard mode only; nullptr in fault mode).
  virtual Pager* pager() noexcept = 0;
  /// Gives the memory of every weight page back, the tensors' addresses kept, and makes it
  /// again; pages refill on their next use (Pager::pause and resume, Note [Pause]). Guard mode
  /// only: fault mode throws InvalidArgument (its pages are served by a fault handler, whose
  /// region pause does not cover yet). Touching a weight while paused is an error: an acquire
  /// throws PagerPaused, a direct read faults.
  void pause();
  void resume();
  /// A training step ended.
  virtual void mark_step() = 0;
  virtual PagerStats stats() const = 0;

 protected:
  /// tensor(name), after checking that [offset, offset + bytes) lies inside it.
  TensorAddress checked_range(std::string_view name, std::uint64_t offset,
                              std::uint64_t bytes) const;
};

}  // namespace lema::runtime
