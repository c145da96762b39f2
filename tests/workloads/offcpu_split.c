/* Off-CPU workload with a known truth: every thread alternates between two functions that block in
 * clock_nanosleep, wait_a for two slices and wait_b for one (2:1 in blocked time). The syscall is
 * issued inline, with no libc frame in between: Debian's libc has no frame pointers, so a walk from
 * inside it would lose wait_a and its callers. Each function measures the time it really spent in the
 * syscall with CLOCK_MONOTONIC around it; on exit the program prints the totals,
 * "wait_a=<s> wait_b=<s> blocks=<n>", the truth tests compare profiles with.
 * Usage: offcpu_split SECONDS THREADS [SLICE_US [gate|go [libc]]]   (slice 4000 us by default)
 * With "gate" it first waits for one byte on stdin, so a test can start profiling it by pid before
 * it begins. With "libc" the functions sleep through libc's nanosleep() instead, as real programs
 * do: then the user stack starts inside libc, and only unwinding with CFI finds wait_a and wait_b.
 * With OFFCPU_SPLIT_DURATIONS=FILE in the environment it also writes every block it measured to FILE,
 * one "a|b <ns> <preempted>" line each: a requested sleep can last far longer on a busy host, and a
 * test of a duration threshold needs each block's real length, not the slice it asked for. <preempted>
 * is 1 when the thread was also preempted (an involuntary switch, counted by RUSAGE_THREAD) within
 * the measured time: then the measurement holds run-queue time that is no part of the block. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>

static double spent_a, spent_b;
static long blocks;
static FILE *durations; /* OFFCPU_SPLIT_DURATIONS, or none */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* A system call without libc: inlined, so while the thread sleeps in it the user stack the kernel
 * sees starts in the calling function itself. */
static inline __attribute__((always_inline)) long syscall4(long nr, long a, long b, long c, long d)
{
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(nr), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return ret;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = nr;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
#else
#error "offcpu_split issues its system calls inline on x86_64 and aarch64 only"
#endif
}

static int through_libc;

static inline __attribute__((always_inline)) void sleep_inline(const struct timespec *ts)
{
    if (through_libc)
        nanosleep(ts, 0);
    else
        syscall4(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, (long)ts, 0);
}

__attribute__((noinline)) double wait_a(long slice_ns)
{
    struct timespec ts = {.tv_sec = 2 * slice_ns / 1000000000L, .tv_nsec = 2 * slice_ns % 1000000000L};
    double start = wall();
    sleep_inline(&ts);
    return wall() - start;
}

__attribute__((noinline)) double wait_b(long slice_ns)
{
    struct timespec ts = {.tv_sec = slice_ns / 1000000000L, .tv_nsec = slice_ns % 1000000000L};
    double start = wall();
    sleep_inline(&ts);
    return wall() - start;
}

static double seconds;
static long slice_ns;

/* Each thread keeps its blocks in memory, allocated and touched before it starts (no I/O, no page fault
 * between the sleeps), and main writes them all after the joins: no thread blocks on another for them. */
struct block {
    char function;
    long ns;
    int preempted;
};

#define MAX_THREADS 4096 /* a thousands-of-threads host, e.g. #17's 2,000 blocked at once */
#define THREAD_STACK (256 * 1024)

static struct kept {
    struct block *blocks;
    long n, room;
} kept_by[MAX_THREADS];

/* This thread's involuntary context switches so far (0 when no durations are kept: no extra syscalls). */
static long preemptions(void)
{
    struct rusage usage;
    if (!durations || getrusage(RUSAGE_THREAD, &usage))
        return 0;
    return usage.ru_nivcsw;
}

static void record(struct kept *kept, char function, double spent, int preempted)
{
    if (kept->blocks && kept->n >= kept->room) {
        fprintf(stderr, "offcpu_split: more blocks than room for them\n");
        exit(1);
    }
    if (kept->blocks)
        kept->blocks[kept->n] = (struct block){function, (long)(spent * 1e9), preempted};
    kept->n++;
}

static void *worker(void *arg)
{
    struct kept *kept = arg;
    if (durations) {
        /* A pair of blocks takes at least three slices. */
        kept->room = 2 * (long)(seconds * 1e9 / (3.0 * slice_ns) + 2);
        kept->blocks = calloc(kept->room, sizeof *kept->blocks);
        if (!kept->blocks) {
            perror("calloc");
            exit(1);
        }
        memset(kept->blocks, 1, kept->room * sizeof *kept->blocks);
    }
    double end = wall() + seconds, a = 0, b = 0;
    long mark = preemptions(), now;
    while (wall() < end) {
        double spent = wait_a(slice_ns);
        now = preemptions();
        record(kept, 'a', spent, now != mark);
        a += spent;
        mark = now;
        spent = wait_b(slice_ns);
        now = preemptions();
        record(kept, 'b', spent, now != mark);
        b += spent;
        mark = now;
    }
    pthread_mutex_lock(&lock);
    spent_a += a;
    spent_b += b;
    blocks += kept->n;
    pthread_mutex_unlock(&lock);
    return arg;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 3;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    if (threads < 1 || threads > MAX_THREADS) {
        fprintf(stderr, "offcpu_split: THREADS must be 1 to %d, not %d\n", MAX_THREADS, threads);
        return 2;
    }
    slice_ns = (argc > 3 ? atol(argv[3]) : 4000) * 1000L;
    if (argc > 4 && !strcmp(argv[4], "gate")) {
        char go;
        syscall4(SYS_read, 0, (long)&go, 1, 0);
    }
    through_libc = argc > 5 && !strcmp(argv[5], "libc");
    const char *path = getenv("OFFCPU_SPLIT_DURATIONS");
    if (path && !(durations = fopen(path, "w"))) {
        perror(path);
        return 1;
    }
    static pthread_t ids[MAX_THREADS];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, THREAD_STACK);
    for (int i = 1; i < threads; i++)
        if (pthread_create(&ids[i], &attr, worker, &kept_by[i])) {
            fprintf(stderr, "offcpu_split: cannot create thread %d\n", i);
            return 1;
        }
    worker(&kept_by[0]);
    for (int i = 1; i < threads; i++)
        pthread_join(ids[i], 0);
    for (int i = 0; durations && i < threads; i++)
        for (long j = 0; j < kept_by[i].n; j++) {
            struct block *block = &kept_by[i].blocks[j];
            fprintf(durations, "%c %ld %d\n", block->function, block->ns, block->preempted);
        }
    if (durations && fclose(durations)) {
        perror(path);
        return 1;
    }
    printf("wait_a=%.6f wait_b=%.6f blocks=%ld\n", spent_a, spent_b, blocks);
    return 0;
}
