// MappedCheckpoint: mode selection and the guard-mode implementation.
#include "lema/runtime/mapped_checkpoint.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/cuda_backend.hpp"
#include "detail/guard_fallback.hpp"
#include "mapped_checkpoint_fault.hpp"

namespace lema::runtime {

std::optional<ResidencyMode> parse_residency_mode(std::string_view name) {
  if (name == "guard") return ResidencyMode::guard;
  if (name == "fault") return ResidencyMode::fault;
  return std::nullopt;
}

std::string_view residency_mode_name(ResidencyMode mode) {
  return mode == ResidencyMode::guard ? "guard" : "fault";
}

std::optional<GpuMemory> parse_gpu_memory(std::string_view name) {
  if (name == "vmm") return GpuMemory::vmm;
  if (name == "managed") return GpuMemory::managed;
  if (name == "unified") return GpuMemory::unified;
  return std::nullopt;
}

std::string_view gpu_memory_name(GpuMemory memory) {
  switch (memory) {
    case GpuMemory::vmm: return "vmm";
    case GpuMemory::managed: return "managed";
    case GpuMemory::unified: return "unified";
  }
  return "?";
}

namespace {

std::shared_ptr<Backend> make_backend(const MappedCheckpointOptions& options) {
  if (options.backend) return options.backend;
  if (!options.cuda_device)
    return make_host_backend(std::uint64_t{2} << 20,
                             options.huge_pages ? HostPages::huge : HostPages::base);
  // A build without the CUDA toolkit throws CudaUnavailable saying so.
  CudaBackendOptions cuda;
  cuda.device = *options.cuda_device;
  if (options.gpu_memory == GpuMemory::vmm) return make_cuda_backend(cuda);
  cuda.managed_prefetch = options.gpu_memory == GpuMemory::managed;
  return make_managed_backend(cuda);
}

// Plain unified memory holds every page at its own address: the pager keeps them all mapped
// (a page it evicted would only be read from the files again) and the driver does the paging.
std::uint64_t pager_budget(const MappedCheckpointOptions& options, const Layout& layout) {
  if (!options.cuda_device || options.gpu_memory != GpuMemory::unified) return options.budget_bytes;
  if (options.budget_bytes < layout.virtual_bytes())
    throw InvalidArgument(
        "unified GPU memory leaves the paging to the driver, which no budget can bound: the "
        "budget " + format_size(options.budget_bytes) + " must hold the whole model (" +
        format_size(layout.virtual_bytes()) + "); give an unlimited budget, and limit the "
        "device's memory to oversubscribe it");
  return layout.virtual_bytes();
}

// Note [Dirty pages] in the pager: written pages are kept in a spill store, which only the host
// backend can feed (it finds the written pages); GPU pages stay read-only until theirs can be.
bool writable_weights(const MappedCheckpointOptions& options, const Backend& backend) {
  return !options.read_only && !options.cuda_device && backend.tracks_writes();
}



class GuardedCheckpoint final : public MappedCheckpoint {
 public:
  GuardedCheckpoint(io::Checkpoint checkpoint, MappedCheckpointOptions options,
                    std::string fallback_reason)
      : checkpoint_(std::move(checkpoint)),
        backend_(make_backend(options)),
        space_(*backend_, detail::plan_layout(checkpoint_, options, backend_->granularity())),
        pager_(space_, detail::open_reader(options, space_.layout()),
               PagerOptions{.budget_bytes = pager_budget(options, space_.layout()),
                            .policy = options.policy,
                            .prefetch = options.prefetch,
                            .access = writable_weights(options, *backend_) ? Access::read_write
                                                                           : Access::read,
                            .reader = options.reader,
                            .host_cache_bytes = options.host_cache_bytes,
                            .shared_host_cache_bytes = options.shared_host_cache_bytes,
                            .setting_names = options.setting_names}),
        fallback_reason_(std::move(fallback_reason)),
        writable_(writable_weights(options, *backend_)) {
    arm_fault_fallback(options, checkpoint_.source().empty() ? std::string("anonymous memory")
                                                             : checkpoint_.source().string());
  }

  ~GuardedCheckpoint() override {
    // The pager's teardown still places registered pages: the fallback stops serving now and
    // goes after the pager (detail/guard_fallback.hpp).
    if (fault_fallback_) fault_fallback_->stop_serving();
  }

