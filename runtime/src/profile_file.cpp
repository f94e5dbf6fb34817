// Profile files: see the format in lema/runtime/profile_file.hpp.
#include "lema/runtime/profile_file.hpp"

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <boost/crc.hpp>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>

#include "lema/base/units.hpp"

namespace lema::runtime {
namespace {

static_assert(std::endian::native == std::endian::little, "profile files are little-endian");

constexpr char kMagic[8] = {'L', 'E', 'M', 'A', 'P', 'R', 'O', 'F'};
constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kEventBytes = 40;
// The least a source takes: pid, four string lengths, six sizes, 14 counters, a tensor count.
constexpr std::size_t kMinSourceBytes = 8 + 4 * 4 + 6 * 8 + 14 * 8 + 4;
// The least a tensor takes: first page, page count, layer, name length.
constexpr std::size_t kMinTensorBytes = 16;
// Pages are numbered with 32 bits (PageId), so no pager has more.
constexpr std::uint64_t kMaxPages = std::uint64_t{1} << 32;

// CRC-32 (the zlib/IEEE polynomial), header-only so the runtime links no extra library.
std::uint32_t checksum(const char* data, std::size_t size) {
  boost::crc_32_type crc;
  crc.process_bytes(data, size);
  return crc.checksum();
}

class ByteWriter {
 public:
  template <typename T>
  void put(T v) {
    const auto* p = reinterpret_cast<const char*>(&v);
    buf_.append(p, sizeof(T));
  }
  void put(const std::string& s) {
    put<std::uint32_t>(static_cast<std::uint32_t>(s.size()));
    buf_.append(s);
  }
  std::string& buffer() { return buf_; }

 private:
  std::string buf_;
};

// Note [Counts against the bytes left]: every count in a profile (sources, tensors, events, the
// length of each string) is checked against the bytes still unread before anything is sized by
// it, so a forged or damaged count is refused with one line naming it instead of allocating
// gigabytes (or throwing std::bad_alloc) for a file of a few kilobytes.
class ByteReader {
 public:
  ByteReader(const char* data, std::size_t size, const std::filesystem::path& file)
      : at_(data), end_(data + size), file_(file) {}
  template <typename T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  std::string get_string(const std::string& field) {
    const auto n = get<std::uint32_t>();
    need_count(n, 1, field + " length");
    std::string s(at_, n);
    at_ += n;
    return s;
  }
  void need(std::size_t n) const {
    if (left() < n)
      throw ProfileFileError(file_.string() +
                             ": damaged profile (a record runs past the end of the file)");
  }
  /// `count` records of at least `each` bytes must fit in what is left (see the Note).
  void need_count(std::uint64_t count, std::uint64_t each, const std::string& field) const {
    need_count_in(file_, count, each, field, left());
  }
  std::size_t left() const { return static_cast<std::size_t>(end_ - at_); }

  static void need_count_in(const std::filesystem::path& file, std::uint64_t count,
                            std::uint64_t each, const std::string& field, std::uint64_t left) {
    if (count > left / each) throw_count(file, field, count, each, left);
  }
  [[noreturn]] static void throw_count(const std::filesystem::path& file, const std::string& field,
                                       std::uint64_t count, std::uint64_t each,
                                       std::uint64_t left) {
    const std::uint64_t needs =
        count > std::numeric_limits<std::uint64_t>::max() / each ? 0 : count * each;
    throw ProfileFileError(file.string() + ": " + field + " " + std::to_string(count) + " needs " +
                           (needs == 0 ? std::string("more than 16 EiB") : format_size(needs)) +
                           " but the file has " + format_size(left) +
                           " left; the file is corrupt or truncated");
  }

