// A fake CUDA driver over host memory, loaded by the CUDA backends through LEMA_CUDA_DRIVER so
// their logic runs on every machine. It exports cuGetProcAddress_v2 (the only symbol the loader
// looks up) and implements, with CUDA 13 signatures, the entry points the backends use:
//  - reserve = mmap(PROT_NONE); cuMemCreate = a memfd; cuMemMap = MAP_FIXED|MAP_SHARED of the
//    memfd (no access until cuMemSetAccess, which mprotects); cuMemUnmap = back to PROT_NONE;
//  - a stream is a worker thread running its operations in order; an event is a position in a
//    stream and completes when the worker got past it; copies are memcpy on the worker, into
//    the allocation's own mapping (so a misuse is reported, never a crash);
//  - managed memory is plain host memory; prefetch and advice are recorded no-ops.
//
// Misuse is counted, remembered (fake_cuda_last_misuse) and printed; with LEMA_FAKE_CUDA_STRICT=1
// (or configure("strict", 1)) it aborts. Detected: a kernel touch (fake_cuda_stream_touch) or a
// copy of an unmapped address; cuMemUnmap while a copy or touch of that memory is pending;
// double release/free of any handle; cuMemMap outside a reservation or over a mapping; freeing a
// reservation that still has mappings; handles leaked at exit (printed by a destructor, counted
// by fake_cuda_live_handles).
//
// Every entry point the table hands out counts its calls (fake_cuda_calls), and a test can make
// the n-th next call of one return an error without doing anything (fake_cuda_fail).
//
// Settings (environment at load, or fake_cuda_configure): LEMA_FAKE_CUDA_MEMORY (bytes of device
// memory, default 1 GiB), LEMA_FAKE_CUDA_VMM (0: no virtual memory management),
// LEMA_FAKE_CUDA_DEVICES (default 1), LEMA_FAKE_CUDA_GRANULARITY (default 2 MiB),
// LEMA_FAKE_CUDA_MANAGED (0: no concurrent managed access), LEMA_FAKE_CUDA_STRICT.
//
// Thread safety: one mutex guards all state; workers run operations without it.
#include <cuda.h>
#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

struct Stream;

struct Op {
  std::function<void()> run;                       // runs without the lock
  std::function<bool()> ready;                     // evaluated under the lock; empty: always ready
  std::vector<CUmemGenericAllocationHandle> uses;  // allocations pending until it completes
};

struct Stream {
  std::deque<Op> queue;
  std::uint64_t submitted = 0;
  std::uint64_t completed = 0;
  bool held = false;
  bool stop = false;
  bool test = false;  // made by fake_cuda_test_stream (plays a compute stream)
  std::thread worker;
};

struct Event {
  std::shared_ptr<Stream> stream;  // null: never recorded (complete)
  std::uint64_t seq = 0;
};

struct Allocation {
  std::size_t size = 0;
  int fd = -1;
  std::byte* backing = nullptr;  // the whole allocation, read-write, for copies
  bool released = false;
  int mappings = 0;
  int pending = 0;  // copies/touches of its memory not yet complete
};

struct Mapping {
  std::size_t size = 0;
  CUmemGenericAllocationHandle handle = 0;
  std::size_t offset = 0;
  int prot = PROT_NONE;
};

std::uint64_t env_number(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  std::uint64_t n = std::strtoull(v, &end, 10);
  switch (end ? *end : '\0') {
    case 'K':
    case 'k':
      n <<= 10;
      break;
    case 'M':
    case 'm':
      n <<= 20;
      break;
    case 'G':
    case 'g':
      n <<= 30;
      break;
    default:
      break;
  }
  return n;
}

struct Driver {
  std::mutex mu;
  std::condition_variable cv;

  long long vmm = static_cast<long long>(env_number("LEMA_FAKE_CUDA_VMM", 1));
  long long devices = static_cast<long long>(env_number("LEMA_FAKE_CUDA_DEVICES", 1));
  long long memory = static_cast<long long>(env_number("LEMA_FAKE_CUDA_MEMORY", 1ull << 30));
  long long granularity =
      static_cast<long long>(env_number("LEMA_FAKE_CUDA_GRANULARITY", 2ull << 20));
  long long managed = static_cast<long long>(env_number("LEMA_FAKE_CUDA_MANAGED", 1));
  long long strict = static_cast<long long>(env_number("LEMA_FAKE_CUDA_STRICT", 0));
  long long hold_all = 0;  // every stream starts no further operation while set
  long long hold_backend = 0;  // the same for streams the code under test made (copy streams)

  std::size_t device_used = 0;
  int context_retains = 0;
  std::map<std::uintptr_t, std::size_t> reservations;
  std::map<std::uintptr_t, Mapping> mappings;
  std::map<CUmemGenericAllocationHandle, Allocation> allocations;
  CUmemGenericAllocationHandle next_handle = 1;
  std::map<Stream*, std::shared_ptr<Stream>> streams;
  std::shared_ptr<Stream> legacy;  // the default stream, created on first use, never destroyed
  std::set<Event*> events;
  std::map<void*, std::size_t> pinned;
  std::map<std::uintptr_t, std::size_t> registered;  // cuMemHostRegister
  std::uint64_t registered_copies = 0;  // cuMemcpyHtoDAsync whose source is registered memory
  std::map<std::uintptr_t, std::size_t> managed_ranges;
  std::map<std::uintptr_t, std::size_t> device_buffers;  // cuMemAlloc

