/* CPU workload that lives in the vDSO: read_clock calls clock_gettime(CLOCK_MONOTONIC) in a loop, which
 * libc hands to the kernel's vDSO (__vdso_clock_gettime; with a clock source the vDSO cannot read, the
 * vDSO itself makes the system call). On exit prints "calls=<n>".
 * Usage: vdso_clock CPU_SECONDS [gate]   (with "gate" it first waits for one byte on stdin) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Runs for SECONDS of CPU time, not wall time, so the tests' expected sample count holds on a busy
 * machine. The CPU clock is a system call (the vDSO does not serve it): it is read once per 4096 calls. */
__attribute__((noinline)) unsigned long read_clock(double seconds)
{
    struct timespec now, cpu;
    unsigned long calls = 0;
    do {
        for (int i = 0; i < 4096; i++, calls++)
            clock_gettime(CLOCK_MONOTONIC, &now);
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    } while (cpu.tv_sec + cpu.tv_nsec / 1e9 < seconds);
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
