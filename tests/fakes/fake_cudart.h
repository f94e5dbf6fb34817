/* The test side of the fake CUDA runtime (libfake_cudart.so, fake_cudart.cpp): counters a test
 * reads to see which real function a call reached. Plain C, for C and ctypes callers alike. */
#ifndef LEMA_FAKE_CUDART_H
#define LEMA_FAKE_CUDART_H

#ifdef __cplusplus
extern "C" {
#endif

/* The count named `name`: "malloc", "malloc_async", "managed", "free", "free_async",
 * "free_errors" (frees of pointers the fake never gave out), "advise" (cudaMemAdvise calls with
 * a preferred device location), "live" (allocations not freed) and "live_bytes"; -1 for an
 * unknown name. */
long long fake_cudart_count(const char* name);
/* 1 when `ptr` is a live managed allocation of the fake, 0 otherwise. */
int fake_cudart_is_managed(const void* ptr);

#ifdef __cplusplus
}
#endif

#endif
