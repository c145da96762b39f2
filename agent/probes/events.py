"""Probes stage: typed, immutable events decoded from perf-buffer records, and their decoders.

The decoders run inside the perf-buffer callbacks: they copy every field out of the ctypes view (the
view points into the ring buffer and is reused as soon as the callback returns), turn the inline stacks
into `Stack`s and the Python frames after them into an `InterpreterStack`, and reject records that are
too short or carry impossible values with `MalformedRecord`, which the reader counts.
`decode_stack_event` decodes one record in full; `StackEventDecoder` does the same through a cache of
the records it has seen, which is what makes the reader cheap enough per event (see `bench/ingest.py`).

Records with a user stack copy (it starts right after the record's last frame, native or Python): a
decoder given the unwind stage (the CPU and off-CPU profilers' with `unwind.* = auto|dwarf`) unwinds the
copy where it lies in the ring, inside the callback, and the event carries the unwound stack and no
copy; without one (allocations) the whole record is copied out and the event carries the copy to the
pipeline thread, which unwinds it after the keep decision.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from agent.probes.records import (
    MAX_STACK_DEPTH,
    PROC_EVENT_EXEC,
    PROC_EVENT_NEW,
    PROC_EVENT_PYTHON_CODE,
    PYTHON_MAX_FRAMES,
    PYTHON_NO_FSBASE,
    PYTHON_NO_THREAD_STATE,
    PYTHON_READ_FAILED,
    SAMPLE_FLAG_KERNEL_THREAD,
    SAMPLE_FLAG_PYTHON_TRUNCATED,
    STACK_EVENT_HEADER_SIZE,
    STACK_EVENT_SIZE,
    ProcEventRecord,
    StackEventRecord,
)
from agent.probes.stacks import StackDecoder
from agent.types import NO_INTERPRETER_STACK, ImageLayout, InterpreterStack, InterpreterStatus, Stack

R = TypeVar("R", bound=ctypes.Structure)


class MalformedRecord(ValueError):
    """A perf-buffer record that cannot be what the BPF program sends."""


class ProcessEventKind(enum.IntEnum):
    NEW = PROC_EVENT_NEW
    EXEC = PROC_EVENT_EXEC
    PYTHON_CODE = PROC_EVENT_PYTHON_CODE  # a Python walk met new code: read the buffers now


class UserStackCopy(NamedTuple):
    """The user registers at the event and a copy of the stack's top, for unwinding with CFI.

    `data` holds the memory from address `base` (the stack pointer rounded down to a chunk) upward."""

    ip: int
    sp: int
    bp: int
    base: int
    data: bytes | memoryview


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
    # Equal for events whose records are equal in everything but timestamp, value and sampling (so
    # in every field above but those and `values`, and in `python`): the aggregate stage keys on it.
    # None for an event with a stack copy, or one not decoded from a record.
    identity: bytes | None = None
    # The Python frames the BPF walker appended after the user frames (docs/python.md).
    python: InterpreterStack = NO_INTERPRETER_STACK


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
    python_frames: int


# Field for field the layout of StackEventRecord up to `ips` (the layout test checks the mirror).
_HEADER = struct.Struct("<QQQIIIIii16sQQQQIi")
assert _HEADER.size == STACK_EVENT_HEADER_SIZE
# What a cached record's decoding reads afresh: timestamp_ns, and value and sampling for its worth.
_TIMESTAMP = struct.Struct("<Q")
_WORTH = struct.Struct("<QQQ")
_IDENTITY_START = 24  # after timestamp_ns, value and sampling
_LENGTHS = struct.Struct("<ii")  # kernel_stack_len, user_stack_len
_LENGTHS_OFFSET = StackEventRecord.kernel_stack_len.offset
_REGISTERS = StackEventRecord.user_ip.offset  # to python_frames: the user registers and the copy's place
_COPY_BYTES = StackEventRecord.user_stack_bytes.offset  # nonzero: the record carries a stack copy
_COPY_BYTES_FIELD = struct.Struct("<I")
_PYTHON_COUNT = StackEventRecord.python_frames.offset  # python_frames, then the frames
_PYTHON_COUNT_FIELD = struct.Struct("<i")
_FRAMES = STACK_EVENT_HEADER_SIZE
# python_frames < 0: why a Python process's event has no frames (shared objects: they recur per event).
_PYTHON_REASONS = {
    PYTHON_NO_THREAD_STATE: InterpreterStack(InterpreterStatus.NO_THREAD_STATE),
    PYTHON_READ_FAILED: InterpreterStack(InterpreterStatus.READ_FAILED),
    PYTHON_NO_FSBASE: InterpreterStack(InterpreterStatus.NO_FSBASE),
}


@dataclass(frozen=True, slots=True)
class ProcessEvent:
    timestamp_ns: int
    pid: int
    kind: ProcessEventKind
    layout: ImageLayout | None = None  # NEW: where its image lies, when BPF could read it


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
# The unwind stage, called inside the callback for a record with a stack copy: (pid, the registers and
# a view of the copy in the ring, the kernel's frame-pointer user stack) -> the user stack.
UnwindCopy = Callable[[int, UserStackCopy, Stack], Stack]


def decode_stack_event(data: int, size: int, stacks: StackDecoder, profiler: str, values_of: ValuesOf) -> StackEvent:
    """One profiler's record; `values_of` reads what the event is worth from the record's fixed part."""
    if size < STACK_EVENT_HEADER_SIZE:
        raise MalformedRecord(f"StackEventRecord: {size} bytes, expected at least {STACK_EVENT_HEADER_SIZE}")
    raw = ctypes.string_at(data, size)  # one copy out of the ring buffer; everything below reads it
    header, fields, python, user_copy, identity = _decode_fields(raw, stacks)
    event = StackEvent(profiler, header.timestamp_ns, *fields, values_of(header), user_copy, identity, python)
    stacks.counts[stacks.signature(event.kernel, event.user)] += 1
    return event


# (pid, tid, cpu, kernel_thread, comm, kernel, user): what every record with the same identity shares.
Fields = tuple[int, int, int, bool, str, Stack, Stack]


def _decode_fields(
    raw: bytes, stacks: StackDecoder, record: bytes | memoryview | None = None
) -> tuple[RecordHeader, Fields, InterpreterStack, UserStackCopy | None, bytes | None]:
    """Everything in a record but its worth, checked; the stacks are not counted yet. `record`: the whole
    record, when `raw` holds only its start up to the last frame (the stack copy is then a view of it)."""
    header = RecordHeader._make(_HEADER.unpack_from(raw))
    kernel_len, user_len = header.kernel_stack_len, header.user_stack_len
    if kernel_len > MAX_STACK_DEPTH or user_len > MAX_STACK_DEPTH:
        raise MalformedRecord(f"stack_event: stack lengths {kernel_len}/{user_len} exceed {MAX_STACK_DEPTH}")
    kernel_end = STACK_EVENT_HEADER_SIZE + max(kernel_len, 0) * 8
    user_end = kernel_end + max(user_len, 0) * 8
    if len(raw) < user_end:
        raise MalformedRecord(f"stack_event: {len(raw)} bytes cannot hold {kernel_len}+{user_len} frames")
    python, python_end = _python_stack(header, raw, user_end)
    kernel_thread = bool(header.flags & SAMPLE_FLAG_KERNEL_THREAD)
    user_copy = _user_copy(header, raw if record is None else record, python_end) if header.user_stack_bytes else None
    fields = (
        header.pid,
        header.tid,
        header.cpu,
        kernel_thread,
        header.comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        stacks.stack(kernel_len, raw[STACK_EVENT_HEADER_SIZE:kernel_end], kernel=True),
        stacks.stack(user_len, raw[kernel_end:user_end], kernel=False, kernel_thread=kernel_thread),
    )
    # A record's bytes after its timestamp, value and sampling up to its last (Python) frame, less the
    # user registers (they vary from event to event, and only the unwinder reads them): records equal
    # in these decode to equal fields. Not for a record with a stack copy, whose user stack comes from it.
    identity = None if user_copy is not None else raw[_IDENTITY_START:_REGISTERS] + raw[_PYTHON_COUNT:python_end]
    return header, fields, python, user_copy, identity


def _python_stack(header: RecordHeader, raw: bytes, start: int) -> tuple[InterpreterStack, int]:
    """The Python frames at `start` (right after the user frames), checked, and where they end."""
    count, truncated = header.python_frames, bool(header.flags & SAMPLE_FLAG_PYTHON_TRUNCATED)
    if count <= 0:
        reason = _PYTHON_REASONS.get(count, NO_INTERPRETER_STACK) if count else NO_INTERPRETER_STACK
        if (count < 0 and reason is NO_INTERPRETER_STACK) or truncated:
            raise MalformedRecord(f"stack_event: python_frames {count}{' truncated' if truncated else ''}")
        return reason, start
    if count > PYTHON_MAX_FRAMES:
        raise MalformedRecord(f"stack_event: {count} Python frames exceed {PYTHON_MAX_FRAMES}")
    end = start + 16 * count
    if len(raw) < end:
        raise MalformedRecord(f"stack_event: {len(raw)} bytes cannot hold {count} Python frames after the stacks")
    frames = struct.unpack_from(f"<{2 * count}Q", raw, start)
    return InterpreterStack(InterpreterStatus.TRUNCATED if truncated else InterpreterStatus.OK, frames), end


RECORD_CACHE_LIMIT = 8192
_new_tuple = tuple.__new__  # builds a NamedTuple from a tuple without its Python-level __new__
# A record's size, as the perf buffer reports it, is what the program sent (a whole number of u64s)
# plus the padding perf adds after it (4 bytes, never written): this mask takes the padding off.
_WHOLE_WORDS = ~7
# What records with one cache key share: the event's fields from pid to user (on to the end when every
# event is worth the same), the stack-count signature, the header after value and sampling (when the
# worth is read from it), the identity and the Python frames.
_Known = tuple[tuple[object, ...], int, tuple[object, ...], bytes, InterpreterStack]


class StackEventDecoder:
    """One profiler's records, decoded through a cache keyed on their bytes after timestamp and worth.

    The same stacks of the same threads recur at every sample: a record seen before costs one copy out
    of the ring, one unpack of its timestamp (and worth) and one dict lookup; a new one is decoded and
    checked in full, by `decode_stack_event`'s rules, and its events share one `identity` object.
    Records that carry a user stack copy are decoded in full every time, and unwound then when an
    `unwind` stage is given (the event carries the unwound stack, and no copy). `values` reads what an event
    is worth from the record's fixed part, or is the tuple that every event is worth. `decode` is the
    perf-buffer decoder; it runs on the reader thread.
    """

    def __init__(
        self,
        profiler: str,
        stacks: StackDecoder,
        values: ValuesOf | tuple[float, ...],
        cache_limit: int = RECORD_CACHE_LIMIT,
        unwind: UnwindCopy | None = None,
    ) -> None:
        self._profiler = profiler
        self._unwind = unwind
        self._stacks = stacks
        self._counts = stacks.counts
        self._values_of: ValuesOf | None = None if isinstance(values, tuple) else values
        self._values: tuple[float, ...] = values if isinstance(values, tuple) else ()
        self._cache: dict[bytes, _Known] = {}
        self._limit = cache_limit
        self._arrays: dict[int, type[ctypes.Array[ctypes.c_char]]] = {}  # a ctypes view type per size
        self.decode: Callable[[int, int], StackEvent] = self._weighed if self._values_of else self._same_worth

    def __len__(self) -> int:
        return len(self._cache)

    def _same_worth(self, data: int, size: int) -> StackEvent:
        if not STACK_EVENT_HEADER_SIZE <= size <= STACK_EVENT_SIZE:
            return self._decode_in_full(data, size)  # too short, or carrying a stack copy
        raw = (self._arrays.get(size) or self._array(size)).from_address(data).raw  # one copy out of the ring
        key = raw[_IDENTITY_START : size & _WHOLE_WORDS]
        known = self._cache.get(key) or self._learn(raw, key)
        if known is None:
            return self._decode_in_full(data, size)  # a short stack with a small copy
        self._counts[known[1]] += 1
        event: StackEvent = _new_tuple(StackEvent, (self._profiler, _TIMESTAMP.unpack_from(raw)[0]) + known[0])
        return event

    def _weighed(self, data: int, size: int) -> StackEvent:
        if not STACK_EVENT_HEADER_SIZE <= size <= STACK_EVENT_SIZE:
            return self._decode_in_full(data, size)
        raw = (self._arrays.get(size) or self._array(size)).from_address(data).raw
        key = raw[_IDENTITY_START : size & _WHOLE_WORDS]
        known = self._cache.get(key) or self._learn(raw, key)
        if known is None:
            return self._decode_in_full(data, size)
        fields, signature, rest, identity, python = known
        timestamp, value, sampling = _WORTH.unpack_from(raw)
        assert self._values_of is not None
        values = self._values_of(_new_tuple(RecordHeader, (timestamp, value, sampling, *rest)))
        self._counts[signature] += 1
        event: StackEvent = _new_tuple(StackEvent, (self._profiler, timestamp, *fields, values, None, identity, python))
        return event

    def _learn(self, raw: bytes, key: bytes) -> _Known | None:
        """What the cache keeps for a record seen for the first time; None for one with a stack copy
        (it is decoded in full every time: its copy differs from event to event)."""
        if _COPY_BYTES_FIELD.unpack_from(raw, _COPY_BYTES)[0]:
            return None
        header, fields, python, _, identity = _decode_fields(raw, self._stacks)  # may raise MalformedRecord
        assert identity is not None  # only a record with a stack copy has none
        signature = self._stacks.signature(fields[5], fields[6])
        if self._values_of is None:
            known: _Known = ((*fields, self._values, None, identity, python), signature, (), identity, python)
        else:
            known = (fields, signature, tuple(header)[3:], identity, python)
        # The key ends where the frames end, unless the padding is not perf's (never seen): such a
        # record is decoded afresh every time, never wrongly.
        if len(key) == len(identity) + _PYTHON_COUNT - _REGISTERS:
            if len(self._cache) >= self._limit:
                self._cache.clear()  # as StackDecoder's: refills in one interval
            self._cache[key] = known
        return known

    def _decode_in_full(self, data: int, size: int) -> StackEvent:
        values = self._values
        values_of = self._values_of or (lambda _: values)
        if self._unwind is not None and size > STACK_EVENT_HEADER_SIZE and _has_copy(data):
            return self._decode_and_unwind(data, size, values_of)
        return decode_stack_event(data, size, self._stacks, self._profiler, values_of)

    def _decode_and_unwind(self, data: int, size: int, values_of: ValuesOf) -> StackEvent:
        """A record with a stack copy, unwound where it lies: only its start (header and frames) is copied
        out of the ring, and the unwinder reads the few words of the copy it needs in place. Copying the
        whole record (~10 KiB, into memory no cache holds yet) cost more than the unwinding itself."""
        assert self._unwind is not None
        ring = memoryview((self._arrays.get(size) or self._array(size)).from_address(data)).cast("B")
        kernel_len, user_len = _LENGTHS.unpack_from(ring, _LENGTHS_OFFSET)  # how much of the start to copy
        python_len = min(max(_PYTHON_COUNT_FIELD.unpack_from(ring, _PYTHON_COUNT)[0], 0), PYTHON_MAX_FRAMES + 1)
        end = STACK_EVENT_HEADER_SIZE + 8 * (max(kernel_len, 0) + max(user_len, 0) + 2 * python_len)
        header, fields, python, copy, _ = _decode_fields(ring[: min(end, size)].tobytes(), self._stacks, ring)
        kernel, frame_pointer_user = fields[5], fields[6]
        user = frame_pointer_user if copy is None else self._unwind(header.pid, copy, frame_pointer_user)
        self._counts[self._stacks.signature(kernel, frame_pointer_user)] += 1
        return StackEvent(self._profiler, header.timestamp_ns, *fields[:6], user, values_of(header), python=python)

    def _array(self, size: int) -> type[ctypes.Array[ctypes.c_char]]:
        array = self._arrays[size] = ctypes.c_char * size
        return array


def _has_copy(data: int) -> bool:
    """Whether the record at `data` (at least its header arrived) carries a user stack copy."""
    return ctypes.c_uint32.from_address(data + _COPY_BYTES).value != 0


def _user_copy(header: RecordHeader, record: bytes | memoryview, start: int) -> UserStackCopy:
    """The copy at `start`: right after the record's last filled slot (`stack_copy_offset` in common.h)."""
    end = start + header.user_stack_bytes
    if len(record) < end:
        raise MalformedRecord(
            f"stack_event: {len(record)} bytes cannot hold a {header.user_stack_bytes}-byte stack copy"
            f" after {start} bytes of header and frames"
        )
    if not header.user_stack_base <= header.user_sp < header.user_stack_base + header.user_stack_bytes:
        raise MalformedRecord(f"stack_event: stack pointer {header.user_sp:#x} outside its copy")
    data = memoryview(record)[start:end]  # a view of the record, not a second copy
    return UserStackCopy(header.user_ip, header.user_sp, header.user_bp, header.user_stack_base, data)


def decode_proc_event(data: int, size: int) -> ProcessEvent:
    record = _view(data, size, ProcEventRecord)
    try:
        kind = ProcessEventKind(record.kind)
    except ValueError:
        raise MalformedRecord(f"proc_event: kind {record.kind}") from None
    layout = None
    if kind is ProcessEventKind.NEW and record.exe_ino and record.start_code and record.mmap_base:
        comm = record.comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        layout = ImageLayout(record.exe_dev, record.exe_ino, record.start_code, record.mmap_base, record.vdso, comm)
    return ProcessEvent(timestamp_ns=record.timestamp_ns, pid=record.pid, kind=kind, layout=layout)
