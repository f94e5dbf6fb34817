// The safetensors element types, as the reference implementation names them, in its order
// (increasing alignment; the reference writer sorts tensors by this order, descending).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace lema::io {

enum class Dtype : std::uint8_t {
  BOOL,
  F4,       // float4 e2m1, two per byte
  F6_E2M3,  // float6, four per three bytes
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
};

inline constexpr int kDtypeCount = 22;

/// "F32" → Dtype::F32; nullopt for a name the format does not define.
std::optional<Dtype> parse_dtype(std::string_view name);
/// The format's name for the dtype ("BF16").
std::string_view dtype_name(Dtype dtype);
/// Bits per element (4 for F4, 6 for F6_*, 8 × bytes otherwise).
unsigned dtype_bits(Dtype dtype);

}  // namespace lema::io
