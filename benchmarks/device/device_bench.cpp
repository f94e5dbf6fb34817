// device_bench OUT_DIR [--total BYTES] [--reps N] [--pager-model BYTES] [--passes N]
//              [--only h2d,vmm,pager]
//
// Measures, on the driver LEMA_CUDA_DRIVER names (default libcuda.so.1):
//  - h2d: pinned host → device copies of 2 MiB and 64 MiB, cuMemcpyHtoDAsync from cuMemHostAlloc
//    memory into cuMemAlloc memory on one stream (the cudaMemcpyAsync baseline), against the cuda
//    backend's pipeline: copy_to_chunk from a ring of 4 pinned staging buffers into pool chunks,
//    each page mapped at its model address after its fill fence and unmapped again;
//  - vmm: cuMemMap, cuMemSetAccess, cuMemUnmap per call, for chunks of 2, 8, 32 and 64 MiB;
//    and a run of 16 adjacent chunks of 2 and 8 MiB mapped through the cuda backend, page by
//    page (map: one cuMemSetAccess per page) against one map_pages (one per run);
//  - pager: passes of the Pager over a generated checkpoint of --pager-model bytes under a quarter
//    of it, without and with the host cache tier (later passes then only cross PCIe).
// --only runs the named parts (default: all). Host wall-clock timing around stream
// synchronization. Writes device_bench.json and
// device_bench.md into OUT_DIR. Against the fake driver the numbers are host memcpy and mmap
// costs, not GPU figures.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cuda/driver_api.hpp"
#include "pager_passes.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/cuda_backend.hpp"

