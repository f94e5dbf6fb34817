#include "lema/torch/dtype_map.hpp"

#include <torch/version.h>

namespace lema::torch {

// Version checks only where torch gained a type: unsigned ints in 2.3, F8_E8M0 in 2.7.
#define LEMA_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||       \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

std::optional<c10::ScalarType> to_scalar_type(io::Dtype dtype) {
  using c10::ScalarType;
  using io::Dtype;
  switch (dtype) {
    case Dtype::BOOL:
      return ScalarType::Bool;
    case Dtype::U8:
      return ScalarType::Byte;
    case Dtype::I8:
      return ScalarType::Char;
    case Dtype::I16:
      return ScalarType::Short;
    case Dtype::I32:
      return ScalarType::Int;
    case Dtype::I64:
      return ScalarType::Long;
    case Dtype::F16:
      return ScalarType::Half;
    case Dtype::BF16:
      return ScalarType::BFloat16;
    case Dtype::F32:
      return ScalarType::Float;
    case Dtype::F64:
      return ScalarType::Double;
    case Dtype::C64:
      return ScalarType::ComplexFloat;
    case Dtype::F8_E5M2:
      return ScalarType::Float8_e5m2;
    case Dtype::F8_E4M3:
      return ScalarType::Float8_e4m3fn;
    case Dtype::F8_E4M3FNUZ:
      return ScalarType::Float8_e4m3fnuz;
    case Dtype::F8_E5M2FNUZ:
      return ScalarType::Float8_e5m2fnuz;
#if LEMA_TORCH_AT_LEAST(2, 7)
    case Dtype::F8_E8M0:
      return ScalarType::Float8_e8m0fnu;
#endif
#if LEMA_TORCH_AT_LEAST(2, 3)
    case Dtype::U16:
      return ScalarType::UInt16;
    case Dtype::U32:
      return ScalarType::UInt32;
    case Dtype::U64:
      return ScalarType::UInt64;
#endif
    default:
      // F4 and F6 pack several elements per byte; torch's packed types change the shape, so
      // they are not offered as views of the file.
      return std::nullopt;
  }
}

}  // namespace lema::torch
