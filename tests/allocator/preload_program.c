/* A plain C program of the CUDA runtime's allocation calls, linked against the fake runtime
 * (tests/fakes/fake_cudart.cpp) and run under LD_PRELOAD=liblema_preload.so by
 * preload_run.sh. argv[1] names a scenario; each checks where its calls went through the fake's
 * counters and exits 0 when every property holds, 1 (with the failed check on stdout) if not. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fake_cudart.h"

/* The runtime's signatures, as the hook declares them (no toolkit needed). */
int cudaMalloc(void** ptr, size_t size);
int cudaFree(void* ptr);
int cudaMallocAsync(void** ptr, size_t size, void* stream);
int cudaFreeAsync(void* ptr, void* stream);
int cudaMallocManaged(void** ptr, size_t size, unsigned flags);
int cudaMemGetInfo(size_t* free_bytes, size_t* total);

#define MiB ((size_t)1 << 20)
#define KiB ((size_t)1 << 10)

static int failures = 0;
#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      printf("%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
      ++failures;                                                       \
    }                                                                   \
  } while (0)

static long long count(const char* name) {
  return fake_cudart_count(name);
}

static void* alloc(size_t size) {
  void* p = NULL;
  int rc = cudaMalloc(&p, size);
  CHECK(rc == 0);
  if (p) memset(p, 0xab, size); /* the memory is usable */
  return p;
}

static void info(size_t* free_bytes, size_t* total) {
  CHECK(cudaMemGetInfo(free_bytes, total) == 0);
}

/* LEMA_BUDGET=64M, the default threshold (1 MiB). */
static void routes(void) {
  size_t free_bytes = 0, total = 0;
  void* large = alloc(4 * MiB);
  CHECK(fake_cudart_is_managed(large));
  CHECK(count("managed") == 1 && count("advise") == 1 && count("malloc") == 0);
  void* small = alloc(4 * KiB);
  CHECK(!fake_cudart_is_managed(small));
  CHECK(count("malloc") == 1 && count("managed") == 1);
  info(&free_bytes, &total);
  CHECK(total == 64 * MiB);
  CHECK(free_bytes == 60 * MiB);

  void* large_async = NULL;
  void* small_async = NULL;
  CHECK(cudaMallocAsync(&large_async, 2 * MiB, NULL) == 0);
  CHECK(fake_cudart_is_managed(large_async) && count("malloc_async") == 0);
  CHECK(cudaMallocAsync(&small_async, 1 * KiB, NULL) == 0);
  CHECK(!fake_cudart_is_managed(small_async) && count("malloc_async") == 1);

  void* own_managed = NULL; /* the program's own managed memory counts against the budget */
  CHECK(cudaMallocManaged(&own_managed, 8 * MiB, 1) == 0);
  CHECK(fake_cudart_is_managed(own_managed) && count("advise") == 2);
  info(&free_bytes, &total);
  CHECK(free_bytes == 50 * MiB);

  CHECK(cudaFree(large) == 0);
  CHECK(cudaFree(small) == 0);
  CHECK(count("free") == 2);
  CHECK(cudaFreeAsync(large_async, NULL) == 0); /* managed: released with cudaFree */
  CHECK(count("free") == 3 && count("free_async") == 0);
  CHECK(cudaFreeAsync(small_async, NULL) == 0);
  CHECK(count("free_async") == 1);
  CHECK(cudaFree(own_managed) == 0);
  info(&free_bytes, &total);
  CHECK(free_bytes == 64 * MiB && total == 64 * MiB);
  CHECK(count("live") == 0 && count("free_errors") == 0);
  CHECK(cudaFree(NULL) == 0);
}

/* LEMA_BUDGET=64M: the fifth 16 MiB allocation is refused as the runtime refuses one. */
static void budget(void) {
  void* p[4];
  size_t free_bytes = 1, total = 0;
  for (int i = 0; i < 4; ++i) p[i] = alloc(16 * MiB);
  void* q = NULL;
  CHECK(cudaMalloc(&q, 16 * MiB) == 2);
  CHECK(cudaMallocAsync(&q, 16 * MiB, NULL) == 2);
  CHECK(cudaMallocManaged(&q, 16 * MiB, 1) == 2);
  CHECK(count("managed") == 4);
  info(&free_bytes, &total);
  CHECK(free_bytes == 0 && total == 64 * MiB);
  void* small = alloc(4 * KiB); /* small allocations are not the budget's */
  CHECK(small != NULL);
  CHECK(cudaFree(p[3]) == 0);
  p[3] = alloc(16 * MiB);
  CHECK(fake_cudart_is_managed(p[3]));
  CHECK(cudaMalloc(&q, 65 * MiB) == 2); /* more than the whole budget */
  for (int i = 0; i < 4; ++i) CHECK(cudaFree(p[i]) == 0);
  CHECK(cudaFree(small) == 0);
  CHECK(count("live") == 0);
}

/* A hook that passes through (bad settings): nothing is managed, the device's own figures. */
static void passthrough(void) {
  void* p = alloc(4 * MiB);
  CHECK(!fake_cudart_is_managed(p) && count("malloc") == 1 && count("managed") == 0);
  size_t free_bytes = 0, total = 0;
  info(&free_bytes, &total);
  const char* fake_total = getenv("FAKE_CUDART_TOTAL");
  CHECK(fake_total && total == strtoull(fake_total, NULL, 10));
  CHECK(cudaFree(p) == 0 && count("live") == 0);
}

static void bad_free(void) {
  void* host = malloc(64);
  CHECK(cudaFree(host) == 1); /* the runtime's answer, passed on */
  CHECK(count("free_errors") == 1);
  free(host);
}

