"""Benchmark helper: the kernel's own accounting of BPF program runs (`kernel.bpf_stats_enabled`).

With the sysctl on, the kernel counts every run of every BPF program and the nanoseconds spent in it;
`/proc/PID/fdinfo/FD` of a program's fd shows both (`run_cnt`, `run_time_ns`). A tail call runs inside
the run of the program that made it, so the entry program's figures include the programs it chains
to. BPF programs run in the context of the task they interrupt or trace: this is cost to the profiled
host that the agent's own CPU time does not show.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
PROG_LINK = "anon_inode:bpf-prog"
PERF_EVENT_PROG_TYPE = 7  # BPF_PROG_TYPE_PERF_EVENT: the CPU samplers


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the duration, restored after."""
    before = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1")
    try:
        yield
    finally:
        BPF_STATS.write_text(before)


@dataclass(frozen=True, slots=True)
class ProgStats:
    """Runs and nanoseconds, summed over some BPF programs; subtract two readings for a window."""

    run_ns: int = 0
    runs: int = 0

    def __add__(self, other: ProgStats) -> ProgStats:
        return ProgStats(self.run_ns + other.run_ns, self.runs + other.runs)

    def __sub__(self, other: ProgStats) -> ProgStats:
        return ProgStats(self.run_ns - other.run_ns, self.runs - other.runs)

    @property
    def ns_per_run(self) -> float:
        return self.run_ns / self.runs if self.runs > 0 else float("nan")


def prog_stats_by_type(pid: int) -> dict[int, ProgStats]:
    """The programs `pid` holds open, summed by program type, each program counted once (one scan)."""
    found: dict[int, ProgStats] = {}
    seen: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) != PROG_LINK:
                continue
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed since the listing
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}
        prog_id = fields.get("prog_id", fd)
        if prog_id in seen:
            continue
        seen.add(prog_id)
        prog_type = int(fields.get("prog_type", "-1"))
        one = ProgStats(int(fields.get("run_time_ns", "0")), int(fields.get("run_cnt", "0")))
        found[prog_type] = found.get(prog_type, ProgStats()) + one
    return found


def perf_events(by_type: dict[int, ProgStats]) -> ProgStats:
    """The perf-event programs (the CPU samplers) of a `prog_stats_by_type` reading."""
    return by_type.get(PERF_EVENT_PROG_TYPE, ProgStats())


def prog_stats(pid: int) -> ProgStats:
    """The perf-event programs `pid` holds open."""
    return perf_events(prog_stats_by_type(pid))


def every_type(by_type: dict[int, ProgStats]) -> ProgStats:
    """The sum over every program type of a `prog_stats_by_type` reading."""
    return sum(by_type.values(), ProgStats())
