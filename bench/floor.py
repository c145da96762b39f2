"""Benchmark helper: the kernel's floor for target slowdown, probes that do nothing but count.

`python -m bench.floor uprobe --pid PID` attaches uprobes to the same C-library entry points the
allocation profiler hooks (malloc, calloc, realloc, posix_memalign, aligned_alloc) of one process;
`python -m bench.floor tracepoint` attaches to `sched:sched_switch`, the off-CPU profiler's hook on a
kernel without kprobes. Each program increments a per-CPU counter and returns: what is left of a
probe's cost once a profiler does no work in it. Prints `ready` once attached, runs until SIGINT or
SIGTERM, then prints `count=<n>`.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import threading
from types import FrameType
from typing import Any

PROGRAM = """
BPF_PERCPU_ARRAY(counts, u64, 1);

int count_event(void *ctx)
{
    int zero = 0;
    u64 *value = counts.lookup(&zero);
    if (value)
        *value += 1;
    return 0;
}
"""
ALLOC_SYMBOLS = ("malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc")
TRACEPOINT = b"sched:sched_switch"


def attach(bpf: Any, kind: str, pid: int) -> None:
    """`bpf` is a bcc.BPF (untyped)."""
    if kind == "uprobe":
        for symbol in ALLOC_SYMBOLS:
            bpf.attach_uprobe(name=b"c", sym=symbol.encode(), fn_name=b"count_event", pid=pid)
    else:
        bpf.attach_tracepoint(tp=TRACEPOINT, fn_name=b"count_event")


def total(bpf: Any) -> int:
    return sum(int(value) for value in bpf[b"counts"][ctypes.c_int(0)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("uprobe", "tracepoint"))
    parser.add_argument("--pid", type=int, default=-1, help="uprobes: only this process")
    args = parser.parse_args(argv)
    from bcc import BPF

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    bpf = BPF(text=PROGRAM)
    attach(bpf, args.kind, args.pid)
    print("ready", flush=True)
    while not stop.wait(1.0):
        pass
    print(f"count={total(bpf)}", flush=True)
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
