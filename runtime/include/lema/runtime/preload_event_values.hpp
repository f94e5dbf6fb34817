// The values of a preload event record's call, route and flags fields (Note [Preload event
// section] in preload_events.hpp). One definition for the hook that writes them
// (allocator/preload, which includes this header and links nothing of lema) and the readers.
#pragma once

#include <cstdint>

namespace lema::runtime {

enum class PreloadCall : std::uint8_t {
  malloc = 1,
  malloc_async = 2,
  malloc_managed = 3,
  free = 4,
  free_async = 5,
  mem_get_info = 6,
};
inline constexpr std::uint8_t kLastPreloadCall = 6;

enum class PreloadRoute : std::uint8_t {
  passthrough = 0,  // to the real function the program called
  managed = 1,      // the hook's managed memory under the budget (or a free of it)
  refused = 2,      // over the budget: cudaErrorMemoryAllocation, no runtime call
  budget = 3,       // cudaMemGetInfo answered from the budget
};
inline constexpr std::uint8_t kLastPreloadRoute = 3;

inline constexpr std::uint8_t kPreloadBadFree = 1;     // the runtime refused the free
inline constexpr std::uint8_t kPreloadDoubleFree = 2;  // ... of managed memory the hook freed

}  // namespace lema::runtime
