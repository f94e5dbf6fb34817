// Note [Shared host cache]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// One POSIX shm segment per checkpoint (named by its key, Note [Shared cache key]):
//
//   [Header][page index: uint32 per page][SlotMeta × slots][pages: page_size × slots]
//
// Header and metadata are guarded by one robust, process-shared pthread mutex in the header:
//  - a slot is empty, filling (by a process named by pid and start time) or ready. Exactly one
//    process fills a page: the one that found it absent claims a slot under the lock, reads the
//    files outside it, copies the page in (nobody reads or reuses a filling slot) and marks it
//    ready under the lock. Others that want the page meanwhile get `busy` and poll; a filler
//    found dead (pid gone, or reused by another process: the start time differs) is taken over.
//  - ready pages are copied out under the lock. A copy is a memcpy of one page; holding the lock
//    for it keeps the metadata the only shared state and makes a reader that dies mid-copy
//    harmless (no reader count to leak). A per-slot seqlock would let copies run side by side;
//    the reads it saves dominate either way.
//  - eviction is a clock over the slots (a referenced bit set on each use); filling slots of
//    live processes are skipped, so a page being written is never reused under its filler.
//  - users: a table of (pid, start time, count). Attaching purges dead entries and adds one;
//    detaching removes one, and the last user out marks the segment retired and unlinks its
//    name, both under the lock, so a process that opened the name just before sees `retired`
//    and starts over instead of attaching to a segment nobody will remove.
//  - a process that died holding the lock leaves it EOWNERDEAD: the next locker repairs what a
//    half-done update can break (the page index is rebuilt from the slots) and marks it
//    consistent.
// A segment is built under a temporary name and linked to its final one (link(2) fails when the
// name exists), so nobody ever sees a half-initialized header. A segment found under the name
// whose header does not check out (magic, version, key, geometry, size) is unlinked and built
// anew; one left by a crash (all users dead) is reused: its ready pages were complete and its
// key says they are this checkpoint's bytes.
//
// Note [Slow fillers]
// ~~~~~~~~~~~~~~~~~~~
// A filler that died is taken over (above); one that is alive but stuck (stopped by a signal, a
// read hung on a network disk) would keep its waiters forever, and through them every rank of the
// job. So a waiter waits at most LEMA_SHARED_CACHE_WAIT seconds (default 30; lema train sets it
// below --dist-timeout so the page costs a read, not a collective's timeout) and then reads the
// page from disk into its own memory, as a bypass: the slot stays the filler's, which publishes
// into it when it wakes up, so nothing is written twice and nobody sees half a page. Taking the
// slot over instead would race with a filler that is merely slow. The waiter names the filler
// once (rank and pid; the slot records the filler's RANK) and waits again for its next pages:
// a filler that recovers serves them as before.
//
// Note [Shared cache key]
// ~~~~~~~~~~~~~~~~~~~~~~~
// SHA-1 over, per file: device, inode, size, mtime and ctime in ns, and the safetensors header
// bytes; then the page size and page count (the layout is a function of the header and the page
// size), and the pid namespace (liveness is judged by pid, which means nothing across one). Hashing the tensor bytes would cost the read the cache exists to save. Any write to a
// file changes its mtime and ctime (and ctime cannot be set back by a user), a replaced file has
// a new inode, so a changed checkpoint gets a new segment and never another file's bytes.
// SHA-1's 160 bits make an accidental collision out of reach; the segment stores the full key
// and checks it, the name carries 128 bits of it.
#include "shared_host_cache.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/uuid/detail/sha1.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "lema/base/error.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/base/units.hpp"
#include "profile_shm.hpp"

