"""Aggregate stage: sums one profiler's events per reporting interval.

Owns the table of (pid, tid, cpu, kernel stack, user stack) -> values and timestamps for the interval
in progress. `finish()` hands the finished interval out as an immutable `IntervalProfile` and starts
the next one; the aggregator never symbolizes and never calls downstream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.aggregate.types import AggregatedSample, IntervalProfile, ProfileSpec, SampleKey, Stack


@dataclass(slots=True)
class _Entry:
    values: list[float]  # weighted estimates are fractional; rounded once, when the interval ends
    thread_name: str
    timestamps: list[int] = field(default_factory=list)


def mono_to_unix_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now (bpf_ktime_get_ns() is CLOCK_MONOTONIC)."""
    before = time.monotonic_ns()
    unix = time.time_ns()
    after = time.monotonic_ns()
    return unix - (before + after) // 2


class IntervalAggregator:
    def __init__(self, spec: ProfileSpec, start_mono_ns: int | None = None) -> None:
        self.spec = spec
        self._start = time.monotonic_ns() if start_mono_ns is None else start_mono_ns
        self._entries: dict[SampleKey, _Entry] = {}
        self.events = 0

    def add(
        self,
        *,
        pid: int,
        tid: int,
        cpu: int,
        kernel: Stack,
        user: Stack,
        thread_name: str,
        values: tuple[float, ...],
        timestamp_ns: int,
    ) -> None:
        key = SampleKey(pid, tid, cpu, kernel, user)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(list(values), thread_name, [timestamp_ns])
        else:
            for i, value in enumerate(values):
                entry.values[i] += value
            entry.thread_name = thread_name  # a thread may rename itself; keep the latest
            entry.timestamps.append(timestamp_ns)
        self.events += 1

    def __len__(self) -> int:
        return len(self._entries)

    def finish(self, end_mono_ns: int) -> IntervalProfile:
        """The interval that ends now, and a fresh one starting where it ended."""
        samples = tuple(
            AggregatedSample(
                key, entry.thread_name, tuple(round(v) for v in entry.values), tuple(sorted(entry.timestamps))
            )
            for key, entry in self._entries.items()
        )
        # Events read after their interval ended (in flight at the drain) stretch it rather than
        # falling outside it: profile timestamps must lie inside the profile's window.
        latest = max((s.timestamps_mono_ns[-1] for s in samples), default=end_mono_ns - 1)
        earliest = min((s.timestamps_mono_ns[0] for s in samples), default=self._start)
        profile = IntervalProfile(
            spec=self.spec,
            start_mono_ns=min(self._start, earliest),
            end_mono_ns=max(end_mono_ns, latest + 1),
            mono_to_unix_offset_ns=mono_to_unix_offset_ns(),
            samples=samples,
        )
        self._start = profile.end_mono_ns
        self._entries = {}
        self.events = 0
        return profile
