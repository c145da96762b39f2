/* Not an interpreter: a program that looks like CPython to a symbol reader, for the bad-input test.
 * Built as `python3.12` or `python3.13` with -rdynamic, it exports Py_Version (FAKE_MINOR), _PyRuntime,
 * PyCode_Type and PyGILState_GetThisThreadState, whose code loads a TSS key from inside _PyRuntime as
 * CPython's does. _PyRuntime holds random bytes (for 3.13: after the `xdebugpy` cookie, so the debug
 * offsets themselves are garbage). It then burns CPU in spin_fake for SECONDS: its stacks must stay
 * native, and the process be counted as not enabled, never given Python names.
 * Usage: python3.1x SECONDS */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef FAKE_MINOR
#define FAKE_MINOR 12
#endif

const unsigned long Py_Version = (3UL << 24) | ((unsigned long)FAKE_MINOR << 16) | (1UL << 8) | 0xF0;
unsigned char _PyRuntime[1 << 16];
unsigned char PyCode_Type[512];

void *PyGILState_GetThisThreadState(void) {
    return pthread_getspecific(*(pthread_key_t *)&_PyRuntime[0x248]);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) uint64_t spin_fake(double seconds) {
    uint64_t acc = 1;
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 100000; i++)
            acc = acc * 6364136223846793005ULL + 1442695040888963407ULL;
    return acc;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 3.0;
    uint64_t x = 0x9E3779B97F4A7C15ULL ^ (uint64_t)now();
    for (size_t i = 0; i < sizeof _PyRuntime; i++) {  /* xorshift: garbage, different every run */
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        _PyRuntime[i] = (unsigned char)x;
    }
    if (FAKE_MINOR >= 13)
        memcpy(_PyRuntime, "xdebugpy", 8);
    memset(PyCode_Type, 0xA5, sizeof PyCode_Type);
    printf("spin=%llu\n", (unsigned long long)spin_fake(seconds));
    return 0;
}
