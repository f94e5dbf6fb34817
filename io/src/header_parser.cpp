// Validation of one safetensors header. Rules follow the reference implementation
// (huggingface/safetensors, Metadata::validate), made stricter where it is lenient: duplicate
// keys and unknown fields are rejected instead of silently ignored.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "detail/strict_json.hpp"
#include "lema/io/checkpoint.hpp"

namespace lema::io {

namespace {

using nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";

// Names come from the file and may be of any length: messages quote an excerpt.
std::string quoted(const std::string& name) {
  return "'" + detail::excerpt(name) + "'";
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string known_dtypes() {
  std::string s;
  for (int i = 0; i < kDtypeCount; ++i) {
    if (i) s += ", ";
    s += dtype_name(static_cast<Dtype>(i));
  }
  return s;
}

class EntryParser {
 public:
  EntryParser(const std::string& file, const std::string& name) : file_(file), name_(name) {}

  [[noreturn]] void fail(const char* rule, const std::string& what) const {
    throw CheckpointError(file_, name_, rule, "tensor " + quoted(name_) + ": " + what);
  }

  TensorInfo parse(const json& entry) const {
    if (!entry.is_object()) {
      fail("bad-entry", "entry is " + detail::describe_type(entry) +
                            ", expected an object with dtype, shape and data_offsets");
    }
    for (const auto& [key, value] : entry.items()) {
      if (key != "dtype" && key != "shape" && key != "data_offsets") {
        fail("unknown-field", "unknown field " + quoted(key) +
                                  " (an entry holds exactly dtype, shape and data_offsets)");
      }
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field)) fail("missing-field", std::string("no '") + field + "' field");
    }

    TensorInfo t;
    t.name = name_;
    t.dtype = parse_dtype_field(entry["dtype"]);
    t.shape = parse_shape(entry["shape"]);
    const auto [begin, end] = parse_offsets(entry["data_offsets"]);
    t.offset = begin;
    t.nbytes = byte_length(t);
    if (t.nbytes != end - begin) {
      fail("size-mismatch",
           "shape " + shape_string(t.shape) + " x " + std::string(dtype_name(t.dtype)) + " = " +
               std::to_string(t.nbytes) + " bytes but data_offsets [" + std::to_string(begin) +
               ", " + std::to_string(end) + "] span " + std::to_string(end - begin) + " bytes");
    }
    return t;
  }

 private:
  Dtype parse_dtype_field(const json& v) const {
    if (!v.is_string()) fail("bad-dtype", "dtype is " + detail::describe_type(v) + ", not a name");
    const auto& s = v.get_ref<const std::string&>();
    auto dtype = parse_dtype(s);
    if (!dtype)
      fail("bad-dtype", "unknown dtype " + quoted(s) + " (known: " + known_dtypes() + ")");
    return *dtype;
  }

  std::vector<std::int64_t> parse_shape(const json& v) const {
    if (!v.is_array()) {
      fail("bad-shape", "shape is " + detail::describe_type(v) + ", expected an array of integers");
    }
    std::vector<std::int64_t> shape;
    shape.reserve(v.size());
    for (const auto& d : v) {
      // "-0" parses as a signed zero; anything else negative, fractional or past int64 fails.
      bool ok = false;
      std::int64_t dim = 0;
      if (d.is_number_unsigned()) {
        auto u = d.get<std::uint64_t>();
        ok = u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
        dim = static_cast<std::int64_t>(u);
      } else if (d.is_number_integer()) {
        dim = d.get<std::int64_t>();
        ok = dim >= 0;
      }
      if (!ok) {
        fail("bad-shape", "shape element " + detail::json_excerpt(d) +
                              " is not a dimension (dimensions are integers from 0 to 2^63-1)");
      }
      shape.push_back(dim);
    }
    return shape;
  }

  std::pair<std::uint64_t, std::uint64_t> parse_offsets(const json& v) const {
    if (!v.is_array() || v.size() != 2 || !v[0].is_number_unsigned() ||
        !v[1].is_number_unsigned()) {
      fail("bad-offsets", "data_offsets " + detail::json_excerpt(v) +
                              " is not a pair [begin, end] of non-negative integers");
    }
    auto begin = v[0].get<std::uint64_t>();
    auto end = v[1].get<std::uint64_t>();
    if (begin > end) {
      fail("bad-offsets", "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                              "] end before they begin");
    }
    return {begin, end};
  }