namespace lema::runtime {
namespace {

constexpr char kMagic[8] = {'L', 'E', 'M', 'A', 'S', 'H', 'C', '1'};
constexpr std::uint32_t kVersion = 2;  // 2: SlotMeta::filler_rank and pinners
constexpr std::uint32_t kMaxUsers = 256;
constexpr std::uint64_t kAlign = 4096;
const std::string kShmDirectory = "/dev/shm";

enum SlotState : std::uint32_t { kEmpty = 0, kFilling = 1, kReady = 2 };

struct User {
  std::uint64_t pid;
  std::uint64_t start_ticks;
  std::uint32_t count;
  std::uint32_t pad;
};

struct SlotMeta {
  std::uint64_t page;
  std::uint32_t state;
  std::uint32_t referenced;
  std::uint64_t filler_pid;
  std::uint64_t filler_start;
  std::int32_t filler_rank;  // its RANK (-1: none), for the line naming a slow filler
  std::uint32_t pad;
  // Users (bit i: users[i]) whose copies to a GPU read the ready page in place (Note
  // [Registered shared tier] in fill_pipeline.cpp): the slot is not reused while one lives.
  std::uint64_t pinners[kMaxUsers / 64];
};

struct Header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_bytes;
  std::uint8_t key[20];
  std::uint32_t pad0;
  std::uint64_t page_size;
  std::uint64_t page_count;
  std::uint64_t slot_count;
  std::uint64_t total_bytes;
  std::uint64_t index_offset;
  std::uint64_t slots_offset;
  std::uint64_t data_offset;
  pthread_mutex_t mutex;
  // ---- guarded by mutex ----
  std::uint32_t retired;
  std::uint32_t clock_hand;
  User users[kMaxUsers];
};

std::uint64_t align_up(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }

struct Geometry {
  std::uint64_t index_offset, slots_offset, data_offset, total_bytes;
};

Geometry geometry(std::uint64_t page_count, std::uint64_t slots, std::uint64_t page_size) {
  Geometry g{};
  g.index_offset = align_up(sizeof(Header), 64);
  g.slots_offset = align_up(g.index_offset + page_count * sizeof(std::uint32_t), 64);
  g.data_offset = align_up(g.slots_offset + slots * sizeof(SlotMeta), kAlign);
  g.total_bytes = g.data_offset + slots * page_size;
  return g;
}

std::string hex(const std::uint8_t* bytes, std::size_t n) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    s += digits[bytes[i] >> 4];
    s += digits[bytes[i] & 15];
  }
  return s;
}

struct Me {
  std::uint64_t pid;
  std::uint64_t start_ticks;
};

bool running(std::uint64_t pid, std::uint64_t start) {
  return profile_shm::process_running(pid, start);
}

// This process's rank (torchrun's RANK), -1 outside a distributed job.
std::int32_t my_rank() {
  const char* v = std::getenv("RANK");
  if (v == nullptr || *v == 0) return -1;
  char* end = nullptr;
  const long r = std::strtol(v, &end, 10);
  return *end == 0 && r >= 0 && r <= 1 << 20 ? static_cast<std::int32_t>(r) : -1;
}

// Pins of this process, per (segment, slot): a slot's bit in `pinners` is the process's, shared
// by every SharedHostCache of it that maps the segment, so it is cleared only when the last pin
// of the process goes.
std::mutex g_pins_mutex;
std::map<std::pair<std::string, std::uint32_t>, std::uint32_t> g_pins;

constexpr double kDefaultWaitSeconds = 30;

// LEMA_SHARED_CACHE_WAIT: seconds a process waits for a live filler (Note [Slow fillers]).
std::chrono::steady_clock::duration wait_limit_from_environment() {
  const char* v = std::getenv("LEMA_SHARED_CACHE_WAIT");
  double seconds = kDefaultWaitSeconds;
  if (v != nullptr && *v != 0) {
    char* end = nullptr;
    errno = 0;
    seconds = std::strtod(v, &end);
    if (*end != 0 || errno != 0 || !(seconds > 0 && seconds <= 86400))
      throw InvalidArgument(std::string("LEMA_SHARED_CACHE_WAIT='") + v +
                            "' is not a number of seconds in (0, 86400]; give how long a process "
                            "waits for another one's read of a shared page, e.g. 30");
  }
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(seconds));
}

}  // namespace

