/* A family of processes that each do what all three profilers see: the parent forks CHILDREN children
 * (without exec: each is a new process with its parent's image), prints their pids one per line, and
 * waits for them. Each child burns BURN_MS of CPU time, allocates ALLOC_MB in 64 KiB blocks, and sleeps
 * SLEEPS times for SLEEP_MS (blocks the off-CPU profiler keeps: longer than its 1 ms minimum).
 * Usage: process_family CHILDREN BURN_MS ALLOC_MB SLEEPS SLEEP_MS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); /* CPU time: a busy host delays it, never cuts it */
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static volatile unsigned long sink;

__attribute__((noinline)) static void burn(int ms)
{
    double end = cpu_ms() + ms;
    while (cpu_ms() < end)
        for (int i = 0; i < 10000; i++)
            sink += i;
}

__attribute__((noinline)) static void allocate(int mb)
{
    for (int i = 0; i < mb * 16; i++) {
        char *block = malloc(64 * 1024);
        if (!block)
            exit(3);
        block[0] = (char)i;
        sink += (unsigned char)block[0];
        free(block);
    }
}

__attribute__((noinline)) static void nap(int times, int ms)
{
    for (int i = 0; i < times; i++)
        usleep(ms * 1000);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s CHILDREN BURN_MS ALLOC_MB SLEEPS SLEEP_MS\n", argv[0]);
        return 2;
    }
    int children = atoi(argv[1]);
    for (int i = 0; i < children; i++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid == 0) {
            burn(atoi(argv[2]));
            allocate(atoi(argv[3]));
            nap(atoi(argv[4]), atoi(argv[5]));
            _exit(0);
        }
        printf("%d\n", (int)pid);
    }
    fflush(stdout);
    int status, failed = 0;
    while (wait(&status) > 0)
        failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    return failed;
}