  std::uint64_t byte_length(const TensorInfo& t) const {
    // Every partial product is checked, as in the reference, so that no later computation on
    // a prefix of the shape (strides, torch's int64 numel) can overflow either.
    constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    std::uint64_t numel = 1;
    for (auto dim : t.shape) {
      if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(dim), &numel) || numel > kMax) {
        fail("size-overflow", "shape " + shape_string(t.shape) + " has more than 2^63-1 elements");
      }
    }
    std::uint64_t bits = 0;
    if (__builtin_mul_overflow(numel, std::uint64_t{dtype_bits(t.dtype)}, &bits)) {
      fail("size-overflow", "shape " + shape_string(t.shape) + " x " +
                                std::string(dtype_name(t.dtype)) + " overflows 64-bit sizes");
    }
    if (bits % 8 != 0) {
      fail("partial-byte", "shape " + shape_string(t.shape) + " x " +
                               std::string(dtype_name(t.dtype)) + " = " + std::to_string(bits) +
                               " bits, which is not a whole number of bytes");
    }
    return bits / 8;
  }

  const std::string& file_;
  const std::string& name_;
};

std::map<std::string, std::string> parse_metadata(const json& v, const std::string& file) {
  if (!v.is_object()) {
    throw CheckpointError(
        file, "", "bad-metadata",
        "__metadata__ is " + detail::describe_type(v) + ", expected an object of string values");
  }
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : v.items()) {
    if (!value.is_string()) {
      throw CheckpointError(file, "", "bad-metadata",
                            "__metadata__ value of " + quoted(key) + " is " +
                                detail::describe_type(value) + ", but only strings are allowed");
    }
    out.emplace(key, value.get<std::string>());
  }
  return out;
}

// Tensors sorted by offset must tile the data section exactly: from 0, no gap, no overlap, the
// last one ending at its end.
void check_layout(const std::vector<TensorInfo>& tensors, std::uint64_t data_bytes,
                  const std::string& file) {
  std::uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const auto& t : tensors) {
    const std::uint64_t end = t.offset + t.nbytes;  // no overflow: both came from the header
    const auto where = [&] {
      return "tensor " + quoted(t.name) + ": data_offsets [" + std::to_string(t.offset) + ", " +
             std::to_string(end) + "]";
    };
    if (end > data_bytes) {
      throw CheckpointError(file, t.name, "offsets-beyond-eof",
                            where() + " reach past the end of the data section, which holds " +
                                std::to_string(data_bytes) + " bytes (is the file truncated?)");
    }
    if (t.offset > expected) {
      throw CheckpointError(
          file, t.name, "gap",
          where() + " leave " + std::to_string(t.offset - expected) + " unused bytes after " +
              (prev ? "tensor " + quoted(prev->name) : std::string("the start of the data")) +
              ", which ends at " + std::to_string(expected));
    }
    if (t.offset < expected) {
      throw CheckpointError(file, t.name, "overlap",
                            where() + " overlap tensor " + quoted(prev->name) + ", which ends at " +
                                std::to_string(expected));
    }
    expected = end;
    prev = &t;
  }
  if (expected != data_bytes) {
    throw CheckpointError(file, prev ? prev->name : "", "trailing-bytes",
                          "the tensors end at data byte " + std::to_string(expected) +
                              " but the data section holds " + std::to_string(data_bytes) +
                              " bytes: " + std::to_string(data_bytes - expected) +
                              " bytes at the end of the file belong to no tensor");
  }
}

}  // namespace

ParsedHeader parse_header(std::string_view header_json, std::uint64_t data_bytes,
                          const std::string& file_label) {
  json root = detail::parse_strict_json(header_json, file_label, "header");
  if (!root.is_object()) {
    throw CheckpointError(
        file_label, "", "not-object",
        "header is " + detail::describe_type(root) + ", expected a JSON object of tensors");
  }
  // nlohmann tolerates a byte-order mark; the reference does not.
  const auto first = header_json.find_first_not_of(" \t\r\n");
  if (first == std::string_view::npos || header_json[first] != '{') {
    throw CheckpointError(file_label, "", "bad-json",
                          "header does not begin with '{' (a byte-order mark or other bytes "
                          "precede it)");
  }

  ParsedHeader out;
  out.tensors.reserve(root.size());
  for (const auto& [key, value] : root.items()) {
    if (key == kMetadataKey) {
      out.metadata = parse_metadata(value, file_label);
      continue;
    }
    out.tensors.push_back(EntryParser(file_label, key).parse(value));
  }
  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.offset, a.nbytes, a.name) < std::tie(b.offset, b.nbytes, b.name);
  });
  check_layout(out.tensors, data_bytes, file_label);
  return out;
}

}  // namespace lema::io
