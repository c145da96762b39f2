/* Allocation workload with a known truth: it allocates known byte totals from known call sites and
 * prints, at exit, the bytes (and calls) each site really asked for, the truth tests compare profiles
 * with. Blocks are freed as it goes (a ring of 64 live blocks), so memory stays small.
 *
 * Usage: alloc_sites MODE AMOUNT [wait]
 *   sites MB      MB megabytes in all: 3/4 from alloc_big (calls malloc itself), 1/4 from alloc_small
 *                 (through alloc_helper, which calls malloc). Sizes vary from 1 byte to 2 MiB.
 *                 Prints "alloc_big=<bytes> alloc_small=<bytes> calls=<n>".
 *   mixed MB      MB megabytes, equally from use_malloc, use_calloc, use_realloc (a growing realloc and
 *                 realloc(NULL, n)), use_posix_memalign and use_aligned_alloc (16-byte alignment:
 *                 glibc serves these two, and realloc(NULL, n), by calling malloc itself).
 *                 Prints "<site>=<bytes>" for each.
 *   storm SECONDS two threads call malloc/free (16 to 1039 bytes) as fast as they can from storm_loop.
 *                 Prints "storm_calls=<n> storm_bytes=<bytes> storm_seconds=<s>".
 * With "wait" it prints its pid and "ready", then waits for a line on stdin before allocating.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RING 64
#define MIB (1024.0 * 1024.0)

/* Called through volatile pointers: the compiler may not turn realloc(NULL, n) into malloc(n), nor
 * drop an allocation whose block is unused. */
static void *(*volatile realloc_fn)(void *, size_t) = realloc;
static void *volatile sink;

struct ring {
    void *blocks[RING];
    unsigned next;
};

static void keep(struct ring *ring, void *block)
{
    free(ring->blocks[ring->next]);
    ring->blocks[ring->next] = block;
    ring->next = (ring->next + 1) % RING;
    sink = block;
}

static void release(struct ring *ring)
{
    for (int i = 0; i < RING; i++) {
        free(ring->blocks[i]);
        ring->blocks[i] = 0;
    }
}

