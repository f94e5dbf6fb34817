#include "model_session.hpp"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/cuda_backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::tools {

void add_paging_options(CLI::App& cmd, PagingArgs& args) {
  cmd.add_option("--budget", args.budget,
                 "Memory for resident weights: a size (512MiB, 2GiB) or 'unlimited'")
      ->capture_default_str();
  cmd.add_option("--page-size", args.page_size,
                 "Paging unit; a power-of-two multiple of 2 MiB (default 2 MiB)");
  cmd.add_option("--policy", args.policy, "Eviction: lru, or trace (learn the step, prefetch)")
      ->check(CLI::IsMember({"lru", "trace"}))
      ->capture_default_str();
  cmd.add_option("--mode", args.mode,
                 "guard: pages pinned around each op; fault: userfaultfd demand paging")
      ->check(CLI::IsMember({"guard", "fault"}))
      ->capture_default_str();
  cmd.add_flag("--no-prefetch{false}", args.prefetch, "Load pages only when an op needs them");
  cmd.add_flag("--huge-pages", args.huge_pages,
               "Take the budget's memory from the system's huge pages (vm.nr_hugepages); guard "
               "mode");
  cmd.add_option("--shared-host-cache", args.shared_host_cache,
                 "Keep pages read from disk in this much shared memory (/dev/shm) for every "
                 "process on this machine that opens the same checkpoint with it, so local ranks "
                 "read each page once (e.g. 8GiB); guard mode. Also LEMA_SHARED_HOST_CACHE");
}

void add_device_options(CLI::App& cmd, PagingArgs& args) {
  cmd.add_option("--device", args.device,
                 "Where the weights are paged in and the model runs: cpu, cuda or cuda:N (the "
                 "budget is then GPU memory)")
      ->capture_default_str();
  cmd.add_option("--gpu-memory", args.gpu_memory,
                 "With a GPU, how its weights are kept: vmm (device memory paged by LEMA), "
                 "managed (unified memory prefetched by LEMA) or unified (plain unified memory "
                 "paged by the driver alone; needs --budget unlimited)")
      ->check(CLI::IsMember({"vmm", "managed", "unified"}))
      ->capture_default_str();
  cmd.add_option("--host-cache", args.host_cache,
                 "With a GPU: keep pages read from disk in this much pinned host memory, so "
                 "later steps only cross PCIe (e.g. 16GiB)");
  cmd.add_option("--device-memory-cap", args.device_memory_cap,
                 "With a GPU: hold all of its free memory but this much, to train as on a "
                 "smaller card (and oversubscribe unified memory)");
}

namespace {

c10::Device parse_device(const std::string& text) {
  try {
    const c10::Device device(text);
    if (device.is_cpu() || device.is_cuda()) return device;
  } catch (const std::exception&) {
  }
  throw InvalidArgument("--device " + text + ": give cpu, cuda or cuda:N");
}

// Allocates all of the device's free memory but `cap` bytes, through torch's allocator so that
// neither torch nor the pager can use it.
at::Tensor hold_device_memory(const c10::Device& device, std::uint64_t cap) {
  LEMA_EXPECTS(at::globalContext().hasCUDA(),
               "--device-memory-cap: this torch sees no CUDA device (a CPU build of torch, no "
               "GPU, or no driver)");
  // A LEMA built without the CUDA toolkit throws CudaUnavailable saying so.
  runtime::CudaBackendOptions options;
  options.device = device.has_index() ? device.index() : 0;
  const runtime::CudaDeviceMemory memory = runtime::cuda_device_memory(options);
  if (memory.free_bytes <= cap) {
    fmt::print(stderr, "warning: --device-memory-cap {}: {} has only {} free; nothing held\n",
               format_size(cap), device.str(), format_size(memory.free_bytes));
    return {};
  }
  const std::uint64_t held = memory.free_bytes - cap;
  return at::empty({static_cast<std::int64_t>(held)},
                   at::TensorOptions().dtype(at::kByte).device(device));
}

}  // namespace

