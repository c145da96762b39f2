"""What the Python workloads share: the start gate, the truth file and the hold at the end. Runs under
every interpreter the tests use (3.10 and later), so it uses nothing newer; it imports only the standard
library."""

import json
import os
import signal
import sys
import time
from typing import Any

POKE_S = 0.005  # a poke's sleep: longer than the off-CPU profiler's default minimum block (1 ms)


def gate(argv: list[str]) -> None:
    """With "gate" among the arguments, say "ready" on stdout (the interpreter is initialized: py-spy can
    attach) and wait for one byte on stdin before starting, so that the profilers attach first; then
    say "started". Each "p" read before the start is a poke instead: a short sleep (an off-CPU block,
    which a profiler reports, so that an agent which meets processes through their samples meets this
    one), then a stop (SIGSTOP) until continued, so that no wait of the gate is followed while the
    agent inspects the process; then "poked". Any other byte, or the end of stdin, starts."""
    if "gate" in argv:
        print("ready", flush=True)
        while sys.stdin.read(1) == "p":
            time.sleep(POKE_S)
            os.kill(os.getpid(), signal.SIGSTOP)
            print("poked", flush=True)
    print("started", flush=True)


def hold(argv: list[str]) -> None:
    """With "hold" among the arguments, stop (SIGSTOP) until continued: the process stays alive, neither
    running nor blocked (a stopped task is no off-CPU block), while the test collects its samples."""
    if "hold" in argv:
        os.kill(os.getpid(), signal.SIGSTOP)


def write_truth(path: str, truth: dict[str, Any]) -> None:
    """The workload's own measurements, as one JSON object, renamed into place whole."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump({"pid": os.getpid(), "version": list(sys.version_info[:3]), **truth}, f)
    os.replace(temporary, path)
