"""Base module: the value types every stage shares, from the probes to the exporters.

This module owns `Stack` (one captured stack of raw addresses, with the kernel's `StackStatus`),
`EMPTY_STACK`, `ValueType` and `ProfileSpec` (what one profiler's sample values mean). The probes make
stacks and declare specs, the unwind stage replaces user stacks, and the aggregate, symbolize, pprof
and export stages read both; keeping them here, upstream of every stage, lets each import them without
importing a stage downstream of itself (see tests/unit/test_layering.py).
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
