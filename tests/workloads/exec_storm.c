/* Exec storm with a known population: short processes, each named by what it runs.
 *
 * Usage: exec_storm drive RATE SECONDS MS
 *        exec_storm child MS
 *
 * `drive` execs this binary as `child MS` RATE times a second for SECONDS, on a fixed schedule (a
 * spawn that starts more than one period after its slot is counted late), and reaps the children as
 * they exit. Each child spends MS ms of its own CPU time in storm_work, which calls libc's exported
 * rand_r in a loop (so a sample's leaf is in this binary or in libc, under storm_work), then exits.
 * At exit `drive` prints `spawned=N reaped=N failed=N late=N child_cpu_s=X`, the last from the
 * children's rusage: the CPU time the storm really took.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double cpu_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double mono_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

__attribute__((noinline)) static unsigned storm_work(double seconds)
{
    unsigned seed = 1, sum = 0;
    double end = cpu_now() + seconds;
    while (cpu_now() < end) {
        for (int i = 0; i < 2000; i++) {
            sum += (unsigned)rand_r(&seed);
            sum ^= sum << 7; /* some work of its own between the library calls */
        }
    }
    return sum;
}

static void sleep_until(double when)
{
    struct timespec t = {.tv_sec = (time_t)when, .tv_nsec = (long)((when - (double)(time_t)when) * 1e9)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

static long reap(int options)
{
    long reaped = 0;
    int status;
    while (waitpid(-1, &status, options) > 0)
        reaped++;
    return reaped;
}

static int drive(double rate, double seconds, const char *ms)
{
    long spawned = 0, reaped = 0, failed = 0, late = 0;
    double period = 1.0 / rate, start = mono_now();
    long slots = (long)(rate * seconds + 0.5); /* counted, not compared in floating point: exactly this many */
    /* The file itself, not /proc/self/exe: the children's comm is taken from the name exec'd. */
    char self[4096];
    ssize_t length = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (length <= 0)
        return 1;
    self[length] = 0;
    char *argv[] = {self, "child", (char *)ms, NULL};
    for (long slot = 0; slot < slots; slot++) {
        pid_t pid;
        if (posix_spawn(&pid, self, NULL, NULL, argv, environ) == 0)
            spawned++;
        else
            failed++;
        reaped += reap(WNOHANG);
        double due = start + (double)(slot + 1) * period;
        double now = mono_now();
        if (now > due + period)
            late++;
        sleep_until(due);
    }
    reaped += reap(0);
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    double child_cpu = (double)usage.ru_utime.tv_sec + (double)usage.ru_utime.tv_usec / 1e6 +
                       (double)usage.ru_stime.tv_sec + (double)usage.ru_stime.tv_usec / 1e6;
    printf("spawned=%ld reaped=%ld failed=%ld late=%ld child_cpu_s=%.3f\n", spawned, reaped, failed, late, child_cpu);
    return failed ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "child") == 0) {
        volatile unsigned sink = storm_work(atof(argv[2]) / 1000.0);
        (void)sink;
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "drive") == 0 && atof(argv[2]) > 0)
        return drive(atof(argv[2]), atof(argv[3]), argv[4]);
    fprintf(stderr, "usage: %s drive RATE SECONDS MS | child MS\n", argv[0]);
    return 2;
}