  const io::Checkpoint& checkpoint() const noexcept override { return checkpoint_; }
  const Layout& layout() const noexcept override { return space_.layout(); }
  ResidencyMode mode() const noexcept override { return ResidencyMode::guard; }
  const std::string& fallback_reason() const noexcept override { return fallback_reason_; }
  const std::string& fault_fallback_reason() const noexcept override {
    return fault_fallback_reason_;
  }
  bool writable() const noexcept override { return writable_; }
  TensorAddress tensor(std::string_view name) const override { return space_.tensor(name); }
  Pager* pager() noexcept override { return &pager_; }
  TensorAddress anonymous() const noexcept override {
    const Layout& l = space_.layout();
    if (l.anonymous_bytes() == 0) return {};
    return {space_.base() + l.anonymous_offset(), l.anonymous_bytes()};
  }
  void mark_step() override { pager_.mark_step(); }
  PagerStats stats() const override { return pager_.stats(); }

  void read_tensor_range(
      std::string_view name, std::uint64_t offset, std::uint64_t bytes,
      const std::function<void(const std::byte*, std::uint64_t)>& visit) override {
    const TensorAddress t = checked_range(name, offset, bytes);
    LEMA_EXPECTS(backend_->host_accessible(),
                 "tensor '" + std::string(name) + "' lies in " + std::string(backend_->name()) +
                     " device memory, which the host cannot read; read it on the device");
    // Half the pool per piece leaves the other half to the prefetcher.
    const std::uint64_t page = space_.page_size();
    const std::uint64_t piece_pages = std::max<std::uint64_t>(1, pager_.chunk_count() / 2);
    std::uint64_t done = 0;
    while (done < bytes) {
      const std::byte* at = t.data + offset + done;
      const std::uint64_t in_page = static_cast<std::uint64_t>(at - space_.base()) % page;
      const std::uint64_t n = std::min(bytes - done, piece_pages * page - in_page);
      Lease lease = pager_.acquire(at, n);
      visit(at, n);
      pager_.release(std::move(lease));
      done += n;
    }
  }

 private:
  void arm_fault_fallback(const MappedCheckpointOptions& options, std::string source) {
    if (options.cuda_device) {
      fault_fallback_reason_ =
          "weights on a GPU: the fault fallback serves host memory (see the user guide for "
          "what each GPU memory kind does with a read outside an op)";
      return;
    }
    if (!options.fault_fallback) {
      fault_fallback_reason_ = "turned off (MappedCheckpointOptions::fault_fallback)";
      return;
    }
    fault_fallback_ = detail::GuardFallback::arm(
        pager_, detail::GuardFallback::Options{.source = std::move(source)},
        fault_fallback_reason_);
    if (!fault_fallback_)
      spdlog::warn("guard mode without its fault fallback ({}): a read of a weight outside a "
                   "torch op or an acquire gets SIGSEGV when its page is not resident",
                   fault_fallback_reason_);
    else if (!fault_fallback_->handles_kernel_faults())
      spdlog::warn("the fault fallback serves only user-mode reads here (userfaultfd without "
                   "CAP_SYS_PTRACE): a system call reading a weight that is not resident, such "
                   "as a write(2) of it to a file, fails with EFAULT");
  }

