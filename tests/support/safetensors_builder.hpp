// Builds safetensors files byte by byte for tests, independently of the library's writer, so a
// bug shared by writer and reader cannot hide. Lets a test write any header, valid or not.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lema::test {

/// The 8-byte little-endian length field followed by `header` and `data`.
inline std::string safetensors_bytes_with_length(std::uint64_t header_length,
                                                 std::string_view header, std::string_view data) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((header_length >> (8 * i)) & 0xFF));
  out.append(header);
  out.append(data);
  return out;
}

/// A file whose length field is honest: `header` is used verbatim (no padding).
inline std::string safetensors_bytes(std::string_view header, std::string_view data) {
  return safetensors_bytes_with_length(header.size(), header, data);
}

/// `data_bytes` bytes of a fixed pattern (byte i = i * 7 + 1 mod 256).
inline std::string pattern_bytes(std::uint64_t data_bytes) {
  std::string s(data_bytes, '\0');
  for (std::uint64_t i = 0; i < data_bytes; ++i) s[i] = static_cast<char>((i * 7 + 1) & 0xFF);
  return s;
}

/// One header entry: `"name":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}`.
inline std::string header_entry(std::string_view name, std::string_view dtype,
                                const std::vector<std::int64_t>& shape, std::uint64_t begin,
                                std::uint64_t end) {
  std::string s =
      "\"" + std::string(name) + "\":{\"dtype\":\"" + std::string(dtype) + "\",\"shape\":[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

/// Lays tensors out contiguously in the order added and pads the header with spaces to a
/// multiple of 8, like the reference writer.
class SafetensorsBuilder {
 public:
  /// Adds a tensor of `nbytes` pattern bytes (the caller states the size; nothing is checked).
  SafetensorsBuilder& add(std::string name, std::string dtype, std::vector<std::int64_t> shape,
                          std::uint64_t nbytes) {
    entries_.push_back(header_entry(name, dtype, shape, data_.size(), data_.size() + nbytes));
    data_ += pattern_bytes(nbytes);
    // Distinct bytes per tensor, so that a test comparing bytes notices a wrong offset.
    for (std::size_t i = data_.size() - nbytes; i < data_.size(); ++i)
      data_[i] = static_cast<char>(data_[i] ^ static_cast<char>(entries_.size()));
    return *this;
  }
  SafetensorsBuilder& metadata(std::string key, std::string value) {
    metadata_.emplace_back(std::move(key), std::move(value));
    return *this;
  }

  std::string header() const {
    std::string h = "{";
    bool first = true;
    if (!metadata_.empty()) {
      h += "\"__metadata__\":{";
      for (std::size_t i = 0; i < metadata_.size(); ++i) {
        if (i) h += ",";
        h += "\"" + metadata_[i].first + "\":\"" + metadata_[i].second + "\"";
      }
      h += "}";
      first = false;
    }
    for (const auto& e : entries_) {
      if (!first) h += ",";
      h += e;
      first = false;
    }
    h += "}";
    h.append((8 - h.size() % 8) % 8, ' ');
    return h;
  }
  const std::string& data() const { return data_; }
  std::string bytes() const { return safetensors_bytes(header(), data_); }

 private:
  std::vector<std::string> entries_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  std::string data_;
};

inline void write_bytes(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

inline std::string read_bytes(const std::filesystem::path& path, std::uint64_t offset,
                              std::uint64_t length) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string s(length, '\0');
  in.read(s.data(), static_cast<std::streamsize>(length));
  if (!in) throw std::runtime_error("cannot read " + path.string());
  return s;
}

}  // namespace lema::test
