"""A steady Python CPU load: `Steady.step` runs until SECONDS have passed (0: until killed).

Usage: pythonX.Y steady.py SECONDS TRUTH_FILE [gate]   (TRUTH_FILE "-": none)

For the lifecycle and container tests (a process started before or after the agent, or in its own pid
namespace) and the benchmark's Python scenario: what is on CPU is known (Steady.step, and its hot line).
With a TRUTH_FILE it writes the CPU seconds spent in Steady.step (time.thread_time around the calls).
"""

import sys
import time

from workload_common import gate, write_truth


class Steady:
    def step(self, n: int) -> int:
        acc = 0
        for i in range(n):
            acc = (acc * 1103515245 + i) % 2147483647  # hot
        return acc


def main() -> None:
    seconds, truth_path = float(sys.argv[1]), sys.argv[2]
    gate(sys.argv[3:])
    end = time.monotonic() + seconds if seconds > 0 else float("inf")
    steady = Steady()
    begun = time.thread_time()
    while time.monotonic() < end:
        steady.step(20_000)
    if truth_path != "-":
        write_truth(truth_path, {"cpu_s": time.thread_time() - begun})


if __name__ == "__main__":
    main()
