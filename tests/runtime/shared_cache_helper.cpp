// A process of the shared host cache tests: opens a checkpoint with the shared cache and
//   read:  prints "open NAME", waits for a line on stdin, reads every tensor, compares it with
//          the file, prints "done BYTES_READ SHARED_HITS OK", waits for stdin's end, exits;
//   stall: prints "open NAME", claims page 0 of the shared cache as its filler, prints
//          "filling" and sleeps until killed;
//   die-locked: prints "open NAME", reads every tensor, takes the segment's lock, prints
//          "locked" and sleeps until killed;
//   stop-filling: prints "open NAME", claims page 0 as its filler, prints "filling", stops
//          itself (SIGSTOP); once continued, reads page 0 from the files, publishes it, then
//          goes on as `read` (without waiting for a line).
// Usage: shared_cache_helper MODE CHECKPOINT CACHE_BYTES PAGE_SIZE BUDGET
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "lema/runtime/mapped_checkpoint.hpp"
#include "runtime_fixture.hpp"
#include "shared_host_cache.hpp"

using namespace lema;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s read|stall CHECKPOINT CACHE_BYTES PAGE_SIZE BUDGET\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  runtime::MappedCheckpointOptions o;
  o.shared_host_cache_bytes = std::stoull(argv[3]);
  o.page_size = std::stoull(argv[4]);
  o.budget_bytes = std::stoull(argv[5]);
  o.prefetch = false;
  try {
    auto m = runtime::MappedCheckpoint::open(argv[2], o);
    const runtime::SharedCacheKey key = runtime::shared_cache_key(m->layout());
    std::cout << "open " << runtime::shared_cache_name(key) << std::endl;
    if (mode == "die-locked") {  // reads everything, then dies holding the segment's lock
      for (const io::TensorInfo& t : m->checkpoint().tensors())
        m->read_tensor(t.name, [](const std::byte*, std::uint64_t) {});
      runtime::SharedHostCache cache(key, m->layout().page_size(), m->layout().page_count(),
                                     o.shared_host_cache_bytes);
      cache.hold_lock_for_test();
      std::cout << "locked" << std::endl;
      for (;;) ::pause();
    }
    if (mode == "stall") {
      runtime::SharedHostCache cache(key, m->layout().page_size(), m->layout().page_count(),
                                     o.shared_host_cache_bytes);
      std::vector<std::byte> page(m->layout().page_size());
      std::uint32_t slot = 0;
      const auto outcome = cache.try_begin(0, page.data(), &slot);
      std::cout << (outcome == runtime::SharedHostCache::Outcome::fill ? "filling" : "not-filling")
                << std::endl;
      for (;;) ::pause();
    }
    std::string line;
    if (mode == "stop-filling") {
      runtime::SharedHostCache cache(key, m->layout().page_size(), m->layout().page_count(),
                                     o.shared_host_cache_bytes);
      std::vector<std::byte> page(m->layout().page_size());
      std::uint32_t slot = 0;
      if (cache.try_begin(0, page.data(), &slot) != runtime::SharedHostCache::Outcome::fill) {
        std::cout << "not-filling" << std::endl;
        return 1;
      }
      std::cout << "filling" << std::endl;
      ::raise(SIGSTOP);
      for (const runtime::FillExtent& e : m->layout().extents(0)) {
        const int fd = ::open(m->layout().files()[e.file].c_str(), O_RDONLY);
        if (fd < 0 || ::pread(fd, page.data() + e.page_offset, e.length,
                              static_cast<off_t>(e.file_offset)) != static_cast<ssize_t>(e.length))
          return 4;
        ::close(fd);
      }
      cache.publish(slot, page.data());
    } else {
      std::getline(std::cin, line);
    }
    bool ok = true;
    for (const io::TensorInfo& t : m->checkpoint().tensors()) {
      std::vector<std::byte> got;
      m->read_tensor(t.name, [&](const std::byte* p, std::uint64_t n) {
        got.insert(got.end(), p, p + n);
      });
      if (got != test::file_bytes(m->checkpoint(), t)) {
        std::cerr << "tensor " << t.name << " differs from the file\n";
        ok = false;
      }
    }
    const runtime::PagerStats s = m->stats();
    std::cout << "done " << s.bytes_read << " " << s.shared_cache_hits << " " << (ok ? 1 : 0)
              << std::endl;
    while (std::getline(std::cin, line)) {
    }
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 3;
  }
}