SharedCacheKey shared_cache_key(const Layout& layout) {
  boost::uuids::detail::sha1 sha;
  auto add = [&](const void* p, std::size_t n) { sha.process_bytes(p, n); };
  auto add_u64 = [&](std::uint64_t v) { add(&v, sizeof v); };
  add("lema-shared-host-cache/1", 24);
  for (const auto& file : layout.files()) {
    UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0)
      throw SystemError("shared host cache: cannot open " + file.string() + " to key its pages",
                        errno);
    struct stat st {};
    LEMA_SYS_TRY(::fstat(fd.get(), &st));
    add_u64(st.st_dev);
    add_u64(st.st_ino);
    add_u64(static_cast<std::uint64_t>(st.st_size));
    add_u64(static_cast<std::uint64_t>(st.st_mtim.tv_sec) * 1000000000ull +
            static_cast<std::uint64_t>(st.st_mtim.tv_nsec));
    add_u64(static_cast<std::uint64_t>(st.st_ctim.tv_sec) * 1000000000ull +
            static_cast<std::uint64_t>(st.st_ctim.tv_nsec));
    std::uint64_t n = 0;
    if (::pread(fd.get(), &n, sizeof n, 0) == static_cast<ssize_t>(sizeof n)) {
      n = std::min<std::uint64_t>(n, static_cast<std::uint64_t>(st.st_size) - sizeof n);
      std::vector<char> header(n);
      if (n != 0 && ::pread(fd.get(), header.data(), n, sizeof n) == static_cast<ssize_t>(n))
        add(header.data(), n);
    }
  }
  add_u64(layout.page_size());
  add_u64(layout.page_count());
  // Fillers are told alive or dead by pid: processes of another pid namespace (another
  // container sharing /dev/shm) get a segment of their own.
  struct stat ns {};
  if (::stat("/proc/self/ns/pid", &ns) == 0) add_u64(ns.st_ino);
  boost::uuids::detail::sha1::digest_type d;
  sha.get_digest(d);
  SharedCacheKey key{};
  for (int i = 0; i < 5; ++i)
    for (int b = 0; b < 4; ++b) key[i * 4 + b] = static_cast<std::uint8_t>(d[i] >> (24 - 8 * b));
  return key;
}

std::string shared_cache_name(const SharedCacheKey& key) {
  return "/lema-shc-" + hex(key.data(), 16);
}

struct SharedHostCache::Impl {
  std::string name;
  Me me{};
  std::byte* base = nullptr;
  std::uint64_t total = 0;
  Header* h = nullptr;
  std::uint32_t* index = nullptr;  // per page: slot + 1, 0: absent
  SlotMeta* slots = nullptr;
  std::byte* pages = nullptr;
  std::uint64_t page_size = 0;
  std::int32_t rank = -1;
  std::uint32_t user_index = 0;  // this process's entry in h->users
  std::chrono::steady_clock::duration wait_limit{};
  std::mutex warned_mutex;
  std::vector<std::uint64_t> warned;  // fillers already named as slow (guarded by warned_mutex)

  // The filler of a busy page, as try_begin() saw it.
  struct Filler {
    std::uint64_t pid = 0, start = 0;
    std::int32_t rank = -1;
  };
  Outcome begin(PageId page, std::byte* dest, std::uint32_t* slot, Filler* busy_by);
  // Says once per filler that it was slow (Note [Slow fillers]).
  void name_slow_filler(const Filler& f, PageId page);

  ~Impl() {
    if (base != nullptr) ::munmap(base, total);
  }

  void adopt(void* p, std::uint64_t bytes) {
    base = static_cast<std::byte*>(p);
    total = bytes;
    h = reinterpret_cast<Header*>(base);
    index = reinterpret_cast<std::uint32_t*>(base + h->index_offset);
    slots = reinterpret_cast<SlotMeta*>(base + h->slots_offset);
    pages = base + h->data_offset;
    page_size = h->page_size;
  }
  void unmap() {
    if (base != nullptr) ::munmap(base, total);
    base = nullptr;
    h = nullptr;
  }
  std::byte* page_data(std::uint32_t slot) const { return pages + slot * page_size; }

  // Whether a live user pins `m`; forgets the pins of dead ones. Under the lock.
  bool pinned(SlotMeta& m) {
    bool any = false;
    for (std::uint32_t w = 0; w < kMaxUsers / 64; ++w)
      for (std::uint64_t bits = m.pinners[w]; bits != 0; bits &= bits - 1) {
        const std::uint32_t i = w * 64 + static_cast<std::uint32_t>(__builtin_ctzll(bits));
        const User& u = h->users[i];
        if (u.count != 0 && running(u.pid, u.start_ticks))
          any = true;
        else
          m.pinners[w] &= ~(1ull << (i % 64));
      }
    return any;
  }

