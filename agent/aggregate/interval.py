"""Aggregate stage: sums one profiler's events per reporting interval.

Owns the table of (pid, tid, cpu, kernel stack, user stack, Python frames) -> values and timestamps for
the interval in progress. `finish()` hands the finished interval out as an immutable `IntervalProfile` and starts
the next one; the aggregator never symbolizes and never calls downstream.

The table is keyed on each event's identity where the probe gave one (the record's bytes, whose hash
Python computes once per object, as the decoder shares one object per distinct record), so an event
costs a dict lookup and two appends; the sample keys are built once per entry and the values summed
once per interval.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass
from functools import reduce
from operator import add, itemgetter
from typing import NamedTuple, Protocol

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.types import NO_INTERPRETER_STACK, InterpreterStack, ProfileSpec, Stack


class EventLike(Protocol):
    """What the aggregator reads of an event (`agent.probes.events.StackEvent` is one)."""

    @property
    def pid(self) -> int: ...
    @property
    def tid(self) -> int: ...
    @property
    def cpu(self) -> int: ...
    @property
    def kernel(self) -> Stack: ...
    @property
    def comm(self) -> str: ...
    @property
    def values(self) -> tuple[float, ...]: ...
    @property
    def timestamp_ns(self) -> int: ...
    @property
    def python(self) -> InterpreterStack: ...


class _Fields(NamedTuple):
    pid: int
    tid: int
    cpu: int
    kernel: Stack
    comm: str
    values: tuple[float, ...]
    timestamp_ns: int
    python: InterpreterStack


@dataclass(slots=True)
class _Entry:
    key: SampleKey
    thread_name: str
    values: list[tuple[float, ...]]  # every event's, summed (and rounded) once, when the interval ends
    timestamps: list[int]
    last: int  # the event count when this entry last grew: of two entries of one key, the later names it


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
        # By the event's identity, or by (pid, tid, cpu, kernel, user) for an event without one.
        self._entries: dict[Hashable, _Entry] = {}
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
        python: InterpreterStack = NO_INTERPRETER_STACK,
    ) -> None:
        self.add_event(_Fields(pid, tid, cpu, kernel, thread_name, values, timestamp_ns, python), user)

    def add_event(self, event: EventLike, user: Stack, identity: Hashable | None = None) -> None:
        """Sum one event with user stack `user` into its sample.

        `identity`, when given, must be equal for two events only if their pid, tid, cpu, stacks (Python
        frames included) and comm are (as `StackEvent.identity` is): it is then the table's key, which is far cheaper to
        look up than the stacks. Events of one sample may arrive under several identities (e.g. before
        and after the thread renamed itself): `finish` merges them."""
        self.events = seq = self.events + 1
        key = (event.pid, event.tid, event.cpu, event.kernel, user, event.python) if identity is None else identity
        entry = self._entries.get(key)
        if entry is None:
            sample_key = SampleKey(event.pid, event.tid, event.cpu, event.kernel, user, event.python)
            self._entries[key] = _Entry(sample_key, event.comm, [event.values], [event.timestamp_ns], seq)
            return
        entry.values.append(event.values)
        entry.timestamps.append(event.timestamp_ns)
        entry.last = seq
        if identity is None:
            entry.thread_name = event.comm  # a thread may rename itself; keep the latest

    def __len__(self) -> int:
        """Entries so far (a sample that arrived under several identities counts once for each)."""
        return len(self._entries)

    def finish(self, end_mono_ns: int) -> IntervalProfile:
        """The interval that ends now, and a fresh one starting where it ended."""
        entries: dict[SampleKey, _Entry] = {}
        for entry in self._entries.values():
            first = entries.setdefault(entry.key, entry)
            if first is not entry:
                entries[entry.key] = _merged(first, entry)
        samples = tuple(
            AggregatedSample(key, entry.thread_name, _summed(entry.values), tuple(sorted(entry.timestamps)))
            for key, entry in entries.items()
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


def _summed(values: list[tuple[float, ...]]) -> tuple[int, ...]:
    """Column sums in arrival order (as a running total would add them), rounded."""
    first = values[0]
    if all(type(v) is int for v in first) and values.count(first) == len(values):
        return tuple(round(v) * len(values) for v in first)  # e.g. CPU samples, all one period: exact
    return tuple(round(reduce(add, map(itemgetter(i), values))) for i in range(len(first)))


def _merged(first: _Entry, second: _Entry) -> _Entry:
    latest = second if second.last > first.last else first
    timestamps = first.timestamps + second.timestamps
    return _Entry(first.key, latest.thread_name, first.values + second.values, timestamps, latest.last)