  // Per entry point: calls so far, and the call number that fails (0: none) with what.
  struct EntryCalls {
    std::uint64_t calls = 0;
    std::uint64_t fail_at = 0;
    CUresult fail_with = CUDA_SUCCESS;
  };
  std::map<std::string, EntryCalls, std::less<>> entry_calls;

  std::uint64_t misuses = 0;
  std::string last_misuse;
  std::uint64_t prefetch_device = 0;
  std::uint64_t prefetch_host = 0;
};

// Never destroyed: worker threads of leaked streams may still wait on its condition variable
// while the process exits.
Driver& drv() {
  static Driver* d = new Driver();
  return *d;
}

using Lock = std::unique_lock<std::mutex>;

void misuse(Driver& d, const std::string& what) {
  ++d.misuses;
  d.last_misuse = what;
  std::fprintf(stderr, "fake CUDA driver: misuse: %s\n", what.c_str());
  if (d.strict != 0) {
    std::fprintf(stderr, "fake CUDA driver: aborting (strict mode)\n");
    std::abort();
  }
}

std::string hex(std::uintptr_t p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

void maybe_free(Driver& d, CUmemGenericAllocationHandle h) {
  auto it = d.allocations.find(h);
  if (it == d.allocations.end()) return;
  Allocation& a = it->second;
  if (!a.released || a.mappings > 0 || a.pending > 0) return;
  ::munmap(a.backing, a.size);
  ::close(a.fd);
  d.device_used -= a.size;
  d.allocations.erase(it);
}

void run_stream(Stream* s) {
  Driver& d = drv();
  Lock lk(d.mu);
  for (;;) {
    d.cv.wait(lk, [&] {
      if (s->queue.empty()) return s->stop;
      const bool held = s->held || d.hold_all != 0 || (d.hold_backend != 0 && !s->test);
      if (held && !s->stop) return false;
      const Op& front = s->queue.front();
      return !front.ready || front.ready();
    });
    if (s->queue.empty()) return;
    Op op = std::move(s->queue.front());
    s->queue.pop_front();
    lk.unlock();
    if (op.run) op.run();
    lk.lock();
    ++s->completed;
    for (CUmemGenericAllocationHandle h : op.uses) {
      auto it = d.allocations.find(h);
      if (it != d.allocations.end()) --it->second.pending;
      maybe_free(d, h);
    }
    d.cv.notify_all();
  }
}

std::shared_ptr<Stream> start_stream() {
  auto s = std::make_shared<Stream>();
  s->worker = std::thread(run_stream, s.get());
  return s;
}

// The stream for a handle (nullptr: the legacy default stream), or null for an unknown one.
std::shared_ptr<Stream> stream_of(Driver& d, CUstream h) {
  if (h == nullptr || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
    if (!d.legacy) d.legacy = start_stream();
    return d.legacy;
  }
  auto it = d.streams.find(reinterpret_cast<Stream*>(h));
  return it == d.streams.end() ? nullptr : it->second;
}

void enqueue(Driver& d, Stream& s, Op op) {
  for (CUmemGenericAllocationHandle h : op.uses) ++d.allocations.at(h).pending;
  s.queue.push_back(std::move(op));
  ++s.submitted;
  d.cv.notify_all();
}

bool event_complete(const Event& e) {
  return !e.stream || e.stream->completed >= e.seq;
}

// The mapping holding `p`, or end().
std::map<std::uintptr_t, Mapping>::iterator mapping_at(Driver& d, std::uintptr_t p) {
  auto it = d.mappings.upper_bound(p);
  if (it == d.mappings.begin()) return d.mappings.end();
  --it;
  return p < it->first + it->second.size ? it : d.mappings.end();
}

// The reservation holding [p, p + n), or end().
std::map<std::uintptr_t, std::size_t>::iterator reservation_of(Driver& d, std::uintptr_t p,
                                                               std::size_t n) {
  auto it = d.reservations.upper_bound(p);
  if (it == d.reservations.begin()) return d.reservations.end();
  --it;
  return p + n <= it->first + it->second ? it : d.reservations.end();
}

// The mappings exactly covering [p, p + n), in order; empty when there is a hole or a mapping
// sticks out of the range.
std::vector<std::map<std::uintptr_t, Mapping>::iterator> covering(Driver& d, std::uintptr_t p,
                                                                  std::size_t n) {
  std::vector<std::map<std::uintptr_t, Mapping>::iterator> out;
  std::uintptr_t cursor = p;
  while (cursor < p + n) {
    auto it = d.mappings.find(cursor);
    if (it == d.mappings.end() || cursor + it->second.size > p + n) return {};
    out.push_back(it);
    cursor += it->second.size;
  }
  return out;
}

bool managed_contains(Driver& d, std::uintptr_t p, std::size_t n) {
  auto it = d.managed_ranges.upper_bound(p);
  if (it == d.managed_ranges.begin()) return false;
  --it;
  return p + n <= it->first + it->second;
}

// ---- the entry points ----

// The results the fake returns, with the driver's names and texts for them.
struct ResultText {
  CUresult result;
  const char* name;
  const char* text;
};
constexpr ResultText kResultTexts[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
};

const ResultText* find_result_text(CUresult r) {
  for (const ResultText& t : kResultTexts) {
    if (t.result == r) return &t;
  }
  return nullptr;
}

CUresult fGetErrorString(CUresult r, const char** s) {
  const ResultText* t = find_result_text(r);
  *s = t != nullptr ? t->text : "unknown error";
  return t != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult fGetErrorName(CUresult r, const char** s) {
  const ResultText* t = find_result_text(r);
  *s = t != nullptr ? t->name : "CUDA_ERROR_UNKNOWN";
  return t != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult fDriverGetVersion(int* v) {
  *v = 13000;
  return CUDA_SUCCESS;
}

CUresult fInit(unsigned int) {
  Driver& d = drv();
  Lock lk(d.mu);
  return d.devices > 0 ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

CUresult fDeviceGetCount(int* n) {
  Driver& d = drv();
  Lock lk(d.mu);
  *n = static_cast<int>(d.devices);
  return CUDA_SUCCESS;
}

CUresult fDeviceGet(CUdevice* dev, int ordinal) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (ordinal < 0 || ordinal >= d.devices) return CUDA_ERROR_INVALID_DEVICE;
  *dev = ordinal;
  return CUDA_SUCCESS;
}

CUresult fDeviceGetName(char* name, int len, CUdevice) {
  std::snprintf(name, static_cast<std::size_t>(len), "%s", "Fake CUDA Device");
  return CUDA_SUCCESS;
}

CUresult fDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice dev) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (dev < 0 || dev >= d.devices) return CUDA_ERROR_INVALID_DEVICE;
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
      *v = d.vmm != 0;
      break;
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY:
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS:
      *v = d.managed != 0;
      break;
    default:
      *v = 0;
      break;
  }
  return CUDA_SUCCESS;
}

