// The preconditions every backend shares: reservations and pool chunks are positive multiples
// of the granularity.
#pragma once

#include <cstddef>
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

inline void check_pool_shape(std::size_t chunks, std::uint64_t chunk_bytes,
                             std::uint64_t granularity) {
  LEMA_EXPECTS(chunks > 0 && chunk_bytes > 0 && chunk_bytes % granularity == 0,
               "create_pool: need at least one chunk of a multiple of " + format_size(granularity));
}

}  // namespace lema::runtime