namespace {

using lema::operator""_MiB;
using Clock = std::chrono::steady_clock;
namespace rt = lema::runtime;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Driver {
  const rt::cuda::DriverApi* api = nullptr;
  CUdevice dev = 0;
  CUcontext ctx = nullptr;
};

Driver open_driver() {
  std::string reason;
  Driver d;
  d.api = rt::cuda::load_driver({}, &reason);
  if (d.api == nullptr) throw std::runtime_error(reason);
  d.api->check(d.api->init(0), "cuInit");
  d.api->check(d.api->device_get(&d.dev, 0), "cuDeviceGet");
  d.api->check(d.api->primary_ctx_retain(&d.ctx, d.dev), "cuDevicePrimaryCtxRetain");
  rt::cuda::make_current(*d.api, d.ctx);
  return d;
}

// cudaMemcpyAsync-equivalent: pinned → device memory, `bytes` per copy, `total` in all.
double baseline_gbps(const Driver& d, std::uint64_t bytes, std::uint64_t total) {
  const auto& api = *d.api;
  void* host = nullptr;
  CUdeviceptr dev = 0;
  CUstream stream = nullptr;
  const std::uint64_t window = std::min<std::uint64_t>(total, 256_MiB);
  api.check(api.mem_host_alloc(&host, bytes, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc");
  api.check(api.mem_alloc(&dev, window), "cuMemAlloc");
  api.check(api.stream_create(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  std::memset(host, 1, bytes);
  auto run = [&](std::uint64_t n) {
    for (std::uint64_t done = 0; done < n; done += bytes)
      api.check(api.memcpy_htod_async(dev + done % (window - window % bytes), host, bytes, stream),
                "cuMemcpyHtoDAsync");
    api.check(api.stream_synchronize(stream), "cuStreamSynchronize");
  };
  run(bytes * 4);  // warm-up
  const auto t0 = Clock::now();
  run(total);
  const double s = seconds_since(t0);
  api.stream_destroy(stream);
  api.mem_free(dev);
  api.mem_free_host(host);
  return static_cast<double>(total) / s / 1e9;
}

// The backend's pipeline: staging ring → copy_to_chunk → fence → map → (use) → unmap.
double pipeline_gbps(std::uint64_t page, std::uint64_t total, bool map_pages) {
  auto b = rt::make_cuda_backend();
  constexpr std::size_t kRing = 4;
  const std::size_t chunks = 8;
  rt::Reservation range = b->reserve(chunks * page);
  auto pool = b->create_pool(chunks, page);
  std::vector<std::unique_ptr<rt::StagingBuffer>> staging;
  std::vector<rt::Fence> fences(kRing);
  for (std::size_t i = 0; i < kRing; ++i) {
    staging.push_back(b->allocate_staging(page));
    std::memset(staging.back()->bytes().data(), 2, page);
  }
  auto run = [&](std::uint64_t n) {
    std::size_t i = 0;
    for (std::uint64_t done = 0; done < n; done += page, ++i) {
      const std::size_t slot = i % kRing;
      b->wait_fence(fences[slot]);  // the staging slot and its chunk are free again
      const std::size_t chunk = i % chunks;
      fences[slot] = b->copy_to_chunk(*pool, chunk, 0, {staging[slot]->bytes().data(), page});
    }
    for (std::size_t s = 0; s < kRing; ++s) b->wait_fence(fences[s]);
  };
  auto run_mapped = [&](std::uint64_t n) {
    // Fills run kRing deep; each page is mapped once its own fill completed, unmapped when its
    // slot comes round again.
    std::size_t i = 0;
    std::vector<std::size_t> chunk_of(kRing, 0);
    for (std::uint64_t done = 0; done < n; done += page, ++i) {
      const std::size_t slot = i % kRing;
      if (i >= kRing) {
        b->wait_fence(fences[slot]);
        std::byte* addr = range.base() + chunk_of[slot] * page;
        b->map(*pool, chunk_of[slot], addr, rt::Access::read);
        b->unmap(addr, page);
      }
      chunk_of[slot] = i % chunks;
      fences[slot] =
          b->copy_to_chunk(*pool, chunk_of[slot], 0, {staging[slot]->bytes().data(), page});
    }
    for (std::size_t s = 0; s < kRing; ++s) b->wait_fence(fences[s]);
  };
  const auto go = [&](std::uint64_t n) { map_pages ? run_mapped(n) : run(n); };
  go(page * kRing * 2);  // warm-up
  const auto t0 = Clock::now();
  go(total);
  const double s = seconds_since(t0);
  return static_cast<double>(total) / s / 1e9;
}

struct VmmCost {
  double map_us = 0, set_access_us = 0, unmap_us = 0;
};

VmmCost vmm_cost(const Driver& d, std::uint64_t bytes, int reps) {
  const auto& api = *d.api;
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(d.dev);
  CUmemGenericAllocationHandle h = 0;
  CUdeviceptr va = 0;
  api.check(api.mem_create(&h, bytes, &prop, 0), "cuMemCreate");
  api.check(api.mem_address_reserve(&va, bytes, 0, 0, 0), "cuMemAddressReserve");
  CUmemAccessDesc access{};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  VmmCost c;
  for (int r = 0; r < reps; ++r) {
    auto t = Clock::now();
    api.check(api.mem_map(va, bytes, 0, h, 0), "cuMemMap");
    c.map_us += seconds_since(t) * 1e6;
    t = Clock::now();
    api.check(api.mem_set_access(va, bytes, &access, 1), "cuMemSetAccess");
    c.set_access_us += seconds_since(t) * 1e6;
    t = Clock::now();
    api.check(api.mem_unmap(va, bytes), "cuMemUnmap");
    c.unmap_us += seconds_since(t) * 1e6;
  }
  api.mem_address_free(va, bytes);
  api.mem_release(h);
  c.map_us /= reps;
  c.set_access_us /= reps;
  c.unmap_us /= reps;
  return c;
}

// A run of `pages` adjacent chunks mapped through the cuda backend and unmapped again: one map()
// per page (cuMemMap + cuMemSetAccess each) against one map_pages (every cuMemMap, then one
// cuMemSetAccess for the run). Microseconds per run, unmaps not included.
struct RunMapCost {
  double per_page_us = 0, batched_us = 0;
};

RunMapCost run_map_cost(std::uint64_t chunk, std::size_t pages, int reps) {
  auto b = rt::make_cuda_backend();
  rt::Reservation range = b->reserve(pages * chunk);
  auto pool = b->create_pool(pages, chunk);
  std::vector<rt::PageMapping> run(pages);
  for (std::size_t i = 0; i < pages; ++i) run[i] = {i, range.base() + i * chunk};
  RunMapCost c;
  for (int r = 0; r < reps + 1; ++r) {  // the first repetition warms up
    auto t = Clock::now();
    for (const rt::PageMapping& p : run) b->map(*pool, p.chunk, p.addr, rt::Access::read);
    const double per_page = seconds_since(t) * 1e6;
    b->unmap(range.base(), pages * chunk);
    t = Clock::now();
    b->map_pages(*pool, run, rt::Access::read);
    const double batched = seconds_since(t) * 1e6;
    b->unmap(range.base(), pages * chunk);
    if (r == 0) continue;
    c.per_page_us += per_page;
    c.batched_us += batched;
  }
  c.per_page_us /= reps;
  c.batched_us /= reps;
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: device_bench OUT_DIR [--total BYTES] [--reps N] [--pager-model BYTES] "
                 "[--passes N] [--only h2d,vmm,pager]\n");
    return 2;
  }
  const std::filesystem::path out = argv[1];
  std::uint64_t total = std::uint64_t{4} << 30;
  int reps = 50;
  std::uint64_t pager_model = std::uint64_t{1} << 30;
  int passes = 3;
  std::string only = "h2d,vmm,pager";
  for (int i = 2; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--total") == 0) total = lema::parse_size(argv[i + 1], "--total");
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--pager-model") == 0)
      pager_model = lema::parse_size(argv[i + 1], "--pager-model");
    if (std::strcmp(argv[i], "--passes") == 0) passes = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--only") == 0) only = argv[i + 1];
  }
  if (total < 64_MiB || reps < 1 || passes < 1) {
    std::fprintf(stderr,
                 "device_bench: --total must be at least 64MiB (the largest copy), --reps and "
                 "--passes at least 1\n");
    return 2;
  }
  const auto part = [&](const char* name) {
    return ("," + only + ",").find("," + std::string(name) + ",") != std::string::npos;
  };
  const std::string reason = rt::cuda_backend_unavailable_reason();
  if (!reason.empty()) {
    std::fprintf(stderr, "device_bench: the cuda backend is unavailable: %s\n", reason.c_str());
    return 3;
  }
  try {
    const Driver d = open_driver();
    char name[256] = {};
    d.api->device_get_name(name, sizeof name - 1, d.dev);
    nlohmann::json j;
    j["device"] = name;
    j["driver_library"] = d.api->library;
    j["driver_version"] = d.api->driver_version;
    j["total_bytes_per_run"] = total;
    for (std::uint64_t size : {2_MiB, 64_MiB}) {
      if (!part("h2d")) break;
      const double base = baseline_gbps(d, size, total);
      const double copy = pipeline_gbps(size, total, false);
      const double mapped = pipeline_gbps(size, total, true);
      j["h2d"].push_back({{"bytes_per_copy", size},
                          {"baseline_gbps", base},
                          {"pipeline_copy_gbps", copy},
                          {"pipeline_copy_map_unmap_gbps", mapped},
                          {"ratio_copy", copy / base},
                          {"ratio_copy_map_unmap", mapped / base}});
    }
    for (std::uint64_t size : {2_MiB, 8_MiB, 32_MiB, 64_MiB}) {
      if (!part("vmm")) break;
      const VmmCost c = vmm_cost(d, size, reps);
      j["vmm"].push_back({{"chunk_bytes", size},
                          {"map_us", c.map_us},
                          {"set_access_us", c.set_access_us},
                          {"unmap_us", c.unmap_us}});
    }
    constexpr std::size_t kRunPages = 16;
    for (std::uint64_t size : {2_MiB, 8_MiB}) {
      if (!part("vmm")) break;
      const RunMapCost c = run_map_cost(size, kRunPages, reps);
      j["vmm_run"].push_back({{"chunk_bytes", size},
                              {"pages", kRunPages},
                              {"map_per_page_us", c.per_page_us},
                              {"map_pages_us", c.batched_us},
                              {"ratio", c.batched_us / c.per_page_us}});
    }
    // Not under OUT_DIR: that folder travels back from the device machine.
    if (part("pager"))
      j["pager"] =
          lema::bench::measure_pager_passes(std::filesystem::temp_directory_path() /
                                                ("lema-device-bench-" + std::to_string(::getpid())),
                                            pager_model, passes);
    d.api->primary_ctx_release(d.dev);

    std::filesystem::create_directories(out);
    std::ofstream(out / "device_bench.json") << j.dump(2) << "\n";
    std::ofstream md(out / "device_bench.md");
    md << "Device: " << j["device"].get<std::string>() << ", driver " << d.api->driver_version
       << " (" << d.api->library << ")\n\n";
    char row[256];
    if (j.contains("h2d"))
      md << "| copy size | baseline GB/s | pipeline GB/s | ratio | pipeline + map/unmap GB/s | "
            "ratio |\n"
            "|---|---|---|---|---|---|\n";
    for (const auto& h : j.value("h2d", nlohmann::json::array())) {
      std::snprintf(row, sizeof row, "| %s | %.2f | %.2f | %.3f | %.2f | %.3f |\n",
                    lema::format_size(h["bytes_per_copy"].get<std::uint64_t>()).c_str(),
                    h["baseline_gbps"].get<double>(), h["pipeline_copy_gbps"].get<double>(),
                    h["ratio_copy"].get<double>(), h["pipeline_copy_map_unmap_gbps"].get<double>(),
                    h["ratio_copy_map_unmap"].get<double>());
      md << row;
    }
    if (j.contains("vmm"))
      md << "\n| chunk | cuMemMap µs | cuMemSetAccess µs | cuMemUnmap µs |\n|---|---|---|---|\n";
    for (const auto& v : j.value("vmm", nlohmann::json::array())) {
      std::snprintf(row, sizeof row, "| %s | %.1f | %.1f | %.1f |\n",
                    lema::format_size(v["chunk_bytes"].get<std::uint64_t>()).c_str(),
                    v["map_us"].get<double>(), v["set_access_us"].get<double>(),
                    v["unmap_us"].get<double>());
      md << row;
    }
    if (j.contains("vmm_run"))
      md << "\n| run of chunks | map() per page µs | map_pages µs | ratio |\n|---|---|---|---|\n";
    for (const auto& v : j.value("vmm_run", nlohmann::json::array())) {
      std::snprintf(row, sizeof row, "| %zu × %s | %.1f | %.1f | %.3f |\n",
                    v["pages"].get<std::size_t>(),
                    lema::format_size(v["chunk_bytes"].get<std::uint64_t>()).c_str(),
                    v["map_per_page_us"].get<double>(), v["map_pages_us"].get<double>(),
                    v["ratio"].get<double>());
      md << row;
    }
    if (j.contains("pager")) {
      const auto& pg = j["pager"];
      md << "\nPager passes over " << lema::format_size(pg["model_bytes"].get<std::uint64_t>())
         << " in pages of " << lema::format_size(pg["page_bytes"].get<std::uint64_t>())
         << ", budget " << lema::format_size(pg["budget_bytes"].get<std::uint64_t>())
         << ", trace policy\n\n| host cache | pass | s | GB/s | read from files | host cache hits "
            "|\n|---|---|---|---|---|---|\n";
      for (const auto& run : pg["runs"]) {
        int n = 0;
        for (const auto& p : run["passes"]) {
          std::snprintf(row, sizeof row, "| %s | %d | %.3f | %.2f | %s | %llu |\n",
                        lema::format_size(run["host_cache_bytes"].get<std::uint64_t>()).c_str(),
                        ++n, p["seconds"].get<double>(), p["gbps"].get<double>(),
                        lema::format_size(p["bytes_read"].get<std::uint64_t>()).c_str(),
                        static_cast<unsigned long long>(p["host_cache_hits"].get<std::uint64_t>()));
          md << row;
        }
      }
    }
    std::printf("%s", j.dump(2).c_str());
    std::printf("\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "device_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