int g_context_token = 0;  // the primary context's address, as a handle

CUresult fPrimaryCtxRetain(CUcontext* ctx, CUdevice dev) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (dev < 0 || dev >= d.devices) return CUDA_ERROR_INVALID_DEVICE;
  ++d.context_retains;
  *ctx = reinterpret_cast<CUcontext>(&g_context_token);
  return CUDA_SUCCESS;
}

CUresult fPrimaryCtxRelease(CUdevice) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (d.context_retains == 0) {
    misuse(d, "cuDevicePrimaryCtxRelease of a context not retained");
    return CUDA_ERROR_INVALID_CONTEXT;
  }
  --d.context_retains;
  return CUDA_SUCCESS;
}

CUresult fCtxSetCurrent(CUcontext ctx) {
  return ctx == nullptr || ctx == reinterpret_cast<CUcontext>(&g_context_token)
             ? CUDA_SUCCESS
             : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult fMemGetInfo(std::size_t* free, std::size_t* total) {
  Driver& d = drv();
  Lock lk(d.mu);
  *total = static_cast<std::size_t>(d.memory);
  *free = *total > d.device_used ? *total - d.device_used : 0;
  return CUDA_SUCCESS;
}

bool valid_device_prop(Driver& d, const CUmemAllocationProp* prop) {
  return prop != nullptr && prop->type == CU_MEM_ALLOCATION_TYPE_PINNED &&
         prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE && prop->location.id >= 0 &&
         prop->location.id < d.devices;
}

CUresult fMemGetAllocationGranularity(std::size_t* g, const CUmemAllocationProp* prop,
                                      CUmemAllocationGranularity_flags) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (d.vmm == 0) return CUDA_ERROR_NOT_SUPPORTED;
  if (!valid_device_prop(d, prop)) return CUDA_ERROR_INVALID_VALUE;
  *g = static_cast<std::size_t>(d.granularity);
  return CUDA_SUCCESS;
}

CUresult fMemAddressReserve(CUdeviceptr* ptr, std::size_t size, std::size_t alignment, CUdeviceptr,
                            unsigned long long) {
  Driver& d = drv();
  Lock lk(d.mu);
  const auto g = static_cast<std::size_t>(d.granularity);
  if (d.vmm == 0) return CUDA_ERROR_NOT_SUPPORTED;
  if (size == 0 || size % g != 0 || (alignment != 0 && (alignment & (alignment - 1)) != 0))
    return CUDA_ERROR_INVALID_VALUE;
  const std::size_t align = alignment > g ? alignment : g;
  void* raw =
      ::mmap(nullptr, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  const auto lo = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t base = (lo + align - 1) / align * align;
  if (base > lo) ::munmap(raw, base - lo);
  if (base + size < lo + size + align)
    ::munmap(reinterpret_cast<void*>(base + size), lo + align - base);
  d.reservations[base] = size;
  *ptr = base;
  return CUDA_SUCCESS;
}

CUresult fMemAddressFree(CUdeviceptr ptr, std::size_t size) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto it = d.reservations.find(ptr);
  if (it == d.reservations.end() || it->second != size) {
    misuse(d, "cuMemAddressFree(" + hex(ptr) + ", " + std::to_string(size) +
                  ") of a range that is not a reservation (double free?)");
    return CUDA_ERROR_INVALID_VALUE;
  }
  auto m = d.mappings.lower_bound(ptr);
  if (m != d.mappings.end() && m->first < ptr + size) {
    misuse(d, "cuMemAddressFree(" + hex(ptr) + ") of a reservation that still has mappings");
    return CUDA_ERROR_INVALID_VALUE;
  }
  ::munmap(reinterpret_cast<void*>(ptr), size);
  d.reservations.erase(it);
  return CUDA_SUCCESS;
}

