/* CPU workload with a known truth: every thread alternates between two leaf functions, spending
 * on average 30 ms of its own CPU time in hot_a for each 10 ms in hot_b (3:1, in thread CPU time, so
 * preemption by other processes cannot skew it). Slice lengths are random (x0.5 to x1.5) so the
 * workload has no period a fixed-frequency sampler could alias with. On exit it prints the CPU
 * seconds each function really got, "hot_a=<s> hot_b=<s>", the truth tests compare profiles with.
 * Usage: cpu_split SECONDS THREADS */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;
static double spent_a, spent_b;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double thread_cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) double hot_a(double cpu_ms)
{
    double start = thread_cpu(), now = start;
    unsigned long x = 0;
    while (now - start < cpu_ms / 1000) {
        for (int i = 0; i < 20000; i++)
            x += i * 7;
        now = thread_cpu();
    }
    sink = x;
    return now - start;
}

__attribute__((noinline)) double hot_b(double cpu_ms)
{
    double start = thread_cpu(), now = start;
    unsigned long x = 0;
    while (now - start < cpu_ms / 1000) {
        for (int i = 0; i < 20000; i++)
            x += i * 13;
        now = thread_cpu();
    }
    sink = x;
    return now - start;
}

static double seconds;

static void *worker(void *arg)
{
    double end = wall() + seconds, a = 0, b = 0;
    unsigned int seed = (unsigned int)(unsigned long)&a;
    while (wall() < end) {
        double jitter = 0.5 + (double)rand_r(&seed) / RAND_MAX;
        a += hot_a(30.0 * jitter);
        b += hot_b(10.0 * jitter);
    }
    pthread_mutex_lock(&lock);
    spent_a += a;
    spent_b += b;
    pthread_mutex_unlock(&lock);
    return arg;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    pthread_t ids[64];
    for (int i = 1; i < threads && i < 64; i++)
        pthread_create(&ids[i], 0, worker, 0);
    worker(0);
    for (int i = 1; i < threads && i < 64; i++)
        pthread_join(ids[i], 0);
    printf("hot_a=%.6f hot_b=%.6f\n", spent_a, spent_b);
    return 0;
}
