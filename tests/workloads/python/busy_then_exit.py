"""Burns SECONDS of CPU time in `burn_until_exit` and exits at once (os._exit: no interpreter teardown), so
the last sample is taken within milliseconds of the exit and the agent must have named its code objects
while the process was alive. CPU seconds, not wall seconds: beside a CPU hog the process gets a third
of a core, and a wall-clock burn would leave it a handful of samples.

Usage: pythonX.Y busy_then_exit.py SECONDS TRUTH_FILE [gate]
"""

import os
import sys
import time

from workload_common import gate, write_truth


def burn_until_exit(seconds: float) -> float:
    begun = time.thread_time()
    acc = 0
    while time.thread_time() - begun < seconds:
        for i in range(1000):
            acc = (acc * 31 + i) % 1000003  # hot
    return time.thread_time() - begun


def main() -> None:
    seconds, truth_path = float(sys.argv[1]), sys.argv[2]
    gate(sys.argv[3:])
    write_truth(truth_path, {"cpu_s": burn_until_exit(seconds)})
    os._exit(0)


if __name__ == "__main__":
    main()