CUresult fMemCreate(CUmemGenericAllocationHandle* handle, std::size_t size,
                    const CUmemAllocationProp* prop, unsigned long long) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (d.vmm == 0) return CUDA_ERROR_NOT_SUPPORTED;
  if (!valid_device_prop(d, prop) || size == 0 ||
      size % static_cast<std::size_t>(d.granularity) != 0)
    return CUDA_ERROR_INVALID_VALUE;
  if (d.device_used + size > static_cast<std::size_t>(d.memory)) return CUDA_ERROR_OUT_OF_MEMORY;
  Allocation a;
  a.size = size;
  a.fd = ::memfd_create("fake-cuda-chunk", MFD_CLOEXEC);
  if (a.fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  void* backing = MAP_FAILED;
  if (::ftruncate(a.fd, static_cast<off_t>(size)) == 0)
    backing = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, a.fd, 0);
  if (backing == MAP_FAILED) {
    ::close(a.fd);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  a.backing = static_cast<std::byte*>(backing);
  d.device_used += size;
  *handle = d.next_handle++;
  d.allocations.emplace(*handle, a);
  return CUDA_SUCCESS;
}

CUresult fMemRelease(CUmemGenericAllocationHandle h) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto it = d.allocations.find(h);
  if (it == d.allocations.end() || it->second.released) {
    misuse(d, "cuMemRelease of allocation handle " + std::to_string(h) +
                  " that is not live (double release?)");
    return CUDA_ERROR_INVALID_VALUE;
  }
  it->second.released = true;  // freed once unmapped everywhere (as the driver does)
  maybe_free(d, h);
  return CUDA_SUCCESS;
}

CUresult fMemMap(CUdeviceptr ptr, std::size_t size, std::size_t offset,
                 CUmemGenericAllocationHandle h, unsigned long long flags) {
  Driver& d = drv();
  Lock lk(d.mu);
  const auto g = static_cast<std::size_t>(d.granularity);
  auto a = d.allocations.find(h);
  if (a == d.allocations.end() || a->second.released) {
    misuse(d, "cuMemMap of allocation handle " + std::to_string(h) + " that is not live");
    return CUDA_ERROR_INVALID_HANDLE;
  }
  if (flags != 0 || size == 0 || ptr % g != 0 || size % g != 0 || offset % g != 0 ||
      offset + size > a->second.size)
    return CUDA_ERROR_INVALID_VALUE;
  if (reservation_of(d, ptr, size) == d.reservations.end()) {
    misuse(d, "cuMemMap at " + hex(ptr) + " (" + std::to_string(size) +
                  " bytes) outside any reservation");
    return CUDA_ERROR_INVALID_VALUE;
  }
  auto next = d.mappings.lower_bound(ptr);
  if (mapping_at(d, ptr) != d.mappings.end() ||
      (next != d.mappings.end() && next->first < ptr + size)) {
    misuse(d, "cuMemMap at " + hex(ptr) + " over an existing mapping");
    return CUDA_ERROR_INVALID_VALUE;
  }
  void* p = ::mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_FIXED | MAP_SHARED,
                   a->second.fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  d.mappings[ptr] = Mapping{size, h, offset, PROT_NONE};
  ++a->second.mappings;
  return CUDA_SUCCESS;
}

CUresult fMemSetAccess(CUdeviceptr ptr, std::size_t size, const CUmemAccessDesc* desc,
                       std::size_t count) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (desc == nullptr || count != 1 || desc->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      desc->location.id < 0 || desc->location.id >= d.devices)
    return CUDA_ERROR_INVALID_VALUE;
  int prot = PROT_NONE;
  switch (desc->flags) {
    case CU_MEM_ACCESS_FLAGS_PROT_NONE:
      prot = PROT_NONE;
      break;
    case CU_MEM_ACCESS_FLAGS_PROT_READ:
      prot = PROT_READ;
      break;
    case CU_MEM_ACCESS_FLAGS_PROT_READWRITE:
      prot = PROT_READ | PROT_WRITE;
      break;
    default:
      return CUDA_ERROR_INVALID_VALUE;
  }
  auto pieces = covering(d, ptr, size);
  if (pieces.empty()) {
    misuse(d, "cuMemSetAccess(" + hex(ptr) + ", " + std::to_string(size) +
                  ") of a range not entirely mapped");
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (::mprotect(reinterpret_cast<void*>(ptr), size, prot) != 0) return CUDA_ERROR_INVALID_VALUE;
  for (auto& m : pieces) m->second.prot = prot;
  return CUDA_SUCCESS;
}

CUresult fMemUnmap(CUdeviceptr ptr, std::size_t size) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto pieces = covering(d, ptr, size);
  if (pieces.empty()) {
    misuse(d, "cuMemUnmap(" + hex(ptr) + ", " + std::to_string(size) +
                  ") of a range that is not exactly whole mappings");
    return CUDA_ERROR_INVALID_VALUE;
  }
  for (auto& m : pieces) {
    const Allocation& a = d.allocations.at(m->second.handle);
    if (a.pending > 0)
      misuse(d, "cuMemUnmap(" + hex(m->first) + ") while " + std::to_string(a.pending) +
                    " operation(s) on its memory (copy or kernel) are not complete");
  }
  void* p = ::mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_INVALID_VALUE;
  for (auto& m : pieces) {
    const CUmemGenericAllocationHandle h = m->second.handle;
    --d.allocations.at(h).mappings;
    d.mappings.erase(m);
    maybe_free(d, h);
  }
  return CUDA_SUCCESS;
}

