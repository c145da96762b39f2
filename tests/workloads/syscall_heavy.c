/* Spends its time in the kernel: reads /dev/zero in 64 KiB chunks (the kernel zeroes user memory) for SECONDS, so CPU samples carry
 * kernel stacks (read_zero, clear_user...) under user frames (spin_reads -> main). Usage: syscall_heavy SECONDS */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static char buffer[65536];

/* The syscall instruction inline, so the sampled user PC is in this binary's frame-pointer code
 * rather than in libc's syscall() (Debian's libc has no frame pointers). */
static inline long raw_read(int fd, void *buf, unsigned long len)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(SYS_read), "D"(fd), "S"(buf), "d"(len) : "rcx", "r11", "memory");
    return ret;
}

__attribute__((noinline)) void spin_reads(int fd, double seconds)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int i = 0; i < 100; i++)
            raw_read(fd, buffer, sizeof(buffer));
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
}

int main(int argc, char **argv)
{
    int fd = open("/dev/zero", O_RDONLY);
    spin_reads(fd, argc > 1 ? atof(argv[1]) : 5);
    return 0;
}
