// The writer's side of a profile segment: creation, the process's segment, publishers.
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#include "lema/base/error.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/profile.hpp"
#include "lema/runtime/profile_file.hpp"
#include "profile_shm.hpp"

namespace lema::runtime {

namespace bip = boost::interprocess;
using namespace profile_shm;

struct ProfileSegment::Impl {
  Options options;
  bip::shared_memory_object shm;
  bip::mapped_region region;
  Header* header = nullptr;
  SourceSlot* slots = nullptr;
  std::byte* arena = nullptr;
  EventSlot* events = nullptr;
  std::uint64_t mask = 0;
  std::mutex open_mutex;  // serializes publishers' opens (the arena); never on the hot path
};

std::int32_t layer_of(std::string_view name) {
  constexpr std::string_view kKey = "layers.";
  for (std::size_t at = name.find(kKey); at != std::string_view::npos;
       at = name.find(kKey, at + 1)) {
    const char* first = name.data() + at + kKey.size();
    const char* last = name.data() + name.size();
    std::int32_t n = 0;
    auto [end, ec] = std::from_chars(first, last, n);
    if (ec == std::errc() && end != first && end < last && *end == '.') return n;
  }
  return -1;
}

std::vector<ProfileTensor> profile_tensors(const Layout& layout) {
  std::vector<ProfileTensor> out;
  out.reserve(layout.tensors().size());
  const std::uint64_t ps = layout.page_size();
  for (const TensorPlacement& t : layout.tensors()) {
    ProfileTensor p;
    p.name = t.name;
    p.first_page = static_cast<PageId>(t.offset / ps);
    const std::uint64_t end = t.nbytes == 0 ? t.offset : t.offset + t.nbytes - 1;
    p.page_count = t.nbytes == 0 ? 0 : static_cast<std::uint32_t>(end / ps - t.offset / ps + 1);
    p.layer = layer_of(t.name);
    out.push_back(std::move(p));
  }
  return out;
}

std::string ProfileSegment::name_for(pid_t pid) {
  return "lema-prof-" + std::to_string(pid);
}

ProfileSegment::ProfileSegment(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::shared_ptr<ProfileSegment> ProfileSegment::create(Options options) {
  LEMA_EXPECTS(!options.name.empty(), "a profile segment needs a name");
  LEMA_EXPECTS(options.max_sources > 0 && options.max_sources <= 65535,
               "a profile segment holds 1 to 65535 publishers");
  options.event_capacity = std::bit_ceil(std::max<std::size_t>(options.event_capacity, 2));
  const Geometry g = geometry(options.max_sources, options.layout_bytes, options.event_capacity);
  auto impl = std::make_unique<Impl>();
  // Readers find segments by listing /dev/shm, so one must never be seen half-made: it is built
  // under a private name and renamed into place (which also replaces a segment left over by a
  // process that had our pid and died).
  const std::string building = "lema-init-" + std::to_string(::getpid()) + "-" + options.name;
  try {
    bip::shared_memory_object::remove(building.c_str());
    bip::permissions owner_only(0600);
    impl->shm =
        bip::shared_memory_object(bip::create_only, building.c_str(), bip::read_write, owner_only);
    impl->shm.truncate(static_cast<bip::offset_t>(g.total_bytes));
    impl->region = bip::mapped_region(impl->shm, bip::read_write);
  } catch (const bip::interprocess_exception& e) {
    bip::shared_memory_object::remove(building.c_str());
    throw SystemError("cannot create the profile segment /dev/shm/" + options.name + " of " +
                          std::to_string(g.total_bytes) + " bytes: " + e.what(),
                      e.get_native_error());
  }
  auto* base = static_cast<std::byte*>(impl->region.get_address());
  // The memory is zero-filled; construct the objects in place before anyone reads them.
  auto* h = new (base) Header{};
  std::memcpy(h->magic, kMagic, sizeof(kMagic));
  h->version = kVersion;
  h->header_bytes = sizeof(Header);
  h->pid = static_cast<std::uint64_t>(::getpid());
  h->recorder_pid = options.recorder_pid;
  h->created_ns = now_ns();
  h->start_ticks = process_start_ticks(h->pid);
  h->total_bytes = g.total_bytes;
  h->max_sources = static_cast<std::uint32_t>(options.max_sources);
  h->slot_bytes = sizeof(SourceSlot);
  h->event_capacity = options.event_capacity;
  h->slots_offset = g.slots_offset;
  h->arena_offset = g.arena_offset;
  h->arena_bytes = g.arena_bytes;
  h->events_offset = g.events_offset;
  impl->header = h;
  impl->slots = reinterpret_cast<SourceSlot*>(base + g.slots_offset);
  for (std::size_t i = 0; i < options.max_sources; ++i) new (&impl->slots[i]) SourceSlot{};
  impl->arena = base + g.arena_offset;
  impl->events = reinterpret_cast<EventSlot*>(base + g.events_offset);
  for (std::size_t i = 0; i < options.event_capacity; ++i) new (&impl->events[i]) EventSlot{};
  impl->mask = options.event_capacity - 1;
  if (::rename((kShmDirectory + building).c_str(), (kShmDirectory + options.name).c_str()) != 0) {
    const int err = errno;
    bip::shared_memory_object::remove(building.c_str());
    throw SystemError("cannot publish the profile segment " + kShmDirectory + options.name, err);
  }
  impl->options = std::move(options);
  return std::shared_ptr<ProfileSegment>(new ProfileSegment(std::move(impl)));
}

ProfileSegment::~ProfileSegment() {
  Impl& m = *impl_;
  if (!m.options.save_to.empty()) {
    // Nobody drains this segment: keep what the ring still holds.
    try {
      SegmentView view(static_cast<const std::byte*>(m.region.get_address()), m.region.get_size(),
                       m.options.name);
      Recording rec;
      rec.pid = m.header->pid;
      rec.start_ns = m.header->created_ns;
      rec.end_ns = now_ns();
      rec.command = program_invocation_name;
      rec.sources = view.sources();
      view.drain(rec.events, true);
      std::stable_sort(
          rec.events.begin(), rec.events.end(),
          [](const ProfileEvent& a, const ProfileEvent& b) { return a.time_ns < b.time_ns; });
      rec.dropped = view.dropped();
      save_recording(rec, m.options.save_to);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "warning: the profile could not be saved to %s: %s\n",
                   m.options.save_to.c_str(), e.what());
    }
  }
  // A recorder that still runs removes the segment after its last read.
  const auto recorder = static_cast<pid_t>(m.options.recorder_pid);
  if (recorder == 0 || (::kill(recorder, 0) != 0 && errno == ESRCH))
    bip::shared_memory_object::remove(m.options.name.c_str());
}

const std::string& ProfileSegment::name() const noexcept {
  return impl_->options.name;
}
std::size_t ProfileSegment::event_capacity() const noexcept {
  return impl_->options.event_capacity;
}

std::shared_ptr<ProfileSegment> ProfileSegment::process() {
  static std::mutex mutex;
  static bool tried = false;
  static std::shared_ptr<ProfileSegment> segment;
  std::lock_guard lock(mutex);
  if (tried) return segment;
  tried = true;
  const char* path = std::getenv(kProfileEnv);
  if (path == nullptr || *path == '\0') return nullptr;
  remove_orphans();  // a killed run's segment (4 MiB each) would stay until reboot
  Options o;
  o.name = name_for(::getpid());
  if (const char* rec = std::getenv(kProfileRecorderEnv); rec != nullptr && *rec != '\0') {
    o.recorder_pid = std::strtoull(rec, nullptr, 10);
  } else {
    o.save_to = path;
  }
  try {
    segment = create(std::move(o));
  } catch (const std::exception& e) {
    spdlog::warn("profiling is off: {}", e.what());
  }
  return segment;
}

// ---- ProfilePublisher ----

namespace {

void copy_text(char* dst, std::size_t cap, std::string_view src) {
  const std::size_t n = std::min(cap - 1, src.size());
  std::memcpy(dst, src.data(), n);
  dst[n] = '\0';
}

template <typename T>
void put(std::byte*& at, T v) {
  std::memcpy(at, &v, sizeof(T));
  at += sizeof(T);
}

}  // namespace

ProfilePublisher::ProfilePublisher(std::shared_ptr<ProfileSegment> segment, std::uint16_t index)
    : segment_(std::move(segment)), index_(index) {}

std::unique_ptr<ProfilePublisher> ProfilePublisher::open_if_enabled(const ProfileSourceInfo& info) {
  auto segment = ProfileSegment::process();
  if (!segment) return nullptr;
  return open(std::move(segment), info);
}

std::unique_ptr<ProfilePublisher> ProfilePublisher::open(std::shared_ptr<ProfileSegment> segment,
                                                         const ProfileSourceInfo& info) {
  ProfileSegment::Impl& m = *segment->impl_;
  std::lock_guard lock(m.open_mutex);
  const std::uint32_t index = m.header->sources.load(std::memory_order_relaxed);
  if (index >= m.header->max_sources) {
    spdlog::warn("profile segment {} is full ({} publishers); this one is not profiled",
                 m.options.name, m.header->max_sources);
    return nullptr;
  }
  SourceSlot& s = m.slots[index];
  std::uint64_t need = 0;
  for (const ProfileTensor& t : info.tensors)
    need += round_up(kTensorRecordFixed + t.name.size(), 8);
  const std::uint64_t used = m.header->arena_used.load(std::memory_order_relaxed);
  std::size_t tensors = info.tensors.size();
  if (used + need > m.header->arena_bytes) {
    spdlog::warn(
        "profile segment {}: no room for the tensor table of {} tensors; the report "
        "will not name tensors of this publisher",
        m.options.name, info.tensors.size());
    tensors = 0;
    need = 0;
  }
  std::byte* at = m.arena + used;
  for (std::size_t i = 0; i < tensors; ++i) {
    const ProfileTensor& t = info.tensors[i];
    std::byte* start = at;
    put<std::uint32_t>(at, t.first_page);
    put<std::uint32_t>(at, t.page_count);
    put<std::int32_t>(at, t.layer);
    put<std::uint32_t>(at, static_cast<std::uint32_t>(t.name.size()));
    std::memcpy(at, t.name.data(), t.name.size());
    at = start + round_up(kTensorRecordFixed + t.name.size(), 8);
  }
  m.header->arena_used.store(used + need, std::memory_order_release);
  s.tensor_count = static_cast<std::uint32_t>(tensors);
  s.arena_offset = used;
  s.arena_bytes = need;
  s.pid = info.pid != 0 ? info.pid : static_cast<std::uint64_t>(::getpid());
  s.page_size = info.page_size;
  s.budget_bytes = info.budget_bytes;
  s.pool_pages = info.pool_pages;
  s.page_count = info.page_count;
  s.open_ns = info.open_ns != 0 ? info.open_ns : now_ns();
  copy_text(s.kind, sizeof(s.kind), info.kind);
  copy_text(s.policy, sizeof(s.policy), info.policy);
  copy_text(s.io_path, sizeof(s.io_path), info.io_path);
  copy_text(s.uvm_counters, sizeof(s.uvm_counters), info.uvm_counters);
  s.state.store(kOpen, std::memory_order_release);
  m.header->sources.store(index + 1, std::memory_order_release);
  return std::unique_ptr<ProfilePublisher>(
      new ProfilePublisher(std::move(segment), static_cast<std::uint16_t>(index)));
}

ProfilePublisher::~ProfilePublisher() {
  SourceSlot& s = segment_->impl_->slots[index_];
  s.close_ns.store(now_ns(), std::memory_order_relaxed);
  s.state.store(kClosed, std::memory_order_release);
}

// Note [Publishing cost]: one relaxed fetch_add to claim a slot, a CAS on the slot's sequence
// and six stores; no system call, lock or allocation. Same protocol as EventRing::record.
void ProfilePublisher::publish(const Event& e) noexcept {
  ProfileSegment::Impl& m = *segment_->impl_;
  const std::uint64_t index = m.header->head.fetch_add(1, std::memory_order_relaxed);
  EventSlot& s = m.events[index & m.mask];
  std::uint64_t seq = s.seq.load(std::memory_order_relaxed);
  if ((seq & 1) != 0 ||
      !s.seq.compare_exchange_strong(seq, 2 * index + 1, std::memory_order_acquire))
    return;  // another writer lapped the ring onto this slot and still fills it
  constexpr auto kStore = std::memory_order_release;
  s.time_ns.store(e.time_ns, kStore);
  s.packed.store(pack(e.kind, index_, e.first_page), kStore);
  s.page_count.store(e.page_count, kStore);
  s.bytes.store(e.bytes, kStore);
  s.duration_ns.store(e.duration_ns, kStore);
  s.seq.store(2 * index + 2, std::memory_order_release);
}

void ProfilePublisher::update(const PagerCounters& c, std::uint64_t page_size) noexcept {
  auto* out = segment_->impl_->slots[index_].counters;
  auto copy = [&](ProfileCounter which, const std::atomic<std::uint64_t>& from,
                  std::uint64_t scale = 1) {
    out[static_cast<std::size_t>(which)].store(from.load(std::memory_order_relaxed) * scale,
                                               std::memory_order_relaxed);
  };
  copy(ProfileCounter::faults, c.faults);
  copy(ProfileCounter::hits, c.hits);
  copy(ProfileCounter::prefetches_issued, c.prefetches_issued);
  copy(ProfileCounter::prefetches_used, c.prefetches_used);
  copy(ProfileCounter::prefetches_wasted, c.prefetches_wasted);
  copy(ProfileCounter::bytes_read, c.bytes_read);
  copy(ProfileCounter::evictions, c.evictions);
  copy(ProfileCounter::stall_ns, c.stall_ns);
  copy(ProfileCounter::resident_bytes, c.resident_pages, page_size);
  copy(ProfileCounter::peak_resident_bytes, c.peak_resident_pages, page_size);
  copy(ProfileCounter::gpu_faults, c.gpu_faults);
  copy(ProfileCounter::cpu_faults, c.cpu_faults);
  copy(ProfileCounter::migrated_to_device_bytes, c.migrated_to_device_bytes);
  copy(ProfileCounter::migrated_to_host_bytes, c.migrated_to_host_bytes);
}

void ProfilePublisher::update(const PagerStats& st) noexcept {
  auto* out = segment_->impl_->slots[index_].counters;
  const std::uint64_t values[kCounterCount] = {st.faults,
                                               st.hits,
                                               st.prefetches_issued,
                                               st.prefetches_used,
                                               st.prefetches_wasted,
                                               st.bytes_read,
                                               st.evictions,
                                               st.stall_ns,
                                               st.resident_bytes,
                                               st.peak_resident_bytes,
                                               st.gpu_faults,
                                               st.cpu_faults,
                                               st.migrated_to_device_bytes,
                                               st.migrated_to_host_bytes};
  for (std::size_t i = 0; i < kCounterCount; ++i)
    out[i].store(values[i], std::memory_order_relaxed);
}

void ProfilePublisher::add(ProfileCounter counter, std::uint64_t v) noexcept {
  segment_->impl_->slots[index_].counters[static_cast<std::size_t>(counter)].fetch_add(
      v, std::memory_order_relaxed);
}

}  // namespace lema::runtime