  // Locks the segment; repairs what a process that died holding it may have left half done.
  void lock() {
    const int rc = ::pthread_mutex_lock(&h->mutex);
    if (rc == EOWNERDEAD) {
      repair();
      ::pthread_mutex_consistent(&h->mutex);
    } else if (rc != 0) {
      throw SystemError("shared host cache " + name + ": cannot lock it", rc);
    }
  }
  void unlock() noexcept { ::pthread_mutex_unlock(&h->mutex); }
  struct Guard {
    Impl& i;
    explicit Guard(Impl& impl) : i(impl) { i.lock(); }
    ~Guard() { i.unlock(); }
  };

  void repair() {
    spdlog::debug("shared host cache {}: a process died holding its lock; repairing", name);
    std::fill(index, index + h->page_count, 0u);
    for (std::uint32_t s = 0; s < h->slot_count; ++s) {
      SlotMeta& m = slots[s];
      if (m.state != kEmpty && m.page < h->page_count && index[m.page] == 0) {
        index[m.page] = s + 1;
      } else {
        m.state = kEmpty;
        m.referenced = 0;
      }
    }
    if (h->clock_hand >= h->slot_count) h->clock_hand = 0;
    purge_dead_users();
  }

  void purge_dead_users() {
    for (User& u : h->users)
      if (u.count != 0 && !running(u.pid, u.start_ticks)) u = User{};
  }
  std::uint32_t live_users() const {
    std::uint32_t n = 0;
    for (const User& u : h->users) n += u.count != 0 ? 1 : 0;
    return n;
  }
  void add_user() {
    purge_dead_users();
    for (std::uint32_t i = 0; i < kMaxUsers; ++i) {
      User& u = h->users[i];
      if (u.count != 0 && u.pid == me.pid && u.start_ticks == me.start_ticks) {
        ++u.count;
        user_index = i;
        return;
      }
    }
    for (std::uint32_t i = 0; i < kMaxUsers; ++i) {
      User& u = h->users[i];
      if (u.count == 0) {
        u = User{me.pid, me.start_ticks, 1, 0};
        user_index = i;
        // Pins a dead user of this entry left are not ours.
        for (std::uint64_t s = 0; s < h->slot_count; ++s)
          slots[s].pinners[i / 64] &= ~(1ull << (i % 64));
        return;
      }
    }
    throw SystemError("shared host cache " + name + ": more than " + std::to_string(kMaxUsers) +
                          " processes use it; open the checkpoint without --shared-host-cache",
                      EUSERS);
  }

  bool valid(const SharedCacheKey& key, std::uint64_t file_bytes, std::uint64_t want_page_size,
             std::uint64_t want_pages) const {
    if (file_bytes < sizeof(Header)) return false;
    const Header* hh = reinterpret_cast<const Header*>(base);
    if (std::memcmp(hh->magic, kMagic, sizeof kMagic) != 0 || hh->version != kVersion ||
        hh->header_bytes != sizeof(Header) || std::memcmp(hh->key, key.data(), key.size()) != 0 ||
        hh->page_size != want_page_size || hh->page_count != want_pages || hh->slot_count == 0 ||
        hh->slot_count > want_pages || hh->total_bytes != file_bytes)
      return false;
    const Geometry g = geometry(hh->page_count, hh->slot_count, hh->page_size);
    return g.total_bytes == hh->total_bytes && g.index_offset == hh->index_offset &&
           g.slots_offset == hh->slots_offset && g.data_offset == hh->data_offset;
  }