 private:
  const char* at_;
  const char* end_;
  const std::filesystem::path& file_;
};

// Note [Preload event section] (preload_events.hpp).
constexpr char kPreloadMagic[8] = {'L', 'E', 'M', 'A', 'P', 'E', 'V', 'T'};
constexpr std::size_t kPreloadHeadBytes = 48;
constexpr std::size_t kPreloadRecordBytes = 40;

std::string preload_section(const PreloadEvents& p) {
  ByteWriter w;
  std::string& b = w.buffer();
  b.append(kPreloadMagic, sizeof(kPreloadMagic));
  w.put<std::uint32_t>(1);
  w.put<std::uint32_t>(kPreloadRecordBytes);
  w.put<std::uint64_t>(p.events.size());
  w.put<std::uint64_t>(p.dropped);
  w.put<std::uint64_t>(p.capacity);
  const std::size_t crc_at = b.size();
  w.put<std::uint32_t>(0);
  w.put<std::uint32_t>(0);
  for (const PreloadEvent& e : p.events) {
    w.put<std::uint64_t>(e.time_ns);
    w.put<std::uint64_t>(e.bytes);
    w.put<std::uint64_t>(e.address);
    w.put<std::uint32_t>(e.thread);
    w.put<std::int32_t>(e.result);
    w.put<std::uint8_t>(static_cast<std::uint8_t>(e.call));
    w.put<std::uint8_t>(static_cast<std::uint8_t>(e.route));
    w.put<std::uint8_t>(e.flags);
    b.append(5, '\0');
  }
  const std::uint32_t crc = checksum(b.data() + kPreloadHeadBytes, b.size() - kPreloadHeadBytes);
  std::memcpy(b.data() + crc_at, &crc, 4);
  return b;
}

PreloadEvents read_preload_section(const char* data, std::size_t size,
                                   const std::filesystem::path& path) {
  const std::string name = path.string();
  if (size < kPreloadHeadBytes || std::memcmp(data, kPreloadMagic, sizeof(kPreloadMagic)) != 0)
    throw ProfileFileError(name + ": damaged profile (" + std::to_string(size) +
                           " bytes after the body are not the preload hook's event section)");
  ByteReader r(data + sizeof(kPreloadMagic), kPreloadHeadBytes - sizeof(kPreloadMagic), path);
  const auto version = r.get<std::uint32_t>();
  const auto record_bytes = r.get<std::uint32_t>();
  const auto count = r.get<std::uint64_t>();
  PreloadEvents p;
  p.dropped = r.get<std::uint64_t>();
  p.capacity = r.get<std::uint64_t>();
  const auto crc = r.get<std::uint32_t>();
  if (version != 1 || record_bytes != kPreloadRecordBytes)
    throw ProfileFileError(name + ": preload event section version " + std::to_string(version) +
                           " with " + std::to_string(record_bytes) +
                           "-byte records; this lema reads version 1 (40 bytes); report it with "
                           "the lema that recorded it");
  const std::size_t left = size - kPreloadHeadBytes;
  ByteReader::need_count_in(path, count, kPreloadRecordBytes, "preload event count", left);
  if (left != count * kPreloadRecordBytes)
    throw ProfileFileError(name + ": damaged profile (" +
                           std::to_string(left - count * kPreloadRecordBytes) +
                           " unread bytes after the preload events)");
  const char* at = data + kPreloadHeadBytes;
  if (checksum(at, left) != crc)
    throw ProfileFileError(name + ": damaged profile (preload event checksum mismatch)");
  p.events.reserve(count);
  for (std::uint64_t i = 0; i < count; ++i, at += kPreloadRecordBytes) {
    const auto call = static_cast<std::uint8_t>(at[32]);
    const auto route = static_cast<std::uint8_t>(at[33]);
    if (call == 0) continue;  // unfinished at exit; counted in dropped
    if (call > kLastPreloadCall || route > kLastPreloadRoute)
      throw ProfileFileError(name + ": damaged profile (preload event " + std::to_string(i) +
                             " has call " + std::to_string(call) + ", route " +
                             std::to_string(route) + ")");
    PreloadEvent e;
    std::memcpy(&e.time_ns, at, 8);
    std::memcpy(&e.bytes, at + 8, 8);
    std::memcpy(&e.address, at + 16, 8);
    std::memcpy(&e.thread, at + 24, 4);
    std::memcpy(&e.result, at + 28, 4);
    e.call = static_cast<PreloadCall>(call);
    e.route = static_cast<PreloadRoute>(route);
    e.flags = static_cast<std::uint8_t>(at[34]);
    p.events.push_back(e);
  }
  return p;
}

void put_counters(ByteWriter& w, const PagerStats& s) {
  for (std::uint64_t v :
       {s.faults, s.hits, s.prefetches_issued, s.prefetches_used, s.prefetches_wasted, s.bytes_read,
        s.evictions, s.stall_ns, s.resident_bytes, s.peak_resident_bytes, s.gpu_faults,
        s.cpu_faults, s.migrated_to_device_bytes, s.migrated_to_host_bytes})
    w.put<std::uint64_t>(v);
}

void get_counters(ByteReader& r, PagerStats& s) {
  for (std::uint64_t* v :
       {&s.faults, &s.hits, &s.prefetches_issued, &s.prefetches_used, &s.prefetches_wasted,
        &s.bytes_read, &s.evictions, &s.stall_ns, &s.resident_bytes, &s.peak_resident_bytes,
        &s.gpu_faults, &s.cpu_faults, &s.migrated_to_device_bytes, &s.migrated_to_host_bytes})
    *v = r.get<std::uint64_t>();
}

}  // namespace

void save_recording(const Recording& rec, const std::filesystem::path& path) {
  ByteWriter body;
  body.buffer().reserve(256 + rec.events.size() * kEventBytes);
  body.put<std::uint64_t>(rec.pid);
  body.put<std::int32_t>(rec.exit_code);
  body.put(rec.command);
  for (const ProfileSourceInfo& s : rec.sources) {
    body.put<std::uint64_t>(s.pid);
    body.put(s.kind);
    body.put(s.policy);
    body.put(s.io_path);
    body.put(s.uvm_counters);
    for (std::uint64_t v :
         {s.page_size, s.budget_bytes, s.pool_pages, s.page_count, s.open_ns, s.close_ns})
      body.put<std::uint64_t>(v);
    put_counters(body, s.counters);
    body.put<std::uint32_t>(static_cast<std::uint32_t>(s.tensors.size()));
    for (const ProfileTensor& t : s.tensors) {
      body.put<std::uint32_t>(t.first_page);
      body.put<std::uint32_t>(t.page_count);
      body.put<std::int32_t>(t.layer);
      body.put(t.name);
    }
  }
  std::string& b = body.buffer();
  const std::size_t events_at = b.size();
  b.resize(events_at + rec.events.size() * kEventBytes);
  char* out = b.data() + events_at;
  for (const ProfileEvent& e : rec.events) {
    char rec_bytes[kEventBytes] = {};
    std::memcpy(rec_bytes, &e.time_ns, 8);
    std::memcpy(rec_bytes + 8, &e.duration_ns, 8);
    std::memcpy(rec_bytes + 16, &e.bytes, 8);
    std::memcpy(rec_bytes + 24, &e.first_page, 4);
    std::memcpy(rec_bytes + 28, &e.page_count, 4);
    rec_bytes[32] = static_cast<char>(e.kind);
    std::memcpy(rec_bytes + 34, &e.source, 2);
    std::memcpy(out, rec_bytes, kEventBytes);
    out += kEventBytes;
  }

  ByteWriter head;
  head.buffer().append(kMagic, sizeof(kMagic));
  head.put<std::uint32_t>(kProfileFileVersion);
  head.put<std::uint32_t>(kHeaderBytes);
  head.put<std::uint64_t>(b.size());
  head.put<std::uint32_t>(checksum(b.data(), b.size()));
  head.put<std::uint32_t>(static_cast<std::uint32_t>(rec.sources.size()));
  head.put<std::uint64_t>(rec.events.size());
  head.put<std::uint64_t>(rec.dropped);
  head.put<std::uint64_t>(rec.start_ns);
  head.put<std::uint64_t>(rec.end_ns);

  const std::filesystem::path tmp = path.string() + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(head.buffer().data(), static_cast<std::streamsize>(head.buffer().size()));
    f.write(b.data(), static_cast<std::streamsize>(b.size()));
    if (rec.preload) {  // after the body, outside its checksum (Note [Preload event section])
      const std::string section = preload_section(*rec.preload);
      f.write(section.data(), static_cast<std::streamsize>(section.size()));
    }
    f.close();
    if (!f) {
      const int err = errno;
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw SystemError("cannot write the profile " + path.string(), err);
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw SystemError("cannot write the profile " + path.string() + ": " + ec.message(),
                      ec.value());
  }
}

Recording load_recording(const std::filesystem::path& path) {
  const std::string name = path.string();
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ProfileFileError(name + ": cannot open the profile (" + std::strerror(errno) + ")");
  std::string data;
  f.seekg(0, std::ios::end);
  data.resize(static_cast<std::size_t>(std::max<std::streamoff>(f.tellg(), 0)));
  f.seekg(0, std::ios::beg);
  f.read(data.data(), static_cast<std::streamsize>(data.size()));
  if (!f) throw ProfileFileError(name + ": cannot read the profile (" + std::strerror(errno) + ")");
  if (data.size() < sizeof(kMagic) || std::memcmp(data.data(), kMagic, sizeof(kMagic)) != 0)
    throw ProfileFileError(name +
                           ": not a lema profile (no LEMAPROF magic); record one with "
                           "`lema prof record -o FILE -- COMMAND`");
  if (data.size() < kHeaderBytes)
    throw ProfileFileError(name + ": truncated profile (" + std::to_string(data.size()) +
                           " bytes, shorter than its 64-byte header)");
  ByteReader hr(data.data() + sizeof(kMagic), kHeaderBytes - sizeof(kMagic), path);
  const auto version = hr.get<std::uint32_t>();
  if (version < kProfileFileVersion)
    throw ProfileFileError(name + ": profile version " + std::to_string(version) +
                           " was recorded by an older lema; this lema reads version " +
                           std::to_string(kProfileFileVersion) +
                           " (report it with the lema that recorded it, or record the run again)");
  if (version != kProfileFileVersion)
    throw ProfileFileError(name + ": profile version " + std::to_string(version) +
                           ", this lema reads version " + std::to_string(kProfileFileVersion) +
                           " (report it with the lema that recorded it)");
  const auto header_bytes = hr.get<std::uint32_t>();
  const auto body_bytes = hr.get<std::uint64_t>();
  const auto crc = hr.get<std::uint32_t>();
  const auto source_count = hr.get<std::uint32_t>();
  const auto event_count = hr.get<std::uint64_t>();
  Recording rec;
  rec.dropped = hr.get<std::uint64_t>();
  rec.start_ns = hr.get<std::uint64_t>();
  rec.end_ns = hr.get<std::uint64_t>();
  if (header_bytes != kHeaderBytes)
    throw ProfileFileError(name + ": damaged profile (header size " + std::to_string(header_bytes) +
                           ")");
  if (data.size() - kHeaderBytes < body_bytes)
    throw ProfileFileError(name + ": truncated profile (" + std::to_string(data.size()) +
                           " bytes; its header announces " +
                           std::to_string(kHeaderBytes + body_bytes) + ")");
  const char* body = data.data() + kHeaderBytes;
  if (checksum(body, body_bytes) != crc)
    throw ProfileFileError(name + ": damaged profile (checksum mismatch)");

  // The events fill the end of the body; what precedes them is read with its own bound.
  ByteReader::need_count_in(path, event_count, kEventBytes, "event count", body_bytes);
  const std::uint64_t event_bytes = event_count * kEventBytes;
  ByteReader r(body, body_bytes - event_bytes, path);
  rec.pid = r.get<std::uint64_t>();
  rec.exit_code = r.get<std::int32_t>();
  rec.command = r.get_string("command");
  r.need_count(source_count, kMinSourceBytes, "source count");
  rec.sources.resize(source_count);
  for (std::size_t i = 0; i < rec.sources.size(); ++i) {
    ProfileSourceInfo& s = rec.sources[i];
    const std::string field = "source " + std::to_string(i) + " ";
    s.pid = r.get<std::uint64_t>();
    s.kind = r.get_string(field + "kind");
    s.policy = r.get_string(field + "policy");
    s.io_path = r.get_string(field + "io path");
    s.uvm_counters = r.get_string(field + "uvm counters");
    for (std::uint64_t* v :
         {&s.page_size, &s.budget_bytes, &s.pool_pages, &s.page_count, &s.open_ns, &s.close_ns})
      *v = r.get<std::uint64_t>();
    get_counters(r, s.counters);
    s.counters.budget_bytes = s.budget_bytes;
    s.counters.page_size = s.page_size;
    s.counters.io_path = s.io_path;
    s.counters.uvm_counters = s.uvm_counters;
    if (s.page_count > kMaxPages)
      throw ProfileFileError(name + ": " + field + "page count " + std::to_string(s.page_count) +
                             " is more than the 2^32 pages a pager numbers; the file is corrupt");
    const auto tensors = r.get<std::uint32_t>();
    r.need_count(tensors, kMinTensorBytes, field + "tensor count");
    s.tensors.resize(tensors);
    std::uint64_t last_page = 0;  // the last page of the previous tensor with pages
    for (std::size_t k = 0; k < s.tensors.size(); ++k) {
      ProfileTensor& t = s.tensors[k];
      const std::string tensor = field + "tensor " + std::to_string(k);
      t.first_page = r.get<std::uint32_t>();
      t.page_count = r.get<std::uint32_t>();
      t.layer = r.get<std::int32_t>();
      t.name = r.get_string(tensor + " name");
      // Note [Tensor page ranges]: a layout places tensors by ascending offset, so their page
      // ranges ascend and overlap at most on a shared boundary page, inside the address space.
      // The report relies on it to find a page's tensors without a table per page.
      const std::uint64_t end = std::uint64_t{t.first_page} + t.page_count;
      if (t.page_count == 0) continue;
      if (end > s.page_count || t.first_page < last_page)
        throw ProfileFileError(name + ": " + tensor + " pages [" + std::to_string(t.first_page) +
                               ", " + std::to_string(end) + ") are not after the previous " +
                               "tensor's and inside the source's " + std::to_string(s.page_count) +
                               " pages; the file is corrupt");
      last_page = end - 1;
    }
  }
  if (r.left() != 0)
    throw ProfileFileError(name + ": damaged profile (" + std::to_string(r.left()) +
                           " unread bytes before the events)");
  rec.events.resize(event_count);
  const char* at = body + (body_bytes - event_bytes);
  for (ProfileEvent& e : rec.events) {
    std::memcpy(&e.time_ns, at, 8);
    std::memcpy(&e.duration_ns, at + 8, 8);
    std::memcpy(&e.bytes, at + 16, 8);
    std::memcpy(&e.first_page, at + 24, 4);
    std::memcpy(&e.page_count, at + 28, 4);
    const auto kind = static_cast<std::uint8_t>(at[32]);
    std::memcpy(&e.source, at + 34, 2);
    if (kind > static_cast<std::uint8_t>(kLastEventKind) || e.source >= source_count)
      throw ProfileFileError(name + ": damaged profile (event " +
                             std::to_string(&e - rec.events.data()) + " has kind " +
                             std::to_string(kind) + ", source " + std::to_string(e.source) + ")");
    e.kind = static_cast<EventKind>(kind);
    at += kEventBytes;
  }
  if (data.size() - kHeaderBytes > body_bytes)
    rec.preload =
        read_preload_section(body + body_bytes, data.size() - kHeaderBytes - body_bytes, path);
  return rec;
}

}  // namespace lema::runtime
