// The real CUDA runtime behind the hook, found with dlsym(RTLD_NEXT): the next definition after
// this library in the process's lookup order (libcudart, or a stand-in exporting the same names),
// else in a libcudart.so* loaded into a local scope (Note [Runtime found locally]).
//
// Each function is resolved on first use and cached in an atomic pointer: concurrent first calls
// resolve it twice and store the same value, so no lock or once-flag is needed, and a runtime
// loaded with RTLD_GLOBAL after the hook (a program that dlopens libcudart) is still found. A
// name that resolves to nothing yields nullptr; the caller reports it and returns
// cudaErrorInitializationError.
//
// Thread safety: every function from any thread.
#pragma once

#include <cstddef>

#include "cudart_abi.hpp"

namespace lema::preload::real {

using MallocFn = cuda_error (*)(void**, std::size_t);
using FreeFn = cuda_error (*)(void*);
using MallocAsyncFn = cuda_error (*)(void**, std::size_t, cuda_stream);
using FreeAsyncFn = cuda_error (*)(void*, cuda_stream);
using MallocManagedFn = cuda_error (*)(void**, std::size_t, unsigned);
using MemGetInfoFn = cuda_error (*)(std::size_t*, std::size_t*);

MallocFn malloc_fn() noexcept;
FreeFn free_fn() noexcept;
MallocAsyncFn malloc_async_fn() noexcept;
FreeAsyncFn free_async_fn() noexcept;
MallocManagedFn malloc_managed_fn() noexcept;
MemGetInfoFn mem_get_info_fn() noexcept;

/// cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation, the current device), with the
/// signature of the runtime found (see real_cudart.cpp). False when it is missing or fails:
/// advice is a hint, the allocation stands without it.
bool prefer_device(void* ptr, std::size_t bytes) noexcept;

}  // namespace lema::preload::real