CUresult fMemHostAlloc(void** pp, std::size_t bytes, unsigned int) {
  Driver& d = drv();
  void* p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  if (p == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
  Lock lk(d.mu);
  d.pinned[p] = bytes;
  *pp = p;
  return CUDA_SUCCESS;
}

CUresult fMemFreeHost(void* p) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (d.pinned.erase(p) == 0) {
    misuse(d, "cuMemFreeHost of " + hex(reinterpret_cast<std::uintptr_t>(p)) +
                  " that is not pinned memory from cuMemHostAlloc (double free?)");
    return CUDA_ERROR_INVALID_VALUE;
  }
  std::free(p);
  return CUDA_SUCCESS;
}

// Registered host memory: recorded, so copies from it can be counted and an unregister of memory
// already unmapped (the driver would touch pages that are gone) is a misuse.
CUresult fMemHostRegister(void* p, std::size_t bytes, unsigned int flags) {
  Driver& d = drv();
  Lock lk(d.mu);
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  if (p == nullptr || bytes == 0 || a % 4096 != 0) return CUDA_ERROR_INVALID_VALUE;
  if ((flags & CU_MEMHOSTREGISTER_PORTABLE) == 0)
    misuse(d, "cuMemHostRegister of " + hex(a) + " without CU_MEMHOSTREGISTER_PORTABLE");
  auto next = d.registered.lower_bound(a);
  if ((next != d.registered.end() && next->first < a + bytes) ||
      (next != d.registered.begin() && std::prev(next)->first + std::prev(next)->second > a))
    return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
  d.registered[a] = bytes;
  return CUDA_SUCCESS;
}

CUresult fMemHostUnregister(void* p) {
  Driver& d = drv();
  Lock lk(d.mu);
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = d.registered.find(a);
  if (it == d.registered.end()) {
    misuse(d, "cuMemHostUnregister of " + hex(a) + " that is not registered");
    return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
  }
  unsigned char v = 0;
  if (::mincore(p, 4096, &v) != 0 && errno == ENOMEM)
    misuse(d, "cuMemHostUnregister of " + hex(a) + " after its memory was unmapped");
  d.registered.erase(it);
  return CUDA_SUCCESS;
}

bool registered_source(const Driver& d, const void* src, std::size_t n) {
  const auto a = reinterpret_cast<std::uintptr_t>(src);
  auto it = d.registered.upper_bound(a);
  return it != d.registered.begin() && a + n <= std::prev(it)->first + std::prev(it)->second;
}

CUresult fMemAlloc(CUdeviceptr* ptr, std::size_t bytes) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  if (d.device_used + bytes > static_cast<std::size_t>(d.memory)) return CUDA_ERROR_OUT_OF_MEMORY;
  void* p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  if (p == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
  d.device_used += bytes;
  *ptr = reinterpret_cast<CUdeviceptr>(p);
  d.device_buffers[*ptr] = bytes;
  return CUDA_SUCCESS;
}

CUresult fMemAllocManaged(CUdeviceptr* ptr, std::size_t bytes, unsigned int flags) {
  Driver& d = drv();
  if (bytes == 0 || (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST))
    return CUDA_ERROR_INVALID_VALUE;
  const std::size_t n = (bytes + 4095) / 4096 * 4096;
  void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  Lock lk(d.mu);
  *ptr = reinterpret_cast<CUdeviceptr>(p);
  d.managed_ranges[*ptr] = n;
  return CUDA_SUCCESS;
}

CUresult fMemFree(CUdeviceptr ptr) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (auto it = d.managed_ranges.find(ptr); it != d.managed_ranges.end()) {
    ::munmap(reinterpret_cast<void*>(ptr), it->second);
    d.managed_ranges.erase(it);
    return CUDA_SUCCESS;
  }
  if (auto it = d.device_buffers.find(ptr); it != d.device_buffers.end()) {
    d.device_used -= it->second;
    std::free(reinterpret_cast<void*>(ptr));
    d.device_buffers.erase(it);
    return CUDA_SUCCESS;
  }
  misuse(d, "cuMemFree of " + hex(ptr) + " that is not a live allocation (double free?)");
  return CUDA_ERROR_INVALID_VALUE;
}

CUresult fMemPrefetchAsync(CUdeviceptr ptr, std::size_t n, CUmemLocation loc, unsigned int flags,
                           CUstream stream) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (flags != 0 || !managed_contains(d, ptr, n)) return CUDA_ERROR_INVALID_VALUE;
  if (loc.type == CU_MEM_LOCATION_TYPE_DEVICE) {
    if (loc.id < 0 || loc.id >= d.devices) return CUDA_ERROR_INVALID_DEVICE;
    ++d.prefetch_device;
  } else if (loc.type == CU_MEM_LOCATION_TYPE_HOST) {
    ++d.prefetch_host;
  } else {
    return CUDA_ERROR_INVALID_VALUE;
  }
  auto s = stream_of(d, stream);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  enqueue(d, *s, Op{});
  return CUDA_SUCCESS;
}

CUresult fMemAdvise(CUdeviceptr ptr, std::size_t n, CUmem_advise advice, CUmemLocation loc) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (!managed_contains(d, ptr, n) || advice < CU_MEM_ADVISE_SET_READ_MOSTLY ||
      advice > CU_MEM_ADVISE_UNSET_ACCESSED_BY)
    return CUDA_ERROR_INVALID_VALUE;
  if (loc.type == CU_MEM_LOCATION_TYPE_DEVICE && (loc.id < 0 || loc.id >= d.devices))
    return CUDA_ERROR_INVALID_DEVICE;
  return CUDA_SUCCESS;
}

