// Profile files: see the format in lema/runtime/profile_file.hpp.
#include "lema/runtime/profile_file.hpp"

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <boost/crc.hpp>
#include <cerrno>
#include <cstring>
#include <fstream>

namespace lema::runtime {
namespace {

static_assert(std::endian::native == std::endian::little, "profile files are little-endian");

constexpr char kMagic[8] = {'L', 'E', 'M', 'A', 'P', 'R', 'O', 'F'};
constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kEventBytes = 40;

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
  std::string get_string() {
    const auto n = get<std::uint32_t>();
    need(n);
    std::string s(at_, n);
    at_ += n;
    return s;
  }
  void need(std::size_t n) const {
    if (static_cast<std::size_t>(end_ - at_) < n)
      throw ProfileFileError(file_.string() +
                             ": damaged profile (a record runs past the end of the file)");
  }
  std::size_t left() const { return static_cast<std::size_t>(end_ - at_); }

 private:
  const char* at_;
  const char* end_;
  const std::filesystem::path& file_;
};

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

  ByteReader r(body, body_bytes, path);
  rec.pid = r.get<std::uint64_t>();
  rec.exit_code = r.get<std::int32_t>();
  rec.command = r.get_string();
  rec.sources.resize(source_count);
  for (ProfileSourceInfo& s : rec.sources) {
    s.pid = r.get<std::uint64_t>();
    s.kind = r.get_string();
    s.policy = r.get_string();
    s.io_path = r.get_string();
    s.uvm_counters = r.get_string();
    for (std::uint64_t* v :
         {&s.page_size, &s.budget_bytes, &s.pool_pages, &s.page_count, &s.open_ns, &s.close_ns})
      *v = r.get<std::uint64_t>();
    get_counters(r, s.counters);
    s.counters.budget_bytes = s.budget_bytes;
    s.counters.page_size = s.page_size;
    s.counters.io_path = s.io_path;
    s.counters.uvm_counters = s.uvm_counters;
    const auto tensors = r.get<std::uint32_t>();
    r.need(std::uint64_t{tensors} * 16);
    s.tensors.resize(tensors);
    for (ProfileTensor& t : s.tensors) {
      t.first_page = r.get<std::uint32_t>();
      t.page_count = r.get<std::uint32_t>();
      t.layer = r.get<std::int32_t>();
      t.name = r.get_string();
    }
  }
  if (r.left() != event_count * kEventBytes)
    throw ProfileFileError(name + ": damaged profile (" + std::to_string(r.left()) +
                           " bytes of events for " + std::to_string(event_count) + " events)");
  rec.events.resize(event_count);
  const char* at = body + (body_bytes - r.left());
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
  return rec;
}

}  // namespace lema::runtime
