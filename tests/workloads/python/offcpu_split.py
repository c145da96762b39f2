"""Off-CPU split: two functions block 2:1, each measuring its own blocked time.

Usage: pythonX.Y offcpu_split.py SECONDS THREADS SLICE_MS TRUTH_FILE [gate] [hold]

Each of THREADS threads alternates `wait_a`, which sleeps two slices, and `wait_b`, which sleeps one,
for SECONDS. time.sleep releases the GIL and blocks in clock_nanosleep: the thread is off-CPU with its
Python frames (wait_x <- worker <- Thread.run ...) on its stack. Each function times its own sleep with
time.monotonic_ns (a late wake-up on a busy host lengthens both alike) and the totals go to TRUTH_FILE,
in nanoseconds, with the number of blocks.
"""

import sys
import threading
import time

from workload_common import gate, hold, write_truth

totals = {"wait_a": 0, "wait_b": 0, "blocks": 0}
lock = threading.Lock()


def wait_a(slice_s: float) -> int:
    begun = time.monotonic_ns()
    time.sleep(2 * slice_s)
    return time.monotonic_ns() - begun


def wait_b(slice_s: float) -> int:
    begun = time.monotonic_ns()
    time.sleep(slice_s)
    return time.monotonic_ns() - begun


def worker(seconds: float, slice_s: float) -> None:
    a = b = blocks = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a += wait_a(slice_s)
        b += wait_b(slice_s)
        blocks += 2
    with lock:
        totals["wait_a"] += a
        totals["wait_b"] += b
        totals["blocks"] += blocks


def main() -> None:
    seconds, threads, slice_s, truth_path = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1e3, sys.argv[4]
    gate(sys.argv[5:])
    workers = [threading.Thread(target=worker, args=(seconds, slice_s)) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    write_truth(truth_path, {"ns": totals})
    hold(sys.argv[5:])


if __name__ == "__main__":
    main()