  // Builds a segment under a temporary name and links it to `name`: true when it is ours (and
  // we are its first user), false when another process linked one first.
  bool create(const SharedCacheKey& key, std::uint64_t page_size_, std::uint64_t page_count,
              std::uint64_t slot_count) {
    const Geometry g = geometry(page_count, slot_count, page_size_);
    std::random_device rd;
    const std::string tmp = name + "-tmp-" + std::to_string(me.pid) + "-" + std::to_string(rd());
    UniqueFd fd(::shm_open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (fd.get() < 0)
      throw SystemError("shared host cache: cannot create " + tmp, errno);
    struct Unlink {
      const std::string& n;
      ~Unlink() { ::shm_unlink(n.c_str()); }
    } unlink_tmp{tmp};
    // Reserve the memory now: a tmpfs short of space would otherwise SIGBUS a later write.
    const int rc = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(g.total_bytes));
    if (rc != 0)
      throw OutOfMemory("the shared host cache of " + format_size(slot_count * page_size_) +
                        " does not fit in " + kShmDirectory + " (" + std::strerror(rc) +
                        "); lower --shared-host-cache / LEMA_SHARED_HOST_CACHE or grow /dev/shm");
    void* p = ::mmap(nullptr, g.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED)
      throw SystemError("shared host cache: cannot map " + tmp, errno);
    auto* hh = new (p) Header{};
    std::memcpy(hh->magic, kMagic, sizeof kMagic);
    hh->version = kVersion;
    hh->header_bytes = sizeof(Header);
    std::memcpy(hh->key, key.data(), key.size());
    hh->page_size = page_size_;
    hh->page_count = page_count;
    hh->slot_count = slot_count;
    hh->total_bytes = g.total_bytes;
    hh->index_offset = g.index_offset;
    hh->slots_offset = g.slots_offset;
    hh->data_offset = g.data_offset;
    pthread_mutexattr_t attr;
    ::pthread_mutexattr_init(&attr);
    ::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    ::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    ::pthread_mutex_init(&hh->mutex, &attr);
    ::pthread_mutexattr_destroy(&attr);
    hh->users[0] = User{me.pid, me.start_ticks, 1, 0};
    user_index = 0;
    adopt(p, g.total_bytes);
    if (::link((kShmDirectory + tmp).c_str(), (kShmDirectory + name).c_str()) == 0) return true;
    const int err = errno;
    unmap();
    if (err == EEXIST) return false;
    throw SystemError("shared host cache: cannot publish " + name, err);
  }

  // Attaches to the segment under `name`: true when attached; false when there is none, or it
  // was retired or invalid (and unlinked): start over.
  bool attach(const SharedCacheKey& key, std::uint64_t want_page_size, std::uint64_t want_pages) {
    UniqueFd fd(::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0));
    if (fd.get() < 0) {
      if (errno == ENOENT) return false;
      throw SystemError("shared host cache: cannot open " + name, errno);
    }
    struct stat st {};
    LEMA_SYS_TRY(::fstat(fd.get(), &st));
    const auto size = static_cast<std::uint64_t>(st.st_size);
    void* p = size >= sizeof(Header)
                  ? ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0)
                  : MAP_FAILED;
    if (p != MAP_FAILED) {
      base = static_cast<std::byte*>(p);
      total = size;
    }
    if (p == MAP_FAILED || !valid(key, size, want_page_size, want_pages)) {
      spdlog::warn("shared host cache: {} is not a segment of this checkpoint's (left by another "
                   "version, or damaged); rebuilding it",
                   name);
      unmap();
      ::shm_unlink(name.c_str());
      return false;
    }
    adopt(p, size);
    const int rc = ::pthread_mutex_lock(&h->mutex);
    if (rc == ENOTRECOVERABLE) {  // its repair was cut short: nothing in it can be trusted
      spdlog::warn("shared host cache: {} lost its lock's state; rebuilding it", name);
      unmap();
      ::shm_unlink(name.c_str());
      return false;
    }
    if (rc == EOWNERDEAD) {
      repair();
      ::pthread_mutex_consistent(&h->mutex);
    } else if (rc != 0) {
      throw SystemError("shared host cache " + name + ": cannot lock it", rc);
    }
    struct Unlock {
      Impl& i;
      ~Unlock() { i.unlock(); }
    } unlock_at_exit{*this};
    if (h->retired != 0) {
      unmap_after_unlock_ = true;
      return false;
    }
    add_user();
    return true;
  }
  bool unmap_after_unlock_ = false;
};