CUresult fMemcpyHtoDAsync(CUdeviceptr dst, const void* src, std::size_t n, CUstream stream) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto s = stream_of(d, stream);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  std::byte* target = nullptr;
  Op op;
  auto m = mapping_at(d, dst);
  if (m != d.mappings.end()) {
    if (dst + n > m->first + m->second.size) return CUDA_ERROR_INVALID_VALUE;
    const Allocation& a = d.allocations.at(m->second.handle);
    target = a.backing + m->second.offset + (dst - m->first);
    op.uses.push_back(m->second.handle);
  } else if (auto b = d.device_buffers.upper_bound(dst);
             b != d.device_buffers.begin() &&
             dst + n <= std::prev(b)->first + std::prev(b)->second) {
    target = reinterpret_cast<std::byte*>(dst);
  } else {
    misuse(d, "cuMemcpyHtoDAsync to " + hex(dst) + ", an address with no device memory mapped");
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (registered_source(d, src, n)) ++d.registered_copies;
  op.run = [target, src, n] { std::memcpy(target, src, n); };
  enqueue(d, *s, std::move(op));
  return CUDA_SUCCESS;
}

// Synchronous, as the driver's: reads the allocation's own memory behind `src`.
CUresult fMemcpyDtoH(void* dst, CUdeviceptr src, std::size_t n) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto m = mapping_at(d, src);
  if (m == d.mappings.end() || src + n > m->first + m->second.size) {
    misuse(d, "cuMemcpyDtoH from " + hex(src) + ", an address with no device memory mapped");
    return CUDA_ERROR_INVALID_VALUE;
  }
  const Allocation& a = d.allocations.at(m->second.handle);
  std::memcpy(dst, a.backing + m->second.offset + (src - m->first), n);
  return CUDA_SUCCESS;
}

CUresult fStreamCreate(CUstream* out, unsigned int) {
  Driver& d = drv();
  auto s = start_stream();
  Lock lk(d.mu);
  d.streams[s.get()] = s;
  *out = reinterpret_cast<CUstream>(s.get());
  return CUDA_SUCCESS;
}

CUresult fStreamDestroy(CUstream h) {
  Driver& d = drv();
  std::shared_ptr<Stream> s;
  {
    Lock lk(d.mu);
    auto it = d.streams.find(reinterpret_cast<Stream*>(h));
    if (it == d.streams.end()) {
      misuse(d, "cuStreamDestroy of a stream that is not live (double destroy?)");
      return CUDA_ERROR_INVALID_HANDLE;
    }
    s = it->second;
    d.streams.erase(it);
    // As the driver does: the work already queued still completes.
    s->stop = true;
    s->held = false;
    d.cv.notify_all();
  }
  s->worker.join();
  return CUDA_SUCCESS;
}

CUresult fStreamSynchronize(CUstream h) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto s = stream_of(d, h);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  const std::uint64_t target = s->submitted;
  d.cv.wait(lk, [&] { return s->completed >= target; });
  return CUDA_SUCCESS;
}

CUresult fStreamWaitEvent(CUstream h, CUevent ev, unsigned int) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto s = stream_of(d, h);
  auto* e = reinterpret_cast<Event*>(ev);
  if (!s || d.events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
  Op op;
  // The event's position now; later re-records do not move this wait (as in CUDA).
  op.ready = [stream = e->stream, seq = e->seq] { return !stream || stream->completed >= seq; };
  enqueue(d, *s, std::move(op));
  return CUDA_SUCCESS;
}

CUresult fEventCreate(CUevent* out, unsigned int) {
  Driver& d = drv();
  auto* e = new Event();
  Lock lk(d.mu);
  d.events.insert(e);
  *out = reinterpret_cast<CUevent>(e);
  return CUDA_SUCCESS;
}

CUresult fEventRecord(CUevent ev, CUstream h) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto* e = reinterpret_cast<Event*>(ev);
  auto s = stream_of(d, h);
  if (!s || d.events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
  e->stream = s;
  e->seq = s->submitted;
  return CUDA_SUCCESS;
}

CUresult fEventQuery(CUevent ev) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto* e = reinterpret_cast<Event*>(ev);
  if (d.events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
  return event_complete(*e) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult fEventSynchronize(CUevent ev) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto* e = reinterpret_cast<Event*>(ev);
  if (d.events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
  d.cv.wait(lk, [&] { return event_complete(*e); });
  return CUDA_SUCCESS;
}

CUresult fEventDestroy(CUevent ev) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto* e = reinterpret_cast<Event*>(ev);
  if (d.events.erase(e) == 0) {
    misuse(d, "cuEventDestroy of an event that is not live (double destroy?)");
    return CUDA_ERROR_INVALID_HANDLE;
  }
  delete e;
  return CUDA_SUCCESS;
}

struct Entry {
  const char* name;
  void* fn;
};

// Counts a call of the entry point `name`; returns the error injected for this call, if any.
CUresult count_call(const char* name) {
  Driver& d = drv();
  Lock lk(d.mu);
  Driver::EntryCalls& e = d.entry_calls[name];
  ++e.calls;
  if (e.fail_at == 0 || e.calls != e.fail_at) return CUDA_SUCCESS;
  e.fail_at = 0;
  return e.fail_with;
}

