"""Probes stage: typed, immutable events decoded from perf-buffer records, and their decoders.

The decoders run inside the perf-buffer callbacks: they copy every field out of the ctypes view
(the view points into the ring buffer and is reused as soon as the callback returns), turn the inline
stacks into `Stack`s, and reject records that are too short or carry impossible values with
`MalformedRecord`, which the reader counts.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.aggregate.types import Stack
from agent.probes.records import (
    MAX_STACK_DEPTH,
    PROC_EVENT_EXEC,
    PROC_EVENT_NEW,
    SAMPLE_FLAG_KERNEL_THREAD,
    STACK_EVENT_HEADER_SIZE,
    ProcEventRecord,
    StackEventRecord,
)
from agent.probes.stacks import StackDecoder

R = TypeVar("R", bound=ctypes.Structure)


class MalformedRecord(ValueError):
    """A perf-buffer record that cannot be what the BPF program sends."""


class ProcessEventKind(enum.IntEnum):
    NEW = PROC_EVENT_NEW
    EXEC = PROC_EVENT_EXEC


@dataclass(frozen=True, slots=True)
class StackEvent:
    """One sampled event of any profiler: who, where (both stacks), when, and what it is worth."""

    profiler: str
    timestamp_ns: int
    pid: int
    tid: int
    cpu: int
    kernel_thread: bool
    comm: str
    kernel: Stack
    user: Stack
    # Aligned with the profiler's ProfileSpec.sample_types; weighted estimates may be fractional.
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class ProcessEvent:
    timestamp_ns: int
    pid: int
    kind: ProcessEventKind


@dataclass(frozen=True, slots=True)
class IntervalMark:
    """Put in the event stream by the reader after draining the buffers: every event before it belongs
    to the interval that ends at `end_mono_ns`."""

    end_mono_ns: int
    final: bool = False


def _view(data: int, size: int, record_type: type[R], minimum: int | None = None) -> R:
    """A view of the record (valid only inside the callback), after checking enough bytes arrived."""
    needed = ctypes.sizeof(record_type) if minimum is None else minimum
    if size < needed:
        raise MalformedRecord(f"{record_type.__name__}: {size} bytes, expected at least {needed}")
    return ctypes.cast(data, ctypes.POINTER(record_type)).contents


ValuesOf = Callable[[StackEventRecord], tuple[float, ...]]


def decode_stack_event(data: int, size: int, stacks: StackDecoder, profiler: str, values_of: ValuesOf) -> StackEvent:
    """One profiler's record; `values_of` reads what the event is worth from the record's fixed part."""
    record = _view(data, size, StackEventRecord, STACK_EVENT_HEADER_SIZE)
    kernel_len, user_len = record.kernel_stack_len, record.user_stack_len
    if kernel_len > MAX_STACK_DEPTH or user_len > MAX_STACK_DEPTH:
        raise MalformedRecord(f"stack_event: stack lengths {kernel_len}/{user_len} exceed {MAX_STACK_DEPTH}")
    kernel_bytes, user_bytes = max(kernel_len, 0) * 8, max(user_len, 0) * 8
    if size < STACK_EVENT_HEADER_SIZE + kernel_bytes + user_bytes:
        raise MalformedRecord(f"stack_event: {size} bytes cannot hold {kernel_len}+{user_len} frames")
    raw = ctypes.string_at(data + STACK_EVENT_HEADER_SIZE, kernel_bytes + user_bytes)
    kernel_thread = bool(record.flags & SAMPLE_FLAG_KERNEL_THREAD)
    return StackEvent(
        profiler=profiler,
        timestamp_ns=record.timestamp_ns,
        pid=record.pid,
        tid=record.tid,
        cpu=record.cpu,
        kernel_thread=kernel_thread,
        comm=bytes(record.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
        kernel=stacks.decode(kernel_len, raw[:kernel_bytes], kernel=True),
        user=stacks.decode(user_len, raw[kernel_bytes:], kernel=False, kernel_thread=kernel_thread),
        values=values_of(record),
    )


def decode_proc_event(data: int, size: int) -> ProcessEvent:
    record = _view(data, size, ProcEventRecord)
    try:
        kind = ProcessEventKind(record.kind)
    except ValueError:
        raise MalformedRecord(f"proc_event: kind {record.kind}") from None
    return ProcessEvent(timestamp_ns=record.timestamp_ns, pid=record.pid, kind=kind)
