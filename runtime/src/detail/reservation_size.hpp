// The one precondition every Backend::reserve shares: a positive multiple of the granularity.
#pragma once

#include <cstdint>
#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::runtime {

inline void check_reservation_size(std::uint64_t bytes, std::uint64_t granularity) {
  LEMA_EXPECTS(bytes > 0 && bytes % granularity == 0,
               "reserve: " + std::to_string(bytes) + " bytes is not a positive multiple of " +
                   format_size(granularity));
}

}  // namespace lema::runtime
