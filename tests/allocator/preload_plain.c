/* A program that knows nothing of CUDA (no libcudart, no cuda* symbol), run under the preload
 * hook: it must run as it does without it, threads and a fork included. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void* work(void* arg) {
  char* p = malloc(1 << 20);
  memset(p, 1, 1 << 20);
  free(p);
  return arg;
}

int main(void) {
  pthread_t t;
  if (pthread_create(&t, NULL, work, NULL) != 0 || pthread_join(t, NULL) != 0) return 1;
  pid_t pid = fork();
  if (pid == 0) _exit(7);
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 7)
    return 1;
  printf("plain: ok\n");
  return 0;
}
