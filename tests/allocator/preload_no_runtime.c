/* A program that calls the CUDA runtime's allocation functions with no runtime in the process:
 * it links the hook itself in place of libcudart, so the hook's dlsym(RTLD_NEXT) finds nothing.
 * Every call must answer cudaErrorInitializationError (3), without a crash. */
#include <stddef.h>
#include <stdio.h>

int cudaMalloc(void** ptr, size_t size);
int cudaFree(void* ptr);
int cudaMallocAsync(void** ptr, size_t size, void* stream);
int cudaFreeAsync(void* ptr, void* stream);
int cudaMallocManaged(void** ptr, size_t size, unsigned flags);
int cudaMemGetInfo(size_t* free_bytes, size_t* total);

int main(void) {
  void* p = NULL;
  size_t f = 0, t = 0;
  int ok = cudaMalloc(&p, 4 << 20) == 3 && cudaMalloc(&p, 16) == 3 && cudaFree(p) == 3 &&
           cudaMallocAsync(&p, 4 << 20, NULL) == 3 && cudaFreeAsync(p, NULL) == 3 &&
           cudaMallocManaged(&p, 4 << 20, 1) == 3 && cudaMemGetInfo(&f, &t) == 3 && p == NULL;
  printf(ok ? "no_runtime: ok\n" : "no_runtime: a call did not answer 3\n");
  return ok ? 0 : 1;
}
