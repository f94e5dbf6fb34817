// The device VMM resource's own bookkeeping per allocate/free pair (AddressRanges: the first
// fit over the free pieces of the reserved range, and the coalescing free) against malloc/free,
// with few and with many blocks live. The driver calls are not in it: over the fake driver they
// are memfd and mmap system calls, a figure about the fake, not a GPU (DeviceVmmOverFake shows
// it, for scale only). The driver is $LEMA_CUDA_DRIVER.
//
//   LEMA_CUDA_DRIVER=build/tests/libfake_cuda_driver.so build/benchmarks/device_vmm_bench
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <exception>
#include <memory>
#include <vector>

#include "lema/allocator/cuda/address_ranges.hpp"
#include "lema/allocator/cuda/device_vmm_resource.hpp"

namespace {

constexpr std::uint64_t kGranule = 2 << 20;

void Malloc(benchmark::State& state) {
  const auto live = static_cast<std::size_t>(state.range(0));
  std::vector<void*> held;
  for (std::size_t i = 0; i < live; ++i) held.push_back(std::malloc(kGranule));
  for (auto _ : state) {
    void* p = std::malloc(kGranule);
    benchmark::DoNotOptimize(p);
    std::free(p);
  }
  for (void* p : held) std::free(p);
}

// `live` blocks held, every other one freed again, so the free pieces are many and small: the
// new block fits only at the end (the first fit's worst case).
void AddressRangesTakeGiveBack(benchmark::State& state) {
  const auto live = static_cast<std::uint64_t>(state.range(0));
  lema::allocator::cuda::AddressRanges ranges(4 * (2 * live + 16) * kGranule);
  for (std::uint64_t i = 0; i < 2 * live; ++i) (void)ranges.take(kGranule, kGranule);
  for (std::uint64_t i = 0; i < 2 * live; i += 2) ranges.give_back(i * kGranule, kGranule);
  for (auto _ : state) {
    auto o = ranges.take(2 * kGranule, kGranule);
    benchmark::DoNotOptimize(o);
    ranges.give_back(*o, 2 * kGranule);
  }
}

void DeviceVmmOverFake(benchmark::State& state) {
  std::unique_ptr<lema::allocator::cuda::DeviceVmmResource> mr;
  try {
    mr = std::make_unique<lema::allocator::cuda::DeviceVmmResource>(
        lema::allocator::cuda::DeviceVmmOptions{.driver_library = "",
                                                .budget_bytes = 64 * kGranule});
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    void* p = mr->allocate(kGranule);
    benchmark::DoNotOptimize(p);
    mr->deallocate(p, kGranule);
  }
}

BENCHMARK(Malloc)->Arg(0)->Arg(1000);
BENCHMARK(AddressRangesTakeGiveBack)->Arg(0)->Arg(1000);
BENCHMARK(DeviceVmmOverFake);

}  // namespace

BENCHMARK_MAIN();
