#include "lema/allocator/allocation_log.hpp"

#include <charconv>
#include <cinttypes>
#include <cstdio>
#include <string>
#include <unordered_map>

#include "lema/allocator/logging_adaptor.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::allocator {
namespace {

[[noreturn]] void bad_line(std::string_view name, std::uint64_t line, const std::string& what) {
  throw InvalidArgument(std::string(name) + " line " + std::to_string(line) + ": " + what +
                        "; the file is not a LoggingAdaptor log (" + LoggingAdaptor::kHeader +
                        ") or was changed after it was written");
}

template <typename T>
T parse_number(std::string_view field, int base, std::string_view column, std::string_view name,
               std::uint64_t line) {
  T value{};
  const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), value, base);
  if (ec != std::errc() || end != field.data() + field.size() || field.empty()) {
    bad_line(name, line,
             "column " + std::string(column) + " is '" + std::string(field) + "', not a number");
  }
  return value;
}

}  // namespace

std::vector<AllocationRecord> read_allocation_log(std::istream& in, std::string_view name) {
  std::vector<AllocationRecord> records;
  std::string text;
  std::uint64_t line = 0;
  if (!std::getline(in, text) || text != LoggingAdaptor::kHeader) {
    bad_line(name, 1, "the header is '" + text + "', expected '" + LoggingAdaptor::kHeader + "'");
  }
  ++line;
  while (std::getline(in, text)) {
    ++line;
    if (text.empty()) continue;
    std::string_view fields[6];
    std::size_t count = 0;
    std::string_view rest(text);
    while (true) {
      const auto comma = rest.find(',');
      if (count == 6) {
        count = 7;  // too many
        break;
      }
      fields[count++] = rest.substr(0, comma);
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
    if (count != 6) {
      bad_line(name, line,
               "expected 6 comma-separated columns, got " +
                   (count == 7 ? std::string("more") : std::to_string(count)));
    }
    AllocationRecord r;
    r.time_ns = parse_number<std::uint64_t>(fields[0], 10, "time_ns", name, line);
    r.thread = parse_number<std::uint64_t>(fields[1], 10, "thread", name, line);
    if (fields[2] == "allocate") {
      r.action = AllocationRecord::Action::allocate;
    } else if (fields[2] == "free") {
      r.action = AllocationRecord::Action::free;
    } else {
      bad_line(name, line,
               "action is '" + std::string(fields[2]) + "', expected 'allocate' or 'free'");
    }
    std::string_view ptr = fields[3];
    if (!ptr.starts_with("0x")) {
      bad_line(name, line, "pointer is '" + std::string(ptr) + "', expected 0x-prefixed hex");
    }
    ptr.remove_prefix(2);
    r.pointer = parse_number<std::uintptr_t>(ptr, 16, "pointer", name, line);
    r.bytes = parse_number<std::size_t>(fields[4], 10, "bytes", name, line);
    r.alignment = parse_number<std::size_t>(fields[5], 10, "alignment", name, line);
    if (!is_power_of_two(r.alignment)) {
      bad_line(name, line, "alignment " + std::to_string(r.alignment) + " is not a power of two");
    }
    records.push_back(r);
  }
  return records;
}

ReplayResult replay_allocation_log(const std::vector<AllocationRecord>& records,
                                   MemoryResource& mr) {
  struct Block {
    void* p;
    std::size_t bytes;
    std::size_t alignment;
  };
  std::unordered_map<std::uintptr_t, Block> live;  // logged pointer → the block replay made
  auto free_all = [&] {
    for (const auto& [logged, block] : live) mr.deallocate(block.p, block.bytes, block.alignment);
    live.clear();
  };
  ReplayResult result;
  try {
    for (std::size_t i = 0; i < records.size(); ++i) {
      const AllocationRecord& r = records[i];
      char hex[24];
      std::snprintf(hex, sizeof hex, "0x%" PRIxPTR, r.pointer);
      const std::string where =
          "allocation log record " + std::to_string(i + 1) + " (pointer " + hex;
      if (r.action == AllocationRecord::Action::allocate) {
        LEMA_EXPECTS(!live.contains(r.pointer),
                     where + "): allocated again while still live; the log is not a serial order");
        void* p = mr.allocate(r.bytes, r.alignment);
        if (p != nullptr) static_cast<volatile char*>(p)[0] = 1;  // touched, as its user would
        live.emplace(r.pointer, Block{p, r.bytes, r.alignment});
        ++result.allocations;
      } else {
        const auto it = live.find(r.pointer);
        LEMA_EXPECTS(it != live.end(), where + "): freed but not live in the log");
        LEMA_EXPECTS(it->second.bytes == r.bytes && it->second.alignment == r.alignment,
                     where + "): freed with " + std::to_string(r.bytes) + " bytes, alignment " +
                         std::to_string(r.alignment) + ", allocated with " +
                         std::to_string(it->second.bytes) + ", " +
                         std::to_string(it->second.alignment));
        mr.deallocate(it->second.p, r.bytes, r.alignment);
        live.erase(it);
        ++result.frees;
      }
    }
  } catch (...) {
    free_all();
    throw;
  }
  result.live_at_end = live.size();
  free_all();
  return result;
}

}  // namespace lema::allocator