static void double_free(void) {
  void* p = alloc(4 * MiB);
  CHECK(cudaFree(p) == 0);
  CHECK(cudaFree(p) == 1);
  CHECK(count("free_errors") == 1);
}

/* LEMA_PRELOAD_TABLE=16: twelve entries (three quarters); the rest pass through. */
static void table_full(void) {
  void* p[20];
  for (int i = 0; i < 20; ++i) p[i] = alloc(2 * MiB);
  CHECK(count("managed") == 12 && count("malloc") == 8);
  for (int i = 0; i < 20; ++i) CHECK(cudaFree(p[i]) == 0);
  CHECK(count("live") == 0 && count("free_errors") == 0);
}

/* LEMA_PRELOAD_THRESHOLD=0: every allocation is managed, but for a zero-byte one, which stays the
 * runtime's (it may answer a null pointer, which the hook's table cannot hold). */
static void zero_threshold(void) {
  void* empty = NULL;
  CHECK(cudaMalloc(&empty, 0) == 0);
  CHECK(count("malloc") == 1 && count("managed") == 0);
  void* tiny = alloc(16);
  CHECK(fake_cudart_is_managed(tiny) && count("managed") == 1);
  CHECK(cudaFree(tiny) == 0 && cudaFree(empty) == 0);
  CHECK(count("live") == 0);
}

static atomic_int stop;
static void* churn(void* arg) {
  (void)arg;
  while (!atomic_load(&stop)) {
    void* a = NULL;
    void* b = NULL;
    if (cudaMalloc(&a, 2 * MiB) == 0) cudaFree(a);
    if (cudaMalloc(&b, 4 * KiB) == 0) cudaFree(b);
  }
  return NULL;
}

/* Eight threads allocate and free through the hook at once: every large allocation is managed,
 * none is lost or counted twice (the budget's view is whole again at the end). */
#define THREADS 8
#define PER_THREAD 20000
static void* allocate_many(void* arg) {
  (void)arg;
  for (int i = 0; i < PER_THREAD; ++i) {
    void* a = NULL;
    void* b = NULL;
    if (cudaMalloc(&a, 2 * MiB) != 0 || !fake_cudart_is_managed(a)) return (void*)1;
    if (cudaMalloc(&b, 4 * KiB) != 0 || fake_cudart_is_managed(b)) return (void*)1;
    if (cudaFree(a) != 0 || cudaFree(b) != 0) return (void*)1;
  }
  return NULL;
}

static void threads(void) {
  pthread_t t[THREADS];
  for (int i = 0; i < THREADS; ++i) CHECK(pthread_create(&t[i], NULL, allocate_many, NULL) == 0);
  for (int i = 0; i < THREADS; ++i) {
    void* failed = NULL;
    pthread_join(t[i], &failed);
    CHECK(failed == NULL);
  }
  size_t free_bytes = 0, total = 0;
  info(&free_bytes, &total);
  CHECK(free_bytes == 64 * MiB && total == 64 * MiB);
  CHECK(count("managed") == THREADS * PER_THREAD && count("live") == 0);
  CHECK(count("free_errors") == 0);
}

/* Forks while another thread allocates and frees through the hook: every child allocates,
 * reads the budget and frees, and exits 0; none hangs on a lock the other thread held. */
static void fork_children(void) {
  pthread_t t;
  CHECK(pthread_create(&t, NULL, churn, NULL) == 0);
  void* kept = alloc(8 * MiB);
  for (int i = 0; i < 200; ++i) {
    pid_t pid = fork();
    if (pid == 0) {
      void* p = NULL;
      size_t free_bytes = 0, total = 0;
      int ok = cudaMalloc(&p, 4 * MiB) == 0 && fake_cudart_is_managed(p) &&
               cudaMemGetInfo(&free_bytes, &total) == 0 && total == 64 * MiB &&
               cudaFree(p) == 0 && cudaFree(kept) == 0;
      _exit(ok ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (failures) break;
  }
  atomic_store(&stop, 1);
  pthread_join(t, NULL);
  CHECK(cudaFree(kept) == 0);
}

/* The benchmark's loop: a training step's pattern of one large buffer and a few small ones, each
 * written once (touch) or not written at all (the calls' cost alone). */
static void bench(int iterations, int touch) {
  for (int i = 0; i < iterations; ++i) {
    void* large = NULL;
    void* small[4];
    CHECK(cudaMalloc(&large, 4 * MiB) == 0);
    if (touch) memset(large, 1, 4 * MiB);
    for (int k = 0; k < 4; ++k) {
      CHECK(cudaMalloc(&small[k], 64 * KiB) == 0);
      if (touch) memset(small[k], 1, 64 * KiB);
    }
    for (int k = 0; k < 4; ++k) cudaFree(small[k]);
    cudaFree(large);
  }
}

int main(int argc, char** argv) {
  const char* s = argc > 1 ? argv[1] : "";
  if (!strcmp(s, "routes")) routes();
  else if (!strcmp(s, "budget")) budget();
  else if (!strcmp(s, "passthrough")) passthrough();
  else if (!strcmp(s, "bad_free")) bad_free();
  else if (!strcmp(s, "double_free")) double_free();
  else if (!strcmp(s, "table_full")) table_full();
  else if (!strcmp(s, "fork")) fork_children();
  else if (!strcmp(s, "threads")) threads();
  else if (!strcmp(s, "zero_threshold")) zero_threshold();
  else if (!strcmp(s, "bench")) bench(argc > 2 ? atoi(argv[2]) : 1000, 1);
  else if (!strcmp(s, "bench_calls")) bench(argc > 2 ? atoi(argv[2]) : 1000, 0);
  else {
    printf("unknown scenario '%s'\n", s);
    return 2;
  }
  if (failures == 0) printf("%s: ok\n", s);
  return failures ? 1 : 0;
}
