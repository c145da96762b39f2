"""A 50-thread Python process: every thread burns CPU in its own Python function.

Usage: pythonX.Y many_threads.py THREADS SECONDS TRUTH_FILE [gate]

Each thread runs `spin_in_thread` for SECONDS (wall time; the GIL lets one run at a time), counting
and writes its native thread id (threading.get_native_id, the tid the kernel samples) and the CPU
seconds it spent there (time.thread_time).
"""

import sys
import threading
import time

from workload_common import gate, write_truth

tids: list[int] = []
cpu_s: list[float] = []
lock = threading.Lock()


def spin_in_thread(seconds: float) -> None:
    begun = time.thread_time()
    end = time.monotonic() + seconds
    acc = 0
    while time.monotonic() < end:
        for i in range(1000):
            acc = (acc * 31 + i) % 1000003  # hot
    with lock:
        tids.append(threading.get_native_id())
        cpu_s.append(time.thread_time() - begun)


def main() -> None:
    count, seconds, truth_path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    gate(sys.argv[4:])
    threads = [threading.Thread(target=spin_in_thread, args=(seconds,)) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    write_truth(truth_path, {"tids": tids, "cpu_s": sum(cpu_s)})


if __name__ == "__main__":
    main()