// What the table hands out for `Fn`: counts the call, then fails it or calls `Fn`.
template <auto Fn>
struct Counted;
template <typename... Args, CUresult (*Fn)(Args...)>
struct Counted<Fn> {
  static inline const char* name = nullptr;
  static CUresult call(Args... args) {
    if (const CUresult injected = count_call(name); injected != CUDA_SUCCESS) return injected;
    return Fn(args...);
  }
};

template <auto Fn>
Entry entry(const char* name) {
  Counted<Fn>::name = name;
  return {name, reinterpret_cast<void*>(&Counted<Fn>::call)};
}

const std::vector<Entry>& entries() {
  static const std::vector<Entry> table = {
      entry<fGetErrorString>("cuGetErrorString"),
      entry<fGetErrorName>("cuGetErrorName"),
      entry<fDriverGetVersion>("cuDriverGetVersion"),
      entry<fInit>("cuInit"),
      entry<fDeviceGetCount>("cuDeviceGetCount"),
      entry<fDeviceGet>("cuDeviceGet"),
      entry<fDeviceGetName>("cuDeviceGetName"),
      entry<fDeviceGetAttribute>("cuDeviceGetAttribute"),
      entry<fPrimaryCtxRetain>("cuDevicePrimaryCtxRetain"),
      entry<fPrimaryCtxRelease>("cuDevicePrimaryCtxRelease"),
      entry<fCtxSetCurrent>("cuCtxSetCurrent"),
      entry<fMemGetInfo>("cuMemGetInfo"),
      entry<fMemGetAllocationGranularity>("cuMemGetAllocationGranularity"),
      entry<fMemAddressReserve>("cuMemAddressReserve"),
      entry<fMemAddressFree>("cuMemAddressFree"),
      entry<fMemCreate>("cuMemCreate"),
      entry<fMemRelease>("cuMemRelease"),
      entry<fMemMap>("cuMemMap"),
      entry<fMemUnmap>("cuMemUnmap"),
      entry<fMemSetAccess>("cuMemSetAccess"),
      entry<fMemHostAlloc>("cuMemHostAlloc"),
      entry<fMemFreeHost>("cuMemFreeHost"),
      entry<fMemHostRegister>("cuMemHostRegister"),
      entry<fMemHostUnregister>("cuMemHostUnregister"),
      entry<fMemAlloc>("cuMemAlloc"),
      entry<fMemAllocManaged>("cuMemAllocManaged"),
      entry<fMemFree>("cuMemFree"),
      entry<fMemPrefetchAsync>("cuMemPrefetchAsync"),
      entry<fMemAdvise>("cuMemAdvise"),
      entry<fMemcpyHtoDAsync>("cuMemcpyHtoDAsync"),
      entry<fMemcpyDtoH>("cuMemcpyDtoH"),
      entry<fStreamCreate>("cuStreamCreate"),
      entry<fStreamDestroy>("cuStreamDestroy"),
      entry<fStreamSynchronize>("cuStreamSynchronize"),
      entry<fStreamWaitEvent>("cuStreamWaitEvent"),
      entry<fEventCreate>("cuEventCreate"),
      entry<fEventRecord>("cuEventRecord"),
      entry<fEventQuery>("cuEventQuery"),
      entry<fEventSynchronize>("cuEventSynchronize"),
      entry<fEventDestroy>("cuEventDestroy"),
  };
  return table;
}

std::uint64_t live_handles(Driver& d) {
  std::uint64_t streams = d.streams.size();
  return d.reservations.size() + d.allocations.size() + d.mappings.size() + streams +
         d.events.size() + d.pinned.size() + d.registered.size() + d.managed_ranges.size() + d.device_buffers.size() +
         static_cast<std::uint64_t>(d.context_retains);
}

// Leaked handles at exit (or at unload) are reported, not freed.
__attribute__((destructor)) void report_leaks() {
  Driver& d = drv();
  Lock lk(d.mu, std::try_to_lock);
  if (!lk.owns_lock()) return;
  const std::uint64_t n = live_handles(d);
  if (n == 0) return;
  std::fprintf(stderr,
               "fake CUDA driver: %llu handle(s) leaked at exit: %zu reservation(s), %zu "
               "allocation(s), %zu mapping(s), %zu stream(s), %zu event(s), %zu pinned buffer(s), "
               "%zu managed range(s), %zu device buffer(s), %d context retain(s)\n",
               static_cast<unsigned long long>(n), d.reservations.size(), d.allocations.size(),
               d.mappings.size(), d.streams.size(), d.events.size(), d.pinned.size(),
               d.managed_ranges.size(), d.device_buffers.size(), d.context_retains);
}

}  // namespace

// ---- what the loader looks up ----

FAKE_EXPORT CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int cudaVersion,
                                         cuuint64_t, CUdriverProcAddressQueryResult* status) {
  if (symbol == nullptr || pfn == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *pfn = nullptr;
  for (const Entry& e : entries()) {
    if (std::strcmp(e.name, symbol) != 0) continue;
    // The table has CUDA 13 signatures only; an older caller would call them wrongly.
    if (cudaVersion < 13000) {
      if (status) *status = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
      return CUDA_ERROR_NOT_FOUND;
    }
    *pfn = e.fn;
    if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
    return CUDA_SUCCESS;
  }
  if (status) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  return CUDA_ERROR_NOT_FOUND;
}

// ---- control and inspection for tests (fake_cuda_control.hpp) ----

FAKE_EXPORT long long fake_cuda_configure(const char* key, long long value) {
  Driver& d = drv();
  Lock lk(d.mu);
  long long* slot = nullptr;
  const std::string k = key;
  if (k == "vmm") slot = &d.vmm;
  if (k == "devices") slot = &d.devices;
  if (k == "memory") slot = &d.memory;
  if (k == "granularity") slot = &d.granularity;
  if (k == "managed") slot = &d.managed;
  if (k == "strict") slot = &d.strict;
  if (k == "hold") slot = &d.hold_all;
  if (k == "hold_backend") slot = &d.hold_backend;
  if (slot == nullptr) {
    std::fprintf(stderr, "fake CUDA driver: unknown setting '%s'\n", key);
    std::abort();
  }
  const long long old = *slot;
  *slot = value;
  d.cv.notify_all();
  return old;
}

FAKE_EXPORT std::uint64_t fake_cuda_calls(const char* entry) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto it = d.entry_calls.find(std::string_view(entry));
  return it == d.entry_calls.end() ? 0 : it->second.calls;
}

