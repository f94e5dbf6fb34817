// Allocate/free of one staging page: the pinned staging pool (a slot of a warm pool) against
// malloc/free and against pinning each page with cuMemHostAlloc/cuMemFreeHost, as the pager's
// staging did before the pool. The driver is $LEMA_CUDA_DRIVER, else libcuda.so.1: on a machine
// without a GPU run it over the fake driver (tests/libfake_cuda_driver.so), whose cuMemHostAlloc
// is aligned_alloc, so its "direct" figures there are a floor, not a GPU's pinning cost.
//
//   LEMA_CUDA_DRIVER=build/tests/libfake_cuda_driver.so build/benchmarks/pinned_pool_bench
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <exception>
#include <memory>

#include "lema/runtime/pinned_host_pool.hpp"

namespace {

void Malloc(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  for (auto _ : state) {
    void* p = std::malloc(bytes);
    benchmark::DoNotOptimize(p);
    std::free(p);
  }
}

void PinnedHostPool(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::unique_ptr<lema::runtime::PinnedHostPool> pool;
  try {
    pool = lema::runtime::make_pinned_host_pool({.slot_bytes = bytes, .slots_per_chunk = 16});
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  pool->deallocate(pool->allocate(bytes), bytes);  // the pool's one chunk, taken before timing
  for (auto _ : state) {
    void* p = pool->allocate(bytes);
    benchmark::DoNotOptimize(p);
    pool->deallocate(p, bytes);
  }
}

void PinnedHostDirect(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::unique_ptr<lema::allocator::MemoryResource> pinned;
  try {
    pinned = lema::runtime::make_pinned_host_resource();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    void* p = pinned->allocate(bytes);
    benchmark::DoNotOptimize(p);
    pinned->deallocate(p, bytes);
  }
}

// 64 KiB: the fake driver's test pages; 2 MiB: a GPU's VMM granularity, the usual page.
BENCHMARK(Malloc)->Arg(64 << 10)->Arg(2 << 20);
BENCHMARK(PinnedHostPool)->Arg(64 << 10)->Arg(2 << 20);
BENCHMARK(PinnedHostDirect)->Arg(64 << 10)->Arg(2 << 20);

}  // namespace

BENCHMARK_MAIN();
