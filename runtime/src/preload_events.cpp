// Names of the LD_PRELOAD hook's calls and routes (preload_events.hpp).
#include "lema/runtime/preload_events.hpp"

namespace lema::runtime {

std::string_view preload_call_name(PreloadCall call) {
  switch (call) {
    case PreloadCall::malloc:
      return "cudaMalloc";
    case PreloadCall::malloc_async:
      return "cudaMallocAsync";
    case PreloadCall::malloc_managed:
      return "cudaMallocManaged";
    case PreloadCall::free:
      return "cudaFree";
    case PreloadCall::free_async:
      return "cudaFreeAsync";
    case PreloadCall::mem_get_info:
      return "cudaMemGetInfo";
  }
  return "?";
}

std::string_view preload_route_name(PreloadRoute route) {
  switch (route) {
    case PreloadRoute::passthrough:
      return "passthrough";
    case PreloadRoute::managed:
      return "managed";
    case PreloadRoute::refused:
      return "refused";
    case PreloadRoute::budget:
      return "budget";
  }
  return "?";
}

}  // namespace lema::runtime
