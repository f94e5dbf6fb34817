// VmmResource's allocate/free against malloc/free (Google Benchmark), blocks not touched: the
// cost of placing a block in the range (first-fit under one mutex), not of paging it.
//
//   vmm_resource_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "lema/allocator/vmm_resource.hpp"
#include "lema/base/units.hpp"

namespace {

using namespace lema;

void BM_Malloc(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  for (auto _ : state) {
    void* p = std::malloc(bytes);
    benchmark::DoNotOptimize(p);
    std::free(p);
  }
}

allocator::VmmResource& resource() {
  static auto* mr = [] {
    allocator::VmmOptions o;
    o.budget_bytes = 64_MiB;
    o.capacity_bytes = 4_GiB;
    return new allocator::VmmResource(o);
  }();
  return *mr;
}

void BM_Vmm(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  allocator::VmmResource& mr = resource();
  for (auto _ : state) {
    void* p = mr.allocate(bytes, 64);
    benchmark::DoNotOptimize(p);
    mr.deallocate(p, bytes, 64);
  }
}

// With 256 other blocks live, as a training step keeps tensors: first-fit walks the free list.
void BM_VmmWith256Live(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  allocator::VmmResource& mr = resource();
  std::vector<void*> live;
  for (int i = 0; i < 512; ++i) live.push_back(mr.allocate(4_KiB + 256 * (i % 7), 64));
  for (int i = 0; i < 512; i += 2) mr.deallocate(live[i], 4_KiB + 256 * (i % 7), 64);
  for (auto _ : state) {
    void* p = mr.allocate(bytes, 64);
    benchmark::DoNotOptimize(p);
    mr.deallocate(p, bytes, 64);
  }
  for (int i = 1; i < 512; i += 2) mr.deallocate(live[i], 4_KiB + 256 * (i % 7), 64);
}

void BM_MallocWith256Live(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::vector<void*> live;
  for (int i = 0; i < 512; ++i) live.push_back(std::malloc(4_KiB + 256 * (i % 7)));
  for (int i = 0; i < 512; i += 2) std::free(live[i]);
  for (auto _ : state) {
    void* p = std::malloc(bytes);
    benchmark::DoNotOptimize(p);
    std::free(p);
  }
  for (int i = 1; i < 512; i += 2) std::free(live[i]);
}

BENCHMARK(BM_Malloc)->Arg(256)->Arg(64 << 10)->Arg(2 << 20);
BENCHMARK(BM_Vmm)->Arg(256)->Arg(64 << 10)->Arg(2 << 20);
BENCHMARK(BM_MallocWith256Live)->Arg(64 << 10)->Arg(8 << 20);
BENCHMARK(BM_VmmWith256Live)->Arg(64 << 10)->Arg(8 << 20);

}  // namespace

BENCHMARK_MAIN();
