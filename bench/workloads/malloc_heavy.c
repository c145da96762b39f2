/* Target-slowdown workload: a malloc/free loop. It prints "ready" once started, waits for a line on
 * stdin (so a profiler can attach to its pid first), then performs OPS allocations of 16 to 4096
 * bytes (one in 64 of 64 KiB) into a ring of 1024 live blocks, freeing the block each one replaces, and
 * prints "elapsed=<s> ops=<n> bytes=<n>" measured with CLOCK_MONOTONIC around the loop alone.
 * Usage: malloc_heavy OPS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RING 1024

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) static unsigned long churn(long ops, void **ring)
{
    unsigned int seed = 12345;
    unsigned long bytes = 0;
    for (long i = 0; i < ops; i++) {
        unsigned int r = rand_r(&seed);
        size_t size = (r & 63) == 0 ? 65536 : 16 + (r >> 8) % 4081;
        int slot = (int)(i % RING);
        free(ring[slot]);
        ring[slot] = malloc(size);
        ((volatile char *)ring[slot])[0] = 1;
        bytes += size;
    }
    return bytes;
}

int main(int argc, char **argv)
{
    long ops = argc > 1 ? atol(argv[1]) : 1000000;
    static void *ring[RING];
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    double start = wall();
    unsigned long bytes = churn(ops, ring);
    double elapsed = wall() - start;
    printf("elapsed=%.6f ops=%ld bytes=%lu\n", elapsed, ops, bytes);
    return 0;
}
