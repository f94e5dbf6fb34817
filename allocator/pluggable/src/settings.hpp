// The pluggable allocator's settings, read from the environment when a device's resource is made.
#pragma once

#include "lema/allocator/cuda/device_vmm_resource.hpp"

namespace lema::pluggable {

/// Options for `device` from LEMA_ALLOC_BUDGET and LEMA_ALLOC_RESERVE (sizes such as "8GiB";
/// unset or empty: the resource's defaults) and LEMA_CUDA_DRIVER (read by the driver loader).
/// Throws lema::InvalidArgument naming the variable for a malformed size.
allocator::cuda::DeviceVmmOptions options_from_environment(int device);

}  // namespace lema::pluggable
