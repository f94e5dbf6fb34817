/* liblema_cuda_alloc.so: LEMA's device memory resource (lema::allocator::cuda::DeviceVmmResource)
 * behind the C ABI of PyTorch's pluggable allocator, plus pause/resume of tagged memory.
 *
 *   torch.cuda.memory.CUDAPluggableAllocator("liblema_cuda_alloc.so", "lema_alloc", "lema_free")
 *
 * One resource per device, made on the device's first allocation with the settings of the
 * environment (LEMA_ALLOC_BUDGET, LEMA_ALLOC_RESERVE, LEMA_CUDA_DRIVER; docs/USER_GUIDE.md).
 * No function lets an exception out: a failure prints one line on stderr, which
 * lema_last_error() also returns, and gives nullptr (lema_alloc) or -1.
 * Thread safety: every function may be called from any thread. */
#ifndef LEMA_CUDA_ALLOC_H_
#define LEMA_CUDA_ALLOC_H_

#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cudaStream_t as the runtime declares it, without the runtime's headers: the same type. */
typedef struct CUstream_st* cudaStream_t;

/* At least `size` bytes of device memory on `device`, usable at once on any stream; nullptr
 * for size <= 0 (with a line for a negative size), over the budget, or on a driver error. */
void* lema_alloc(ssize_t size, int device, cudaStream_t stream);
/* Frees `ptr` (from lema_alloc, with its size) once the work queued on `stream` so far has
 * completed. nullptr is a no-op; an unknown pointer (a double free) prints one line. */
void lema_free(void* ptr, ssize_t size, int device, cudaStream_t stream);

/* The calling thread's tag for the allocations it makes from now on (NULL or "": none). */
int lema_set_tag(const char* tag);
/* Releases the device memory of every allocation tagged `tag` on every device, keeping the
 * addresses; the contents are lost. The caller must have finished all work on that memory. */
int lema_pause(const char* tag);
/* The same, after copying the contents to pinned host memory; lema_resume puts them back. */
int lema_pause_keeping_contents(const char* tag);
/* Maps fresh device memory at the addresses lema_pause released. */
int lema_resume(const char* tag);

/* Device memory held on `device` (mapped: live and pending frees; pending: freed on a stream,
 * waiting for it; paused: addresses of paused tags; budget), into out[0..3]. -1 when no
 * allocation was ever made on the device. */
int lema_usage(int device, unsigned long long out[4]);
/* The calling thread's last error line ("" when none). */
const char* lema_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* LEMA_CUDA_ALLOC_H_ */
