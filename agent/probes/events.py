"""Probes stage: typed, immutable events decoded from perf-buffer records, and their decoders.

The decoders run inside the perf-buffer callbacks: they copy every field out of the ctypes view
(the view points into the ring buffer and is reused as soon as the callback returns), turn the inline
stacks into `Stack`s, and reject records that are too short or carry impossible values with
`MalformedRecord`, which the reader counts.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from agent.aggregate.types import Stack
from agent.probes.records import (
    MAX_STACK_DEPTH,
    PROC_EVENT_EXEC,
    PROC_EVENT_NEW,
    SAMPLE_FLAG_KERNEL_THREAD,
    STACK_EVENT_HEADER_SIZE,
    USER_STACK_OFFSET,
    ProcEventRecord,
)
from agent.probes.stacks import StackDecoder

R = TypeVar("R", bound=ctypes.Structure)


class MalformedRecord(ValueError):
    """A perf-buffer record that cannot be what the BPF program sends."""


class ProcessEventKind(enum.IntEnum):
    NEW = PROC_EVENT_NEW
    EXEC = PROC_EVENT_EXEC


class UserStackCopy(NamedTuple):
    """The user registers at the event and a copy of the stack's top, for unwinding with CFI.

    `data` holds the memory from address `base` (the stack pointer rounded down to a chunk) upward."""

    ip: int
    sp: int
    bp: int
    base: int
    data: bytes


class StackEvent(NamedTuple):
    """One sampled event of any profiler: who, where (both stacks), when, and what it is worth.

    A NamedTuple: one is built per record on the reader's hot path, and tuples are several times
    cheaper to make than frozen dataclasses."""

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
    # Only from programs built to copy the user stack (DWARF unwinding): the unwind stage replaces
    # `user` with the stack it unwinds from this, then drops it.
    user_copy: UserStackCopy | None = None


class RecordHeader(NamedTuple):
    """The fixed part of a `struct stack_event`, unpacked in one call (what `values_of` reads)."""

    timestamp_ns: int
    value: int
    sampling: int
    pid: int
    tid: int
    cpu: int
    flags: int
    kernel_stack_len: int
    user_stack_len: int
    comm: bytes
    user_ip: int
    user_sp: int
    user_bp: int
    user_stack_base: int
    user_stack_bytes: int


# Field for field the layout of StackEventRecord up to `ips` (the layout test checks the mirror).
_HEADER = struct.Struct("<QQQIIIIii16sQQQQI4x")
assert _HEADER.size == STACK_EVENT_HEADER_SIZE


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


ValuesOf = Callable[[RecordHeader], tuple[float, ...]]


def decode_stack_event(data: int, size: int, stacks: StackDecoder, profiler: str, values_of: ValuesOf) -> StackEvent:
    """One profiler's record; `values_of` reads what the event is worth from the record's fixed part."""
    if size < STACK_EVENT_HEADER_SIZE:
        raise MalformedRecord(f"StackEventRecord: {size} bytes, expected at least {STACK_EVENT_HEADER_SIZE}")
    raw = ctypes.string_at(data, size)  # one copy out of the ring buffer; everything below reads it
    header = RecordHeader._make(_HEADER.unpack_from(raw))
    kernel_len, user_len = header.kernel_stack_len, header.user_stack_len
    if kernel_len > MAX_STACK_DEPTH or user_len > MAX_STACK_DEPTH:
        raise MalformedRecord(f"stack_event: stack lengths {kernel_len}/{user_len} exceed {MAX_STACK_DEPTH}")
    kernel_end = STACK_EVENT_HEADER_SIZE + max(kernel_len, 0) * 8
    user_end = kernel_end + max(user_len, 0) * 8
    if size < user_end:
        raise MalformedRecord(f"stack_event: {size} bytes cannot hold {kernel_len}+{user_len} frames")
    kernel_thread = bool(header.flags & SAMPLE_FLAG_KERNEL_THREAD)
    user_copy = _user_copy(header, raw) if header.user_stack_bytes else None
    return StackEvent(
        profiler,
        header.timestamp_ns,
        header.pid,
        header.tid,
        header.cpu,
        kernel_thread,
        header.comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        stacks.decode(kernel_len, raw[STACK_EVENT_HEADER_SIZE:kernel_end], kernel=True),
        stacks.decode(user_len, raw[kernel_end:user_end], kernel=False, kernel_thread=kernel_thread),
        values_of(header),
        user_copy,
    )


def _user_copy(header: RecordHeader, raw: bytes) -> UserStackCopy:
    end = USER_STACK_OFFSET + header.user_stack_bytes
    if len(raw) < end:
        raise MalformedRecord(f"stack_event: {len(raw)} bytes cannot hold a {header.user_stack_bytes}-byte stack copy")
    if not header.user_stack_base <= header.user_sp < header.user_stack_base + header.user_stack_bytes:
        raise MalformedRecord(f"stack_event: stack pointer {header.user_sp:#x} outside its copy")
    data = raw[USER_STACK_OFFSET:end]
    return UserStackCopy(header.user_ip, header.user_sp, header.user_bp, header.user_stack_base, data)


def decode_proc_event(data: int, size: int) -> ProcessEvent:
    record = _view(data, size, ProcEventRecord)
    try:
        kind = ProcessEventKind(record.kind)
    except ValueError:
        raise MalformedRecord(f"proc_event: kind {record.kind}") from None
    return ProcessEvent(timestamp_ns=record.timestamp_ns, pid=record.pid, kind=kind)
