"""Records produced by the aggregate stage and consumed by the symbolize stage.

An `IntervalProfile` is one profiler's data for one reporting interval: unique
(pid, tid, cpu, kernel stack, user stack) keys with summed values and the monotonic timestamps of
the events that made them. Stacks are still raw instruction pointers here; naming them is the
symbolize stage's job.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class StackStatus(enum.IntEnum):
    """What the kernel said about one stack of one event."""

    OK = 0
    MISSING = 1  # bpf_get_stack returned -EFAULT for a task that has user space: no stack could be walked
    ERROR = 2  # any other negative result
    TRUNCATED = 3  # the walk hit the kernel's depth limit; callers beyond it are gone
    NOT_COLLECTED = 4  # no such stack (a user-mode sample's kernel stack, a kernel thread's user stack)


@dataclass(frozen=True, slots=True)
class Stack:
    """One captured stack, leaf first. Callers' entries are return addresses, as the kernel walked them."""

    status: StackStatus
    addresses: tuple[int, ...] = ()
    # Hashed once: stacks are dictionary keys at every stage (aggregation, symbolization), and a
    # generated __hash__ would hash every address again on each lookup.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.status, self.addresses)))

    def __hash__(self) -> int:
        return self._hash


EMPTY_STACK = Stack(StackStatus.NOT_COLLECTED)


@dataclass(frozen=True, slots=True)
class ValueType:
    """A pprof/OTLP (type, unit) pair such as ("cpu", "nanoseconds")."""

    type: str
    unit: str


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """What one profiler's samples mean: names the values and the sampling period."""

    name: str  # "cpu", "alloc", "offcpu": also the file prefix
    sample_types: tuple[ValueType, ...]
    period_type: ValueType
    period: int


@dataclass(frozen=True, slots=True)
class SampleKey:
    pid: int
    tid: int
    cpu: int
    kernel: Stack
    user: Stack


@dataclass(frozen=True, slots=True)
class AggregatedSample:
    key: SampleKey
    thread_name: str  # the thread's comm as the kernel saw it at the last event
    values: tuple[int, ...]  # aligned with ProfileSpec.sample_types
    timestamps_mono_ns: tuple[int, ...]  # CLOCK_MONOTONIC of each event, ascending


@dataclass(frozen=True, slots=True)
class IntervalProfile:
    spec: ProfileSpec
    start_mono_ns: int
    end_mono_ns: int
    # CLOCK_REALTIME - CLOCK_MONOTONIC at the interval end, to turn event timestamps into Unix time.
    mono_to_unix_offset_ns: int
    samples: tuple[AggregatedSample, ...]
