// The slice of the CUDA runtime's ABI the hook touches, declared here so that the hook builds and
// loads without the toolkit: cudaError_t is an int-sized enum, streams are opaque pointers, and
// the values below are the runtime's own (cuda_runtime_api.h, driver_types.h).
#pragma once

#include <cstddef>

namespace lema::preload {

using cuda_error = int;
using cuda_stream = void*;

inline constexpr cuda_error kCudaSuccess = 0;
inline constexpr cuda_error kCudaErrorInvalidValue = 1;
inline constexpr cuda_error kCudaErrorMemoryAllocation = 2;
inline constexpr cuda_error kCudaErrorInitializationError = 3;

inline constexpr unsigned kCudaMemAttachGlobal = 1;
inline constexpr int kCudaMemAdviseSetPreferredLocation = 3;
inline constexpr int kCudaMemLocationTypeDevice = 1;

// cudaMemLocation (CUDA 12.2+): passed by value to cudaMemAdvise_v2 and, from CUDA 13, to
// cudaMemAdvise itself.
struct CudaMemLocation {
  int type;
  int id;
};

}  // namespace lema::preload
