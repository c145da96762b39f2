/* CPU workload that lives in the vDSO: read_clock calls clock_gettime(CLOCK_MONOTONIC) in a loop, which
 * libc hands to the kernel's vDSO (__vdso_clock_gettime; with a clock source the vDSO cannot read, the
 * vDSO itself makes the system call). On exit prints "calls=<n>".
 * Usage: vdso_clock SECONDS [gate]   (with "gate" it first waits for one byte on stdin) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) unsigned long read_clock(double seconds)
{
    struct timespec start, now;
    unsigned long calls = 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        clock_gettime(CLOCK_MONOTONIC, &now);
        calls++;
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return calls;
}

int main(int argc, char **argv)
{
    if (argc > 2 && strcmp(argv[2], "gate") == 0) {
        char byte;
        if (read(0, &byte, 1) != 1)
            return 1;
    }
    printf("calls=%lu\n", read_clock(argc > 1 ? atof(argv[1]) : 5));
    return 0;
}
