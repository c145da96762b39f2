"""CPU split across four kinds of Python code, measuring its own CPU time per task.

Usage: pythonX.Y cpu_split.py CPU_SECONDS TRUTH_FILE [gate]

Rounds of four tasks, each sized (after a first calibration round) to take about the same CPU time:
- `Mixer.churn`, a method (its qualname differs from its name);
- `recurse`, a recursive function that works at every level;
- `squares`, a generator, consumed by `drain` through the built-in sum (C code between its frames);
- `compress`, whose time is in zlib's C code (a C extension called from Python).
It runs until the process has used CPU_SECONDS of CPU (not wall time, so a busy host gives the same
number of samples, only later), then writes the CPU seconds of each task (time.thread_time around each
call: the clock the kernel's CPU accounting keeps) and of the whole process to TRUTH_FILE, and the
wall seconds of each task (time.perf_counter around the same calls: what a sampler of a runnable
thread's wall time, py-spy, sees; it exceeds the CPU time by the time the thread waited for a CPU). The hot line
of each function is the one marked `# hot`: the tests find it by that comment.
"""

import sys
import time
import zlib
from collections.abc import Iterator

from workload_common import gate, write_truth

ROUND_S = 0.02  # CPU seconds per task and round
DATA = bytes((i * 7919 + i // 13) % 251 for i in range(1 << 16))  # compressible, not trivially


class Mixer:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def churn(self, n: int) -> int:
        acc = self.seed
        for i in range(n):
            acc = (acc * 1103515245 + i * 12345 + (acc >> 7)) % 2147483647  # hot
        return acc


def recurse(depth: int, n: int) -> int:
    total = 0
    for i in range(n):
        total += (i * i + depth * i + total) % 65521  # hot
    if depth > 0:
        total += recurse(depth - 1, n)
    return total


def squares(n: int) -> Iterator[int]:
    for i in range(n):
        yield (i * i + 3 * i + 7) % 10007  # hot


def drain(n: int) -> int:
    return sum(squares(n))


def compress(times: int) -> int:
    size = 0
    for _ in range(times):
        size += len(zlib.compress(DATA, 6))  # hot
    return size


def main() -> None:
    cpu_seconds, truth_path = float(sys.argv[1]), sys.argv[2]
    gate(sys.argv[3:])
    mixer = Mixer(17)
    # Work per task: a small first size, then scaled so that each task takes ROUND_S of CPU per round.
    tasks = {
        "churn": (lambda n: mixer.churn(n), 2000),
        "recurse": (lambda n: recurse(15, n), 100),
        "drain": (drain, 2000),
        "compress": (compress, 1),
    }
    spent = dict.fromkeys(tasks, 0.0)
    wall = dict.fromkeys(tasks, 0.0)
    sizes = {name: size for name, (_, size) in tasks.items()}
    start = time.process_time()
    while time.process_time() - start < cpu_seconds:
        for name, (task, _) in tasks.items():
            begun, begun_wall = time.thread_time(), time.perf_counter()
            task(sizes[name])
            took = time.thread_time() - begun
            wall[name] += time.perf_counter() - begun_wall
            spent[name] += took
            if took > 0:  # the next call's size, towards ROUND_S (at most 4x bigger at once)
                sizes[name] = max(1, int(sizes[name] * min(4.0, ROUND_S / took)))
    truth = {"tasks": spent, "wall": wall, "process_cpu_s": time.process_time() - start, "sizes": sizes}
    write_truth(truth_path, truth)


if __name__ == "__main__":
    main()
