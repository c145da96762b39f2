"""CPU workload in pure Python, for the distribution's interpreter (built without frame pointers): work()
runs for SECONDS of CPU time (0: until killed): CPU time, so the samples a test expects do not shrink
on a busy machine. Usage: python3 python_busy.py SECONDS [gate]   (with "gate" it
first waits for one byte on stdin). Shared by tests/bpf/test_unwinding.py and bench/unwind.py."""

import sys
import time


def work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def main() -> None:
    if sys.argv[2:] == ["gate"]:
        sys.stdin.read(1)
    seconds = float(sys.argv[1])
    end = time.process_time() + seconds if seconds > 0 else float("inf")
    while time.process_time() < end:
        work(10_000)


if __name__ == "__main__":
    main()
