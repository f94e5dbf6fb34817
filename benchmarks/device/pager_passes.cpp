#include "pager_passes.hpp"

#include <chrono>
#include <string>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/cuda_backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/pager.hpp"

namespace lema::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr std::uint64_t kTensorBytes = std::uint64_t{16} << 20;

fs::path write_checkpoint(const fs::path& dir, std::uint64_t model_bytes) {
  fs::create_directories(dir);
  std::vector<io::TensorToWrite> tensors;
  const std::uint64_t count = std::max<std::uint64_t>(4, model_bytes / kTensorBytes);
  for (std::uint64_t i = 0; i < count; ++i) {
    tensors.push_back({"model.layers." + std::to_string(i) + ".mlp.up_proj.weight", io::Dtype::F16,
                       {static_cast<std::int64_t>(kTensorBytes / 2 / 4096), 4096},
                       [i](std::span<std::byte> out, std::uint64_t offset) {
                         for (std::size_t k = 0; k < out.size(); ++k)
                           out[k] = static_cast<std::byte>((offset + k) * 31 + i);
                       }});
  }
  const fs::path file = dir / "model.safetensors";
  io::write_safetensors(file, std::move(tensors));
  return file;
}

struct RemoveOnExit {
  fs::path path;
  ~RemoveOnExit() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

}  // namespace

nlohmann::json measure_pager_passes(const fs::path& scratch, std::uint64_t model_bytes,
                                    int passes) {
  RemoveOnExit cleanup{scratch};
  const io::Checkpoint ckpt = io::Checkpoint::open(write_checkpoint(scratch, model_bytes));
  auto backend = runtime::make_cuda_backend();
  runtime::AddressSpace space(*backend, runtime::Layout::plan(ckpt, backend->granularity()));
  const std::uint64_t page = space.page_size();
  const std::uint64_t bytes = space.layout().virtual_bytes();
  nlohmann::json out = {{"model_bytes", bytes}, {"page_bytes", page}, {"budget_bytes", bytes / 4}};
  for (const std::uint64_t cache : {std::uint64_t{0}, bytes}) {
    runtime::PagerOptions opt;
    opt.budget_bytes = align_down(bytes / 4, page);
    opt.policy = runtime::PolicyKind::trace;
    opt.host_cache_bytes = cache;
    runtime::Pager pager(space, opt);
    nlohmann::json run = {{"host_cache_bytes", cache}};
    for (int pass = 0; pass < passes; ++pass) {
      const runtime::PagerStats before = pager.stats();
      const auto t0 = Clock::now();
      for (runtime::PageId p = 0; p < space.page_count(); ++p)
        pager.release(pager.acquire_pages({p, 1}));
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      const runtime::PagerStats after = pager.stats();
      run["passes"].push_back({{"seconds", s},
                               {"gbps", static_cast<double>(bytes) / s / 1e9},
                               {"bytes_read", after.bytes_read - before.bytes_read},
                               {"host_cache_hits", after.host_cache_hits - before.host_cache_hits},
                               {"faults", after.faults - before.faults},
                               {"stall_s", static_cast<double>(after.stall_ns - before.stall_ns) / 1e9}});
    }
    out["runs"].push_back(run);
  }
  return out;
}

}  // namespace lema::bench
