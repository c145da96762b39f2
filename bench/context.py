"""What every scenario is given: where to work, the built workloads, how many repetitions, the host."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROFILER_ORDER = ("cpu", "offcpu", "alloc")


def registered_profilers() -> tuple[str, ...]:
    """The profilers `--profilers` accepts in this tree (another engineer may not have registered one yet)."""
    from agent.probes.registry import PROBES

    return tuple(name for name in PROFILER_ORDER if name in PROBES)


@dataclass(frozen=True, slots=True)
class Context:
    work: Path  # scratch directory of this run
    binaries: dict[str, Path]
    reps: int
    cpus: int
    profilers: tuple[str, ...]
    cases: tuple[str, ...] = ()  # `--cases`: which cases of a scenario that has several (empty: all)

    def directory(self, *parts: str) -> Path:
        path = self.work.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


def online_cpus() -> int:
    return len(os.sched_getaffinity(0))