/* xorshift64: the same sizes on every run */
static unsigned long long next_random(unsigned long long *state)
{
    unsigned long long x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

/* 1 byte to 16 KiB nine times in ten, else up to 2 MiB: small ones far below the sampling distance,
 * a few above it. */
static size_t next_size(unsigned long long *state)
{
    unsigned long long r = next_random(state);
    if (r % 10)
        return 1 + (r >> 8) % 16384;
    return 1 + (r >> 8) % (2 << 20);
}

__attribute__((noinline)) void *alloc_helper(size_t size)
{
    return malloc(size);
}

__attribute__((noinline)) void alloc_big(struct ring *ring, size_t size)
{
    keep(ring, malloc(size));
}

__attribute__((noinline)) void alloc_small(struct ring *ring, size_t size)
{
    keep(ring, alloc_helper(size));
}

static void run_sites(double megabytes)
{
    struct ring ring = {0};
    unsigned long long state = 0x9e3779b97f4a7c15ULL, big = 0, small = 0, calls = 0;
    double goal = megabytes * MIB;
    while (big + small < goal) {
        size_t size = next_size(&state);
        /* Keep the byte split at 3:1 whatever the sizes drawn. */
        if (big <= 3 * small) {
            alloc_big(&ring, size);
            big += size;
        } else {
            alloc_small(&ring, size);
            small += size;
        }
        calls++;
    }
    release(&ring);
    printf("alloc_big=%llu alloc_small=%llu calls=%llu\n", big, small, calls);
}

__attribute__((noinline)) void use_malloc(struct ring *ring, size_t size)
{
    keep(ring, malloc(size));
}

__attribute__((noinline)) void use_calloc(struct ring *ring, size_t size)
{
    keep(ring, calloc(size % 7 + 1, size / (size % 7 + 1) + 1));
}

__attribute__((noinline)) void use_realloc(struct ring *ring, size_t size)
{
    keep(ring, realloc_fn(NULL, size)); /* glibc tail-calls malloc */
}

__attribute__((noinline)) void *use_realloc_grow(void *block, size_t size)
{
    return realloc_fn(block, size);
}

__attribute__((noinline)) void use_posix_memalign(struct ring *ring, size_t size)
{
    void *block = 0;
    if (posix_memalign(&block, 16, size) == 0)
        keep(ring, block);
}

__attribute__((noinline)) void use_aligned_alloc(struct ring *ring, size_t size)
{
    keep(ring, aligned_alloc(16, (size + 15) & ~(size_t)15));
}

static void run_mixed(double megabytes)
{
    struct ring ring = {0};
    unsigned long long state = 0x2545f4914f6cdd1dULL;
    unsigned long long m = 0, c = 0, r = 0, p = 0, a = 0;
    double goal = megabytes * MIB / 5;
    void *growing = 0;
    size_t grown = 0;
    while (m < goal || c < goal || r < goal || p < goal || a < goal) {
        size_t size = next_size(&state);
        if (m < goal) {
            use_malloc(&ring, size);
            m += size;
        }
        if (c < goal) {
            size_t count = size % 7 + 1, each = size / count + 1;
            use_calloc(&ring, size);
            c += count * each;
        }
        if (r < goal) {
            if (size & 1) {
                use_realloc(&ring, size);
                r += size;
            } else { /* grow a block by up to 64 KiB; start over beyond 1 MiB */
                size_t larger = grown + 1 + size % 65536;
                if (larger > (1 << 20)) {
                    free(growing);
                    growing = 0;
                    larger = 1 + size % 65536;
                }
                growing = use_realloc_grow(growing, larger);
                grown = larger;
                r += larger;
            }
        }
        if (p < goal) {
            use_posix_memalign(&ring, size);
            p += size;
        }
        if (a < goal) {
            use_aligned_alloc(&ring, size);
            a += (size + 15) & ~(size_t)15;
        }
    }
    free(growing);
    release(&ring);
    printf("use_malloc=%llu use_calloc=%llu use_realloc=%llu use_posix_memalign=%llu use_aligned_alloc=%llu\n", m, c,
           r, p, a);
}

static double storm_seconds;
static unsigned long long storm_calls, storm_bytes;
static pthread_mutex_t storm_lock = PTHREAD_MUTEX_INITIALIZER;

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) void *storm_loop(void *arg)
{
    unsigned long long state = 0x853c49e6748fea9bULL ^ (unsigned long long)(size_t)arg, calls = 0, bytes = 0;
    double end = wall() + storm_seconds;
    while (wall() < end) {
        for (int i = 0; i < 1000; i++) {
            size_t size = 16 + next_random(&state) % 1024;
            void *block = malloc(size);
            sink = block;
            free(block);
            bytes += size;
        }
        calls += 1000;
    }
    pthread_mutex_lock(&storm_lock);
    storm_calls += calls;
    storm_bytes += bytes;
    pthread_mutex_unlock(&storm_lock);
    return arg;
}

static void run_storm(double seconds)
{
    pthread_t other;
    storm_seconds = seconds;
    double start = wall();
    pthread_create(&other, 0, storm_loop, (void *)1);
    storm_loop((void *)2);
    pthread_join(other, 0);
    printf("storm_calls=%llu storm_bytes=%llu storm_seconds=%.6f\n", storm_calls, storm_bytes, wall() - start);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: alloc_sites sites|mixed MB | storm SECONDS [wait]\n");
        return 2;
    }
    double amount = atof(argv[2]);
    if (argc > 3 && strcmp(argv[3], "wait") == 0) {
        char line[16];
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin))
            return 3;
    }
    if (strcmp(argv[1], "sites") == 0)
        run_sites(amount);
    else if (strcmp(argv[1], "mixed") == 0)
        run_mixed(amount);
    else if (strcmp(argv[1], "storm") == 0)
        run_storm(amount);
    else
        return 2;
    return 0;
}
