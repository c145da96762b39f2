/* Target-slowdown workload: two threads pass a byte back and forth through two pipes, so every round
 * trip blocks and wakes each thread once (two context switches). Both threads are pinned to the last
 * CPU: a wake-up on another CPU would add an inter-processor interrupt and, on an idle CPU, the exit
 * from its idle state, whose cost on a virtual machine varies far more than what is measured here. It
 * prints "ready", waits for a line on stdin (so a profiler can attach first), performs ROUNDS round
 * trips and prints "elapsed=<s> rounds=<n>" measured with CLOCK_MONOTONIC around the exchange alone.
 * Usage: ctxswitch ROUNDS */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int ping[2], pong[2];
static long rounds;

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *echo(void *arg)
{
    char byte;
    for (long i = 0; i < rounds; i++) {
        if (read(ping[0], &byte, 1) != 1 || write(pong[1], &byte, 1) != 1)
            exit(2);
    }
    return arg;
}

__attribute__((noinline)) static void exchange(void)
{
    char byte = 'x';
    for (long i = 0; i < rounds; i++) {
        if (write(ping[1], &byte, 1) != 1 || read(pong[0], &byte, 1) != 1)
            exit(2);
    }
}

int main(int argc, char **argv)
{
    rounds = argc > 1 ? atol(argv[1]) : 100000;
    char line[16];
    pthread_t thread;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(sysconf(_SC_NPROCESSORS_ONLN) - 1, &one);
    if (sched_setaffinity(0, sizeof(one), &one) || pipe(ping) || pipe(pong))
        return 1;
    pthread_create(&thread, 0, echo, 0);
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    double start = wall();
    exchange();
    double elapsed = wall() - start;
    pthread_join(thread, 0);
    printf("elapsed=%.6f rounds=%ld\n", elapsed, rounds);
    return 0;
}
