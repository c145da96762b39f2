/* Steady-state load for the agent-cost benchmark: THREADS threads spin in a three-deep call chain for
 * SECONDS seconds (0: until killed). No allocation after start-up, so uprobes on the C library's
 * allocator never fire for it. Usage: busy SECONDS THREADS */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;
static double seconds;

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* The loop's state lives in a volatile, so -O2 can neither fold the loop into a constant nor leave
 * the time to clock_gettime: the samples land here, in code built with frame pointers. */
__attribute__((noinline)) static void spin_leaf(void)
{
    volatile unsigned long x = 0;
    for (int i = 0; i < 1000000; i++)
        x += i * 7;
    sink = x;
}

/* The store after the call keeps it from becoming a tail jump, so spin_mid keeps its frame. */
__attribute__((noinline)) static void spin_mid(void)
{
    spin_leaf();
    sink++;
}

static void *worker(void *arg)
{
    double end = seconds > 0 ? wall() + seconds : 1e300;
    while (wall() < end)
        spin_mid();
    return arg;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 0;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    pthread_t ids[64];
    for (int i = 1; i < threads && i < 64; i++)
        pthread_create(&ids[i], 0, worker, 0);
    worker(0);
    for (int i = 1; i < threads && i < 64; i++)
        pthread_join(ids[i], 0);
    return 0;
}
