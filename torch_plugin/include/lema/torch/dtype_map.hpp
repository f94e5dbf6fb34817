// The safetensors dtypes as torch scalar types.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>

#include "lema/io/dtype.hpp"

namespace lema::torch {

/// The torch scalar type holding `dtype`'s bytes unchanged; nullopt when this torch has none
/// (sub-byte floats, F8_E8M0 and the FNUZ variants where absent, C64).
std::optional<c10::ScalarType> to_scalar_type(io::Dtype dtype);

}  // namespace lema::torch
