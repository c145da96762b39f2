/* CPU workload with a hot leaf function that sets up no frame (built with -fomit-frame-pointer, as
 * optimized libraries are), called from two functions built with frame pointers: caller_a calls it
 * three times for each call from caller_b. While the leaf runs, rbp still holds its caller's frame,
 * so a frame-pointer walk skips straight from the leaf to main and the callers are lost; unwinding
 * with CFI finds them. On exit prints "calls_a=<n> calls_b=<n>".
 * Usage: frameless_leaf CPU_SECONDS [gate]   (with "gate" it first waits for one byte on stdin) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* CPU time, not wall time: the run lasts SECONDS of CPU however busy the machine is, so the number of
 * samples the tests expect (99 Hz x the CPU time) does not shrink when the workload shares the cores. */
static double cpu_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline, optimize("omit-frame-pointer"))) unsigned long leaf(unsigned long n, unsigned long seed)
{
    unsigned long x = seed;
    for (unsigned long i = 0; i < n; i++)
        x = x * 6364136223846793005UL + 1442695040888963407UL;
    return x;
}

/* The arithmetic after each call keeps them from becoming tail calls (a jump leaves no caller). */
__attribute__((noinline)) unsigned long caller_a(unsigned long seed)
{
    return leaf(200000, seed) ^ (seed << 1);
}

__attribute__((noinline)) unsigned long caller_b(unsigned long seed)
{
    return leaf(200000, seed) ^ (seed << 2);
}

int main(int argc, char **argv)
{
    if (argc > 2 && !strcmp(argv[2], "gate")) {
        char go;
        if (read(0, &go, 1) != 1)
            return 1;
    }
    double end = cpu_seconds() + (argc > 1 ? atof(argv[1]) : 3);
    unsigned long sink = 0, calls_a = 0, calls_b = 0;
    while (cpu_seconds() < end) {
        for (int i = 0; i < 3; i++, calls_a++)
            sink += caller_a(sink + (unsigned long)i);
        sink += caller_b(sink);
        calls_b++;
    }
    printf("calls_a=%lu calls_b=%lu sink=%lu\n", calls_a, calls_b, sink & 1);
    return 0;
}