SharedHostCache::SharedHostCache(const SharedCacheKey& key, std::uint64_t page_size,
                                 std::uint64_t page_count, std::uint64_t bytes)
    : impl_(std::make_unique<Impl>()) {
  LEMA_EXPECTS(page_size != 0 && page_count != 0, "shared host cache: no pages");
  const std::uint64_t slots = std::min(bytes / page_size, page_count);
  LEMA_EXPECTS(slots > 0, "the shared host cache of " + format_size(bytes) +
                              " holds no page of " + format_size(page_size) +
                              "; give at least one page (--shared-host-cache / "
                              "LEMA_SHARED_HOST_CACHE), or 0 for none");
  LEMA_EXPECTS(slots <= 0xFFFFFFFEull, "the shared host cache of " + format_size(bytes) +
                                           " has too many pages; raise the page size");
  Impl& i = *impl_;
  i.name = shared_cache_name(key);
  i.me = {static_cast<std::uint64_t>(::getpid()),
          profile_shm::process_start_ticks(static_cast<std::uint64_t>(::getpid()))};
  i.rank = my_rank();
  i.wait_limit = wait_limit_from_environment();
  for (int attempt = 0; attempt < 64; ++attempt) {
    if (i.attach(key, page_size, page_count)) {
      spdlog::debug("shared host cache: attached to {}", i.name);
      return;
    }
    if (i.unmap_after_unlock_) {
      i.unmap_after_unlock_ = false;
      i.unmap();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    if (i.create(key, page_size, page_count, slots)) {
      spdlog::debug("shared host cache: created {} ({} pages)", i.name, slots);
      return;
    }
  }
  throw SystemError("shared host cache: could not attach to " + i.name +
                        " (other processes kept replacing it); retry",
                    EAGAIN);
}

SharedHostCache::~SharedHostCache() {
  Impl& i = *impl_;
  if (i.h == nullptr) return;
  try {
    Impl::Guard g(i);
    for (User& u : i.h->users)
      if (u.count != 0 && u.pid == i.me.pid && u.start_ticks == i.me.start_ticks) {
        if (--u.count == 0) u = User{};
        break;
      }
    i.purge_dead_users();
    if (i.live_users() == 0) {
      i.h->retired = 1;
      ::shm_unlink(i.name.c_str());
      spdlog::debug("shared host cache: removed {} (last user out)", i.name);
    }
  } catch (...) {
    // Destructors never throw: the segment stays for the next user to recover.
  }
}

SharedHostCache::Outcome SharedHostCache::try_begin(PageId page, std::byte* dest,
                                                    std::uint32_t* slot) {
  return impl_->begin(page, dest, slot, nullptr);
}

SharedHostCache::Outcome SharedHostCache::Impl::begin(PageId page, std::byte* dest,
                                                      std::uint32_t* slot, Filler* busy_by) {
  Impl& i = *this;
  Header& h = *i.h;
  LEMA_ASSERT(page < h.page_count, "shared host cache: page out of range");
  Impl::Guard g(i);
  if (const std::uint32_t at = i.index[page]; at != 0) {
    SlotMeta& m = i.slots[at - 1];
    if (m.state == kReady) {
      std::memcpy(dest, i.page_data(at - 1), i.page_size);
      m.referenced = 1;
      return Outcome::copied;
    }
    if (running(m.filler_pid, m.filler_start)) {
      if (busy_by != nullptr) *busy_by = {m.filler_pid, m.filler_start, m.filler_rank};
      return Outcome::busy;
    }
    spdlog::debug("shared host cache {}: process {} died filling page {}; taking it over", i.name,
                  m.filler_pid, page);
    m.filler_pid = i.me.pid;
    m.filler_start = i.me.start_ticks;
    m.filler_rank = i.rank;
    *slot = at - 1;
    return Outcome::fill;
  }
  // Clock: two sweeps find an unreferenced slot when there is one not being filled.
  const auto n = static_cast<std::uint32_t>(h.slot_count);
  for (std::uint64_t step = 0; step < 2ull * n; ++step) {
    const std::uint32_t s = h.clock_hand;
    h.clock_hand = (s + 1) % n;
    SlotMeta& m = i.slots[s];
    if (m.state == kFilling && running(m.filler_pid, m.filler_start)) continue;
    if (m.state == kReady && m.referenced != 0) {
      m.referenced = 0;
      continue;
    }
    if (m.state == kReady && pinned(m)) continue;
    if (m.state != kEmpty) i.index[m.page] = 0;  // forgotten (or its dead filler's claim)
    m = SlotMeta{page, kFilling, 1, i.me.pid, i.me.start_ticks, i.rank, 0, {}};
    i.index[page] = s + 1;
    *slot = s;
    return Outcome::fill;
  }
  return Outcome::bypass;
}

SharedHostCache::Outcome SharedHostCache::wait_and_copy(PageId page, std::byte* dest,
                                                        std::uint32_t* slot) {
  Impl& i = *impl_;
  auto pause = std::chrono::microseconds(50);
  const auto since = std::chrono::steady_clock::now();
  Impl::Filler filler;
  for (;;) {
    const Outcome o = i.begin(page, dest, slot, &filler);
    if (o != Outcome::busy) return o;
    if (std::chrono::steady_clock::now() - since >= i.wait_limit) {
      i.name_slow_filler(filler, page);
      return Outcome::bypass;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(2000));
  }
}

void SharedHostCache::Impl::name_slow_filler(const Filler& f, PageId page) {
  {
    std::lock_guard lock(warned_mutex);
    if (std::find(warned.begin(), warned.end(), f.pid) != warned.end()) return;
    warned.push_back(f.pid);
  }
  const std::string who = f.rank >= 0 ? "rank " + std::to_string(f.rank) + " (pid " +
                                            std::to_string(f.pid) + ")"
                                      : "process " + std::to_string(f.pid);
  spdlog::warn("shared host cache: {} is alive but has been reading page {} for over {:.3g} s "
               "(LEMA_SHARED_CACHE_WAIT); reading its pages from disk here instead of waiting",
               who, page, std::chrono::duration<double>(wait_limit).count());
}

const std::byte* SharedHostCache::pin_ready(PageId page, std::uint32_t* slot) {
  Impl& i = *impl_;
  LEMA_ASSERT(page < i.h->page_count, "shared host cache: page out of range");
  std::lock_guard pins(g_pins_mutex);  // before the segment's: the order everywhere
  Impl::Guard g(i);
  const std::uint32_t at = i.index[page];
  if (at == 0 || i.slots[at - 1].state != kReady) return nullptr;
  SlotMeta& m = i.slots[at - 1];
  m.referenced = 1;
  m.pinners[i.user_index / 64] |= 1ull << (i.user_index % 64);
  ++g_pins[{i.name, at - 1}];
  *slot = at - 1;
  return i.page_data(at - 1);
}

void SharedHostCache::unpin(std::uint32_t slot) noexcept {
  Impl& i = *impl_;
  try {
    std::lock_guard pins(g_pins_mutex);
    const auto it = g_pins.find({i.name, slot});
    if (it == g_pins.end() || --it->second != 0) return;
    g_pins.erase(it);
    Impl::Guard g(i);
    i.slots[slot].pinners[i.user_index / 64] &= ~(1ull << (i.user_index % 64));
  } catch (...) {
    // The lock failed: the slot stays pinned until this process exits.
  }
}

void SharedHostCache::publish(std::uint32_t slot, const std::byte* bytes) {
  Impl& i = *impl_;
  // The slot is ours while filling: nobody reads or reuses it (Note [Shared host cache]).
  std::memcpy(i.page_data(slot), bytes, i.page_size);
  Impl::Guard g(i);
  i.slots[slot].state = kReady;
}

void SharedHostCache::abandon(std::uint32_t slot) noexcept {
  Impl& i = *impl_;
  try {
    Impl::Guard g(i);
    SlotMeta& m = i.slots[slot];
    if (m.state != kEmpty && m.page < i.h->page_count && i.index[m.page] == slot + 1)
      i.index[m.page] = 0;
    m = SlotMeta{};
  } catch (...) {
    // The lock failed: the slot stays filling by this live process until it exits, after which
    // a waiter takes it over.
  }
}

std::uint64_t SharedHostCache::bytes() const noexcept {
  return impl_->h->slot_count * impl_->page_size;
}
const std::string& SharedHostCache::name() const noexcept { return impl_->name; }
std::byte* SharedHostCache::data() const noexcept { return impl_->pages; }

void SharedHostCache::hold_lock_for_test() { impl_->lock(); }

std::uint32_t SharedHostCache::users() const {
  Impl::Guard g(*impl_);
  return impl_->live_users();
}

}  // namespace lema::runtime