// The `nth` next call of `entry` (1: the next one) returns `result` and does nothing; nth == 0
// cancels a failure not yet reached.
FAKE_EXPORT void fake_cuda_fail(const char* entry, std::uint64_t nth, int result) {
  Driver& d = drv();
  Lock lk(d.mu);
  Driver::EntryCalls& e = d.entry_calls[entry];
  e.fail_at = nth == 0 ? 0 : e.calls + nth;
  e.fail_with = static_cast<CUresult>(result);
}

FAKE_EXPORT std::uint64_t fake_cuda_misuse_count() {
  Driver& d = drv();
  Lock lk(d.mu);
  return d.misuses;
}

FAKE_EXPORT void fake_cuda_last_misuse(char* buf, std::size_t len) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (len > 0) std::snprintf(buf, len, "%s", d.last_misuse.c_str());
}

FAKE_EXPORT std::uint64_t fake_cuda_live_handles() {
  Driver& d = drv();
  Lock lk(d.mu);
  return live_handles(d);
}

FAKE_EXPORT int fake_cuda_query_mapped(const void* addr) {
  Driver& d = drv();
  Lock lk(d.mu);
  const auto p = reinterpret_cast<std::uintptr_t>(addr);
  auto m = mapping_at(d, p);
  if (m != d.mappings.end()) {
    if (m->second.prot == PROT_NONE) return 1;
    return (m->second.prot & PROT_WRITE) ? 3 : 2;
  }
  return reservation_of(d, p, 1) != d.reservations.end() ? 0 : -1;
}

FAKE_EXPORT void fake_cuda_stream_hold(void* stream, int held) {
  Driver& d = drv();
  Lock lk(d.mu);
  if (auto s = stream_of(d, static_cast<CUstream>(stream))) s->held = held != 0;
  d.cv.notify_all();
}

// A kernel reading [addr, addr + bytes): its memory is in use until the operation completes.
// False (a misuse) when part of the range is not mapped for the device. Lock held.
bool kernel_op(Driver& d, const void* addr, std::size_t bytes, Op& op) {
  const auto lo = reinterpret_cast<std::uintptr_t>(addr);
  for (std::uintptr_t p = lo; p < lo + bytes;) {
    auto m = mapping_at(d, p);
    if (m == d.mappings.end() || m->second.prot == PROT_NONE) {
      misuse(d, "a kernel touched " + hex(p) + ", which is not mapped for the device");
      return false;
    }
    op.uses.push_back(m->second.handle);
    p = m->first + m->second.size;
  }
  return true;
}

// Returns 0, or -1 (a misuse, or an unknown stream).
FAKE_EXPORT int fake_cuda_stream_touch(void* stream, const void* addr, std::size_t bytes) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto s = stream_of(d, static_cast<CUstream>(stream));
  Op op;
  if (!s || !kernel_op(d, addr, bytes, op)) return -1;
  enqueue(d, *s, std::move(op));
  return 0;
}

// A kernel that hashes the bytes of [addr, addr + bytes) into *out when it runs: what a kernel
// ordered after the copies it depends on reads.
FAKE_EXPORT int fake_cuda_stream_sum(void* stream, const void* addr, std::size_t bytes,
                                     std::uint64_t* out) {
  Driver& d = drv();
  Lock lk(d.mu);
  auto s = stream_of(d, static_cast<CUstream>(stream));
  Op op;
  if (!s || !kernel_op(d, addr, bytes, op)) return -1;
  op.run = [addr, bytes, out] {
    std::uint64_t sum = 0;
    const auto* p = static_cast<const unsigned char*>(addr);
    for (std::size_t i = 0; i < bytes; ++i) sum = sum * 1099511628211ull + p[i];
    *out = sum;
  };
  enqueue(d, *s, std::move(op));
  return 0;
}

FAKE_EXPORT std::uint64_t fake_cuda_prefetches(int to_device) {
  Driver& d = drv();
  Lock lk(d.mu);
  return to_device ? d.prefetch_device : d.prefetch_host;
}

FAKE_EXPORT std::uint64_t fake_cuda_registered_copies() {
  Driver& d = drv();
  Lock lk(d.mu);
  return d.registered_copies;
}

FAKE_EXPORT void* fake_cuda_test_stream(void* stream, int create) {
  if (create) {
    CUstream s = nullptr;
    fStreamCreate(&s, 0);
    Driver& d = drv();
    Lock lk(d.mu);
    if (auto st = stream_of(d, s)) st->test = true;
    return s;
  }
  fStreamDestroy(static_cast<CUstream>(stream));
  return nullptr;
}
