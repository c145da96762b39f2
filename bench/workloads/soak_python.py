"""Soak load (`make soak`): a Python process that allocates, computes and sleeps, forever.

Each round allocates a few 1 MiB buffers (C-allocator calls, for the allocation profiler), spends a few
milliseconds in pure Python (CPU samples with Python frames) and sleeps 50 ms (off-CPU blocks). Runs until
killed.
"""

import time


def allocate_buffers() -> int:
    kept = [bytearray(1 << 20) for _ in range(4)]
    return sum(len(b) for b in kept)


def compute() -> int:
    return sum(i * i for i in range(20_000))


def sleep_a_while() -> None:
    time.sleep(0.05)


def main() -> None:
    while True:
        allocate_buffers()
        compute()
        sleep_a_while()


if __name__ == "__main__":
    main()
