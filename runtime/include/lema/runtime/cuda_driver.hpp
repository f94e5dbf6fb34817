// What the CUDA driver table (lema::cuda, src/cuda/driver_api.hpp) and the CUDA backends share:
// the options naming the driver library and the device, and the errors of driver calls. Apart
// from cuda_backend.hpp so that the driver table and the device context need not include the
// backends' header, which includes theirs (no cycle between the modules), and free of the
// toolkit's headers, so that it is declared in every build.
#pragma once

#include <cstdint>
#include <string>

#include "lema/base/error.hpp"

namespace lema::runtime {

struct CudaBackendOptions {
  int device = 0;
  /// The driver library to dlopen; empty: $LEMA_CUDA_DRIVER, else "libcuda.so.1".
  std::string driver_library;
  /// Page granularity; 0: the driver's minimum for the device. Must be a multiple of it.
  std::uint64_t granularity = 0;
  /// managed only: advise and prefetch mapped pages to the device and unmapped ones back to the
  /// host (the pager steers residency). false: plain unified memory, where the bytes are written
  /// on the host and every placement is left to the driver's page faults and eviction.
  bool managed_prefetch = true;
};

/// A CUDA driver call failed; what() names the call, its arguments and the driver's text.
class CudaError : public Error {
 public:
  CudaError(const std::string& what, int result) : Error(what), result_(result) {}
  /// The CUresult.
  int result() const noexcept { return result_; }

 private:
  int result_;
};

/// No usable CUDA driver or device: what() says why (missing library, driver too old, no
/// device, no virtual memory management) and what to do.
class CudaUnavailable : public Error {
 public:
  using Error::Error;
};

}  // namespace lema::runtime