ModelSession ModelSession::open(const std::filesystem::path& dir, const PagingArgs& paging) {
  ModelSession s;
  s.dir_ = dir;
  if (!std::filesystem::is_directory(dir)) {
    throw InvalidArgument(fmt::format(
        "--model {}: not a directory; give a Hugging Face model directory (config.json and "
        "safetensors weights)",
        dir.string()));
  }
  s.config_ = trainer::ModelConfig::from_hf_dir(dir);
  const io::Checkpoint checkpoint = io::Checkpoint::open(dir);
  trainer::check_checkpoint(s.config_, checkpoint);

  torch::Options options;
  if (!paging.page_size.empty()) options.page_size = parse_size(paging.page_size, "--page-size");
  const std::uint64_t page =
      runtime::resolve_page_size(options.page_size, std::uint64_t{2} << 20, "--page-size");
  const runtime::Layout layout = runtime::Layout::plan(checkpoint, page);
  s.model_bytes_ = layout.tensor_bytes();
  if (paging.budget == "unlimited") {
    s.unlimited_ = true;
    s.budget_bytes_ = layout.virtual_bytes();  // every page, padding included
  } else {
    s.budget_bytes_ = parse_size(paging.budget, "--budget");
  }
  options.budget_bytes = s.budget_bytes_;
  options.setting_names = {.budget = "--budget", .page_size = "--page-size"};
  options.policy = *runtime::parse_policy(paging.policy);
  options.mode = *runtime::parse_residency_mode(paging.mode);
  options.prefetch = paging.prefetch;
  options.huge_pages = paging.huge_pages;
  // The base weights are frozen: opened read-only, an accidental write fails naming the weight
  // instead of being kept, and a huge-page pool needs no second set of pages for written copies.
  options.read_only = true;
  options.device = parse_device(paging.device);
  s.device_ = options.device.str();
  if (paging.budget_covers == "all") {
    // Note [One budget] (allocator/vmm): the other tensors live in anonymous memory after the
    // weights, paged by the same userfaultfd region. Fault mode, since in guard mode a page
    // written by one of torch's threads could be evicted by another thread's fault mid-write.
    LEMA_EXPECTS(options.mode == runtime::ResidencyMode::fault,
                 "--budget-covers all pages every tensor through userfaultfd, which needs "
                 "--mode fault; add --mode fault");
    LEMA_EXPECTS(!options.device.is_cuda(),
                 "--budget-covers all pages CPU tensors; with --device cuda drop it");
    // Virtual bytes only: cheap to reserve, taken as pages are touched.
    options.anonymous_bytes = std::max<std::uint64_t>(64 * s.budget_bytes_, std::uint64_t{64} << 30);
    if (s.unlimited_) s.budget_bytes_ = options.budget_bytes = s.budget_bytes_ + options.anonymous_bytes;
    s.covers_all_ = true;
  } else {
    LEMA_EXPECTS(paging.budget_covers == "weights",
                 "--budget-covers " + paging.budget_covers + ": give weights or all");
  }
  if (!paging.host_cache.empty()) {
    LEMA_EXPECTS(options.device.is_cuda(),
                 "--host-cache keeps a GPU's pages in host memory; on the CPU the kernel's page "
                 "cache does that already: drop it, or add --device cuda");
    options.host_cache_bytes = parse_size(paging.host_cache, "--host-cache");
  }
  if (!paging.shared_host_cache.empty())
    options.shared_host_cache_bytes = parse_size(paging.shared_host_cache, "--shared-host-cache");
  options.gpu_memory = *runtime::parse_gpu_memory(paging.gpu_memory);
  if (options.gpu_memory != runtime::GpuMemory::vmm) {
    LEMA_EXPECTS(options.device.is_cuda(),
                 "--gpu-memory " + paging.gpu_memory + " keeps weights on a GPU: add --device cuda");
    LEMA_EXPECTS(paging.host_cache.empty(),
                 "--host-cache serves --gpu-memory vmm only (" + paging.gpu_memory +
                     " memory is host-visible and copies nothing from a cache): drop it");
    if (options.gpu_memory == runtime::GpuMemory::unified && !s.unlimited_)
      throw InvalidArgument(
          "--gpu-memory unified leaves the paging to the driver, which no budget can bound: give "
          "--budget unlimited, and --device-memory-cap to oversubscribe the GPU");
  }
  s.gpu_memory_ = paging.gpu_memory;
  if (!paging.device_memory_cap.empty()) {
    LEMA_EXPECTS(options.device.is_cuda(),
                 "--device-memory-cap limits a GPU's memory: add --device cuda");
    s.ballast_ = hold_device_memory(
        options.device, parse_size(paging.device_memory_cap, "--device-memory-cap"));
  }
  s.weights_ = std::make_shared<torch::VirtualCheckpoint>(torch::open(dir, options));
  return s;
}

std::string ModelSession::describe() const {
  const auto stats = weights_->stats();
  std::string budget = unlimited_ ? fmt::format("unlimited budget ({})", format_size(budget_bytes_))
                                  : fmt::format("{} budget ({:.0f}% of the {} model)",
                                                format_size(budget_bytes_),
                                                100.0 * static_cast<double>(budget_bytes_) /
                                                    static_cast<double>(model_bytes_),
                                                format_size(model_bytes_));
  if (device_ != "cpu") budget += " of " + device_ + " memory (" + gpu_memory_ + ")";
  std::string text =
      fmt::format("{}, {} mode, {} pages, io {}", budget,
                  runtime::residency_mode_name(weights_->mode()), format_size(stats.page_size),
                  stats.io_path);
  if (!weights_->fallback_reason().empty()) {
    text += fmt::format(" (fault mode unavailable: {})", weights_->fallback_reason());
  }
  return text;
}

}  // namespace lema::tools