  io::Checkpoint checkpoint_;
  std::shared_ptr<Backend> backend_;  // the caller's own may be shared (options.backend)
  AddressSpace space_;
  // Before the pager: destroyed after it (Note [Guard fault fallback]).
  std::unique_ptr<detail::GuardFallback> fault_fallback_;
  Pager pager_;
  std::string fallback_reason_;
  std::string fault_fallback_reason_;
  bool writable_;
};

}  // namespace

Layout detail::plan_layout(const io::Checkpoint& checkpoint,
                           const MappedCheckpointOptions& options, std::uint64_t granularity) {
  Layout layout = Layout::plan(
      checkpoint, resolve_page_size(options.page_size, granularity, options.setting_names.page_size));
  if (options.anonymous_bytes != 0) layout.append_anonymous(options.anonymous_bytes);
  return layout;
}

std::unique_ptr<io::Reader> detail::open_reader(const MappedCheckpointOptions& options,
                                                const Layout& layout) {
  if (!options.open_reader) return io::Reader::open(layout.files(), options.reader);
  std::unique_ptr<io::Reader> reader = options.open_reader(layout.files());
  LEMA_EXPECTS(reader != nullptr, "MappedCheckpointOptions::open_reader returned no reader");
  return reader;
}

const std::string& MappedCheckpoint::fault_fallback_reason() const noexcept {
  static const std::string none;
  return none;
}

TensorAddress MappedCheckpoint::checked_range(std::string_view name, std::uint64_t offset,
                                              std::uint64_t bytes) const {
  const TensorAddress t = tensor(name);
  LEMA_EXPECTS(offset <= t.nbytes && bytes <= t.nbytes - offset,
               "bytes [" + std::to_string(offset) + ", " + std::to_string(offset + bytes) +
                   ") are outside tensor '" + std::string(name) + "' of " +
                   std::to_string(t.nbytes) + " bytes");
  return t;
}

namespace {

// The settings' checks, before anything is opened.
void check_options(const MappedCheckpointOptions& options) {
  if (options.cuda_device) {
    LEMA_EXPECTS(options.mode == ResidencyMode::guard,
                 "weights on a GPU are paged in guard mode only (fault mode serves host memory "
                 "through userfaultfd); use guard mode");
    LEMA_EXPECTS(!options.huge_pages, "huge pages are host memory; weights on a GPU ignore "
                                      "them: drop the huge-pages setting");
  } else {
    LEMA_EXPECTS(options.gpu_memory == GpuMemory::vmm,
                 std::string(gpu_memory_name(options.gpu_memory)) +
                     " GPU memory needs weights on a GPU: set a CUDA device");
  }
  LEMA_EXPECTS(!options.backend || options.mode == ResidencyMode::guard,
               "a backend of your own serves guard mode only (fault mode fills host memory "
               "through userfaultfd itself); use guard mode or drop the backend");
  if (options.anonymous_bytes != 0) {
    // Note [One budget] in allocator/vmm: anonymous pages are written by whoever allocated
    // them, so they need pages whose writes are kept (host memory, not read-only).
    LEMA_EXPECTS(!options.cuda_device && !options.backend,
                 "anonymous memory is paged in host memory by the host backend; drop the CUDA "
                 "device (or backend of your own) or the anonymous bytes");
    // Fault mode lets writes into anonymous pages through while refusing them on read-only
    // weights; guard mode maps every page of a pager with one protection.
    LEMA_EXPECTS(!options.read_only || options.mode == ResidencyMode::fault,
                 "anonymous memory must be writable, but the checkpoint is opened read-only in "
                 "guard mode; open it writable, or in fault mode, or drop the anonymous bytes");
  }
  if (options.huge_pages && options.mode == ResidencyMode::fault)
    throw InvalidArgument(
        "huge pages serve guard mode only (fault mode fills pages through userfaultfd into "
        "ordinary memory); drop the huge-pages setting or use guard mode");
  LEMA_EXPECTS(options.shared_host_cache_bytes == 0 || options.mode == ResidencyMode::guard,
               "the shared host cache serves guard mode only; use guard mode or drop "
               "--shared-host-cache / LEMA_SHARED_HOST_CACHE");
}

// LEMA_SHARED_HOST_CACHE reaches programs that cannot pass the option (the Python route).
void read_environment(MappedCheckpointOptions& options) {
  if (options.shared_host_cache_bytes == 0)
    if (const char* env = std::getenv("LEMA_SHARED_HOST_CACHE"); env != nullptr && *env != 0)
      options.shared_host_cache_bytes = parse_size(env, "LEMA_SHARED_HOST_CACHE");
}

std::unique_ptr<MappedCheckpoint> open_checked(io::Checkpoint checkpoint,
                                               const MappedCheckpointOptions& options) {
  std::string fallback;
  if (options.mode == ResidencyMode::fault) {
    fallback = detail::fault_mode_unavailable_reason();
    if (fallback.empty()) return detail::open_fault_mode(std::move(checkpoint), options);
    LEMA_EXPECTS(options.anonymous_bytes == 0 || !options.read_only,
                 "fault mode is not available (" + fallback +
                     "), and guard mode cannot write anonymous memory beside read-only weights; "
                     "open the weights writable, or drop the anonymous bytes");
    spdlog::warn("fault mode is not available ({}); using guard mode", fallback);
  }
  return std::make_unique<GuardedCheckpoint>(std::move(checkpoint), options, std::move(fallback));
}

}  // namespace

std::unique_ptr<MappedCheckpoint> MappedCheckpoint::open(const std::filesystem::path& path,
                                                         MappedCheckpointOptions options) {
  read_environment(options);
  check_options(options);
  return open_checked(io::Checkpoint::open(path), options);
}

std::unique_ptr<MappedCheckpoint> MappedCheckpoint::open_anonymous(
    MappedCheckpointOptions options) {
  LEMA_EXPECTS(options.anonymous_bytes != 0,
               "anonymous memory of 0 bytes: give MappedCheckpointOptions::anonymous_bytes");
  // No files: an empty table, whose layout is the anonymous pages alone.
  check_options(options);
  return open_checked(io::Checkpoint{}, options);
}

}  // namespace lema::runtime

namespace lema::runtime {

namespace {
Pager& pausable_pager(MappedCheckpoint& c, const char* op) {
  Pager* pager = c.pager();
  if (pager == nullptr)
    throw InvalidArgument(std::string(op) +
                          ": a checkpoint opened in fault mode cannot be paused; open it in "
                          "guard mode (mode=guard) to release its memory between uses");
  return *pager;
}
}  // namespace

void MappedCheckpoint::pause() {
  pausable_pager(*this, "pause").pause();
}

void MappedCheckpoint::resume() {
  pausable_pager(*this, "resume").resume();
}

}  // namespace lema::runtime
