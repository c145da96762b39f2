"""What the Python workloads share: the start gate and the truth file. Runs under every interpreter the
tests use (3.10 and later), so it uses nothing newer; it imports only the standard library."""

import json
import os
import sys
from typing import Any


def gate(argv: list[str]) -> None:
    """With "gate" among the arguments, say "ready" on stdout (the interpreter is initialized: py-spy can
    attach) and wait for one byte on stdin before starting, so that the profilers attach first; then
    say "started"."""
    if "gate" in argv:
        print("ready", flush=True)
        sys.stdin.read(1)
    print("started", flush=True)


def write_truth(path: str, truth: dict[str, Any]) -> None:
    """The workload's own measurements, as one JSON object, renamed into place whole."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump({"pid": os.getpid(), "version": list(sys.version_info[:3]), **truth}, f)
    os.replace(temporary, path)
