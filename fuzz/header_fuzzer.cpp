// libFuzzer target for the safetensors header parser: the first 8 bytes of the input are the
// size of the data section, the rest is the header. Any input must either parse or throw
// CheckpointError; anything else (a crash, a sanitizer report, another exception) is a bug.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "lema/io/checkpoint.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 8) return 0;
  std::uint64_t data_bytes = 0;
  for (int i = 7; i >= 0; --i) data_bytes = (data_bytes << 8) | data[i];
  const std::string_view header(reinterpret_cast<const char*>(data) + 8, size - 8);
  try {
    const auto parsed = lema::io::parse_header(header, data_bytes, "fuzz.safetensors");
    // Properties every accepted header has: tensors tile the data section exactly.
    std::uint64_t end = 0;
    for (const auto& t : parsed.tensors) {
      if (t.offset != end) __builtin_trap();
      end = t.offset + t.nbytes;
    }
    if (end != data_bytes) __builtin_trap();
  } catch (const lema::io::CheckpointError&) {
    // A rejection is a correct answer.
  }
  return 0;
}
