"""Probes stage: typed, immutable events decoded from perf-buffer records, and their decoders.

The decoders run inside the perf-buffer callbacks: they copy every field out of the ctypes view
(the view points into the ring buffer and is reused as soon as the callback returns) and reject
records that are too short or carry impossible values with `MalformedRecord`, which the reader counts.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass

from agent.probes.records import (
    PROC_EVENT_EXEC,
    PROC_EVENT_NEW,
    SAMPLE_FLAG_KERNEL_THREAD,
    CpuSampleRecord,
    ProcEventRecord,
)


class MalformedRecord(ValueError):
    """A perf-buffer record that cannot be what the BPF program sends."""


class ProcessEventKind(enum.IntEnum):
    NEW = PROC_EVENT_NEW
    EXEC = PROC_EVENT_EXEC


@dataclass(frozen=True, slots=True)
class StackEvent:
    """One sampled event of any profiler: who, where (stack ids), when, and what it is worth."""

    profiler: str
    timestamp_ns: int
    pid: int
    tid: int
    cpu: int
    user_stack_id: int
    kernel_stack_id: int
    stack_gen: int
    kernel_thread: bool
    comm: str
    values: tuple[int, ...]  # aligned with the profiler's ProfileSpec.sample_types


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


def _view(data: int, size: int, record_type: type[ctypes.Structure]) -> ctypes.Structure:
    if size < ctypes.sizeof(record_type):
        raise MalformedRecord(f"{record_type.__name__}: {size} bytes, expected {ctypes.sizeof(record_type)}")
    return ctypes.cast(data, ctypes.POINTER(record_type)).contents


def decode_cpu_sample(data: int, size: int, values: tuple[int, ...]) -> StackEvent:
    """A CPU sample; every sample is worth the same `values` (one sample, one period of CPU time)."""
    record = _view(data, size, CpuSampleRecord)
    stack_gen = record.stack_gen
    if stack_gen not in (0, 1):
        raise MalformedRecord(f"cpu_sample: stack generation {stack_gen}")
    return StackEvent(
        profiler="cpu",
        timestamp_ns=record.timestamp_ns,
        pid=record.pid,
        tid=record.tid,
        cpu=record.cpu,
        user_stack_id=record.user_stack_id,
        kernel_stack_id=record.kernel_stack_id,
        stack_gen=stack_gen,
        kernel_thread=bool(record.flags & SAMPLE_FLAG_KERNEL_THREAD),
        comm=bytes(record.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
        values=values,
    )


def decode_proc_event(data: int, size: int) -> ProcessEvent:
    record = _view(data, size, ProcEventRecord)
    try:
        kind = ProcessEventKind(record.kind)
    except ValueError:
        raise MalformedRecord(f"proc_event: kind {record.kind}") from None
    return ProcessEvent(timestamp_ns=record.timestamp_ns, pid=record.pid, kind=kind)
