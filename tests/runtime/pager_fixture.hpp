// A checkpoint on disk, opened into an address space over a chosen backend, with the expected
// bytes of every tensor, and helpers that read tensors through a Pager.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lema/io/checkpoint.hpp"
#include "lema/io/reader.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/pager.hpp"
#include "runtime_fixture.hpp"

namespace lema::test {

/// The page size of the pager tests: small pages keep the files small (the 2 MiB default is
/// covered by tests of its own).
inline constexpr std::uint64_t kPage = std::uint64_t{64} << 10;

/// A three-layer model whose pages, at kPage, number well over eight: small files, but enough
/// pages for budgets from one page to the whole model.
inline ModelShape small_model(int shards = 1) {
  ModelShape m;
  m.layers = 3;
  m.hidden = 20 * 1024 + 13;
  m.embed = 90 * 1024 + 7;
  m.shards = shards;
  return m;
}

struct OpenedModel {
  OpenedModel(std::unique_ptr<runtime::Backend> b, const ModelShape& shape,
              std::uint64_t page_size = 0, const std::string& tag = "pager")
      : dir(tag),
        ckpt(io::Checkpoint::open(write_model(dir.path(), shape))),
        backend(std::move(b)),
        space(*backend,
              runtime::Layout::plan(ckpt, page_size ? page_size : backend->granularity())) {
    for (const auto& t : ckpt.tensors()) expected.emplace(t.name, file_bytes(ckpt, t));
  }
  std::uint64_t page_size() const { return space.page_size(); }
  std::size_t pages() const { return space.page_count(); }

  TempDir dir;
  io::Checkpoint ckpt;
  std::unique_ptr<runtime::Backend> backend;
  runtime::AddressSpace space;
  std::map<std::string, std::vector<std::byte>> expected;
};

// Fails reads of one file region until switched off.
struct FailingRegion : io::FaultInjector {
  std::atomic<bool> on{true};
  std::uint32_t file = 0;
  std::uint64_t begin = 0, end = 0;
  std::optional<long> inject(std::uint32_t f, std::uint64_t offset, std::uint64_t length) override {
    if (on && f == file && offset < end && offset + length > begin) return -EIO;
    return std::nullopt;
  }
};

enum class Order { layer, reverse, random };

inline std::vector<const runtime::TensorPlacement*> tensor_order(const runtime::Layout& layout,
                                                                 Order order, unsigned seed) {
  std::vector<const runtime::TensorPlacement*> out;
  for (const auto& t : layout.tensors()) out.push_back(&t);
  if (order == Order::reverse) std::reverse(out.begin(), out.end());
  if (order == Order::random) {
    std::mt19937 rng(seed);
    std::shuffle(out.begin(), out.end(), rng);
  }
  return out;
}

/// Reads a tensor through the pager and compares it with the file: one acquire per page slice
/// (works under any budget), or one acquire of the whole tensor.
inline void check_tensor(runtime::Pager& pager, const OpenedModel& m,
                         const runtime::TensorPlacement& t, bool whole) {
  const auto& expect = m.expected.at(t.name);
  const std::byte* base = m.space.base() + t.offset;
  if (t.nbytes == 0) return;
  if (whole) {
    runtime::Lease lease = pager.acquire(base, t.nbytes);
    ASSERT_EQ(std::memcmp(base, expect.data(), t.nbytes), 0) << t.name;
    pager.release(std::move(lease));
    return;
  }
  std::uint64_t done = 0;
  while (done < t.nbytes) {
    const std::uint64_t addr = t.offset + done;
    const std::uint64_t n = std::min(t.nbytes - done, m.page_size() - addr % m.page_size());
    runtime::Lease lease = pager.acquire(base + done, n);
    ASSERT_EQ(lease.pages().size(), 1u);
    ASSERT_EQ(std::memcmp(base + done, expect.data() + done, n), 0) << t.name << " at " << done;
    done += n;
  }
}

}  // namespace lema::test
