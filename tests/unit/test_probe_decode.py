"""Tests for the perf-buffer record decoders (`agent.probes.events`), fed with ctypes records built here.

Stack records arrive truncated after their last filled frame, so every stack record is handed to the
decoder as exactly the bytes the BPF program sends, followed by sentinel bytes that must never be read
as frames.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

from agent.aggregate.types import EMPTY_STACK, Stack, StackStatus
from agent.probes.events import (
    MalformedRecord,
    ProcessEvent,
    ProcessEventKind,
    RecordHeader,
    StackEvent,
    ValuesOf,
    decode_proc_event,
    decode_stack_event,
)
from agent.probes.records import (
    AGENT_COMM_LEN,
    MAX_STACK_DEPTH,
    PROC_EVENT_EXEC,
    PROC_EVENT_NEW,
    SAMPLE_FLAG_KERNEL_THREAD,
    STACK_EVENT_HEADER_SIZE,
    ProcEventRecord,
    StackEventRecord,
)
from agent.probes.stacks import StackDecoder

KERNEL = (0xFFFFFFFF81000110, 0xFFFFFFFF81000010)
USER = (0x401234, 0x402345, 0x403456)
SENTINEL = 0xEEEEEEEEEEEEEEEE


def stack_record(
    kernel: tuple[int, ...] = KERNEL,
    user: tuple[int, ...] = USER,
    *,
    kernel_len: int | None = None,
    user_len: int | None = None,
    comm: bytes = b"worker",
    **fields: int,
) -> StackEventRecord:
    """A record as collect_stacks() fills it: kernel frames from ips[0], user frames right after them."""
    values = {"timestamp_ns": 123_456_789_012, "value": 52_631_579, "pid": 4242, "tid": 4243, "cpu": 3, "flags": 0}
    values.update(fields)
    record = StackEventRecord(
        kernel_stack_len=len(kernel) if kernel_len is None else kernel_len,
        user_stack_len=len(user) if user_len is None else user_len,
        **values,
    )
    frames = kernel + user
    for i in range(len(record.ips)):
        record.ips[i] = frames[i] if i < len(frames) else SENTINEL  # unfilled slots must never be read
    set_comm(record, comm)
    return record


def set_comm(record: StackEventRecord, raw: bytes) -> None:
    """Write the comm bytes exactly as given (ctypes' own setter would stop at a NUL)."""
    assert len(raw) <= AGENT_COMM_LEN
    buffer = raw.ljust(AGENT_COMM_LEN, b"\0")
    ctypes.memmove(ctypes.addressof(record) + StackEventRecord.comm.offset, buffer, AGENT_COMM_LEN)


def sent_size(record: StackEventRecord) -> int:
    """What collect_stacks() submits: the header and the filled frames only."""
    frames = max(record.kernel_stack_len, 0) + max(record.user_stack_len, 0)
    return STACK_EVENT_HEADER_SIZE + frames * 8


class RecordingValues:
    """A `values_of` that records what it was given: one sample worth the record's `value`."""

    def __init__(self) -> None:
        self.seen: list[tuple[type, int, int]] = []

    def __call__(self, record: RecordHeader) -> tuple[int, ...]:
        self.seen.append((type(record), record.pid, record.value))
        return (1, record.value)


def decode(
    record: StackEventRecord,
    size: int | None = None,
    *,
    stacks: StackDecoder | None = None,
    profiler: str = "cpu",
    values_of: ValuesOf | None = None,
) -> StackEvent:
    """Decode `size` bytes of `record` (default: what the kernel sends), copied into a buffer whose
    following bytes are sentinels, as the rest of a perf ring would be."""
    size = sent_size(record) if size is None else size
    raw = bytes(record)[:size]
    buffer = ctypes.create_string_buffer(raw + b"\xee" * (ctypes.sizeof(record) - len(raw)), ctypes.sizeof(record))
    stacks = StackDecoder() if stacks is None else stacks  # not `or`: an empty decoder is falsy (len 0)
    values_of = RecordingValues() if values_of is None else values_of
    return decode_stack_event(ctypes.addressof(buffer), size, stacks, profiler, values_of)


def test_header_is_everything_before_the_frames() -> None:
    assert STACK_EVENT_HEADER_SIZE == StackEventRecord.ips.offset == 104
    assert sent_size(stack_record()) == 104 + 5 * 8


def test_decode_stack_event_copies_every_field() -> None:
    values_of = RecordingValues()
    assert decode(stack_record(), values_of=values_of) == StackEvent(
        profiler="cpu",
        timestamp_ns=123_456_789_012,
        pid=4242,
        tid=4243,
        cpu=3,
        kernel_thread=False,
        comm="worker",
        kernel=Stack(StackStatus.OK, KERNEL),
        user=Stack(StackStatus.OK, USER),
        values=(1, 52_631_579),
    )
    assert values_of.seen == [(RecordHeader, 4242, 52_631_579)]  # called once, with the record's header


def test_profiler_name_is_passed_through() -> None:
    assert decode(stack_record(), profiler="offcpu").profiler == "offcpu"


def test_values_come_from_values_of() -> None:
    event = decode(stack_record(value=777), values_of=lambda record: (record.value * 2, record.tid, 5))
    assert event.values == (1554, 4243, 5)


def test_large_unsigned_values() -> None:
    record = stack_record(timestamp_ns=2**64 - 1, value=2**64 - 1, pid=2**32 - 1, tid=2**32 - 2, cpu=2**32 - 3)
    event = decode(record)
    assert (event.timestamp_ns, event.pid, event.tid, event.cpu) == (2**64 - 1, 2**32 - 1, 2**32 - 2, 2**32 - 3)
    assert event.values == (1, 2**64 - 1)


@pytest.mark.parametrize(
    ("kernel_depth", "user_depth"),
    [(0, 3), (2, 0), (2, 3), (1, 1), (MAX_STACK_DEPTH, 4), (5, MAX_STACK_DEPTH), (MAX_STACK_DEPTH, MAX_STACK_DEPTH)],
)
def test_kernel_frames_come_first_then_user_frames(kernel_depth: int, user_depth: int) -> None:
    kernel = tuple(0xFFFFFFFF81000000 + i for i in range(kernel_depth))
    user = tuple(0x400000 + i for i in range(user_depth))
    event = decode(stack_record(kernel, user))

    def expected(addresses: tuple[int, ...]) -> Stack:
        if not addresses:
            return EMPTY_STACK
        return Stack(StackStatus.TRUNCATED if len(addresses) == MAX_STACK_DEPTH else StackStatus.OK, addresses)

    assert event.kernel == expected(kernel)
    assert event.user == expected(user)
    assert (event.kernel is EMPTY_STACK) == (kernel_depth == 0)
    assert (event.user is EMPTY_STACK) == (user_depth == 0)


def test_a_user_mode_sample_has_its_user_frames_at_the_start() -> None:
    # bpf_get_stack answers -EFAULT for the kernel stack of a sample taken in user mode: no frames are
    # written, and the user frames start at ips[0].
    event = decode(stack_record((), USER, kernel_len=-errno.EFAULT))
    assert event.kernel is EMPTY_STACK
    assert event.user == Stack(StackStatus.OK, USER)


@pytest.mark.parametrize(
    ("user_len", "flags", "user"),
    [
        (-errno.EFAULT, 0, Stack(StackStatus.MISSING)),
        (-errno.EFAULT, SAMPLE_FLAG_KERNEL_THREAD, EMPTY_STACK),  # a kernel thread has no user space
        (-errno.EINVAL, 0, Stack(StackStatus.ERROR)),
        (-errno.EINVAL, SAMPLE_FLAG_KERNEL_THREAD, Stack(StackStatus.ERROR)),
        (-(2**31), 0, Stack(StackStatus.ERROR)),
    ],
)
def test_negative_user_length_is_classified(user_len: int, flags: int, user: Stack) -> None:
    stacks = StackDecoder()
    event = decode(stack_record(KERNEL, (), user_len=user_len, flags=flags), stacks=stacks)
    assert event.kernel == Stack(StackStatus.OK, KERNEL)
    assert event.user == user
    assert event.user.addresses == ()


@pytest.mark.parametrize(
    ("kernel_len", "kernel"),
    [
        (-errno.EFAULT, EMPTY_STACK),
        (-errno.ENOMEM, Stack(StackStatus.ERROR)),
        (-1, Stack(StackStatus.ERROR)),
    ],
)
def test_negative_kernel_length_is_classified(kernel_len: int, kernel: Stack) -> None:
    event = decode(stack_record((), USER, kernel_len=kernel_len))
    assert event.kernel == kernel
    assert event.user == Stack(StackStatus.OK, USER)


def test_both_lengths_negative_needs_only_the_header() -> None:
    record = stack_record((), (), kernel_len=-errno.EFAULT, user_len=-errno.EFAULT, flags=SAMPLE_FLAG_KERNEL_THREAD)
    event = decode(record, STACK_EVENT_HEADER_SIZE)
    assert (event.kernel, event.user) == (EMPTY_STACK, EMPTY_STACK)
    assert event.kernel_thread is True


def test_stack_statuses_are_counted_by_the_decoder() -> None:
    stacks = StackDecoder()
    decode(stack_record(), stacks=stacks)
    decode(stack_record((), USER, kernel_len=-errno.EFAULT), stacks=stacks)
    decode(stack_record(KERNEL, (), user_len=-errno.EFAULT), stacks=stacks)
    decode(stack_record(KERNEL, (), user_len=-errno.EINVAL), stacks=stacks)
    assert stacks.status_counts == {"OK": 5, "MISSING": 1, "ERROR": 1}


def test_equal_stacks_of_different_records_share_one_object() -> None:
    stacks = StackDecoder()
    first = decode(stack_record(pid=1), stacks=stacks)
    second = decode(stack_record(pid=2, comm=b"other"), stacks=stacks)
    assert first.user is second.user
    assert first.kernel is second.kernel


@pytest.mark.parametrize(
    ("flags", "kernel_thread"),
    [(0, False), (SAMPLE_FLAG_KERNEL_THREAD, True), (SAMPLE_FLAG_KERNEL_THREAD | 0x100, True), (0x100, False)],
)
def test_kernel_thread_flag(flags: int, kernel_thread: bool) -> None:
    assert decode(stack_record(flags=flags)).kernel_thread is kernel_thread


@pytest.mark.parametrize(
    ("raw", "comm"),
    [
        (b"worker\0garbage!", "worker"),  # bytes after the terminating NUL are ignored
        (b"0123456789abcdef", "0123456789abcdef"),  # a full-length comm has no NUL at all
        (b"", ""),
        (b"caf\xc3\xa9", "café"),
        (b"bad\xff\xfename", "bad\ufffd\ufffdname"),  # not UTF-8: replaced, never raises
    ],
)
def test_comm_nul_handling_and_decoding(raw: bytes, comm: str) -> None:
    assert decode(stack_record(comm=raw)).comm == comm


def test_event_does_not_keep_the_view() -> None:
    record = stack_record(comm=b"before")
    size = sent_size(record)
    event = decode_stack_event(ctypes.addressof(record), size, StackDecoder(), "cpu", RecordingValues())
    ctypes.memset(ctypes.addressof(record), 0xFF, ctypes.sizeof(record))
    assert (event.pid, event.comm, event.values) == (4242, "before", (1, 52_631_579))
    assert event.kernel == Stack(StackStatus.OK, KERNEL)
    assert event.user == Stack(StackStatus.OK, USER)


@pytest.mark.parametrize("extra", [4, 8, 100])
def test_decode_from_a_larger_raw_buffer(extra: int) -> None:
    # perf-buffer records carry trailing padding: a larger size is fine, and never read as frames.
    record = stack_record()
    event = decode(record, sent_size(record) + extra)
    assert (event.pid, event.comm) == (4242, "worker")
    assert event.kernel == Stack(StackStatus.OK, KERNEL)
    assert event.user == Stack(StackStatus.OK, USER)


def test_the_full_struct_decodes_only_the_declared_frames() -> None:
    event = decode(stack_record(), ctypes.sizeof(StackEventRecord))
    assert SENTINEL not in event.kernel.addresses + event.user.addresses
    assert event.user == Stack(StackStatus.OK, USER)


@pytest.mark.parametrize("size", [0, 1, STACK_EVENT_HEADER_SIZE - 1])
def test_record_shorter_than_the_header_is_malformed(size: int) -> None:
    values_of = RecordingValues()
    expected = f"StackEventRecord: {size} bytes, expected at least {STACK_EVENT_HEADER_SIZE}"
    with pytest.raises(MalformedRecord, match=expected):
        decode(stack_record(), size, values_of=values_of)
    assert values_of.seen == []


@pytest.mark.parametrize(
    ("kernel", "user", "missing_bytes"),
    [(KERNEL, USER, 8), (KERNEL, USER, 1), (KERNEL, USER, 5 * 8), ((), USER, 8), (KERNEL, (), 8)],
)
def test_record_too_short_for_its_frames_is_malformed(
    kernel: tuple[int, ...], user: tuple[int, ...], missing_bytes: int
) -> None:
    record = stack_record(kernel, user)
    size = sent_size(record) - missing_bytes
    values_of = RecordingValues()
    with pytest.raises(MalformedRecord, match=f"stack_event: {size} bytes cannot hold {len(kernel)}\\+{len(user)}"):
        decode(record, size, values_of=values_of)
    assert values_of.seen == []


@pytest.mark.parametrize(
    ("kernel_len", "user_len"),
    [(MAX_STACK_DEPTH + 1, 0), (0, MAX_STACK_DEPTH + 1), (2 * MAX_STACK_DEPTH, 0), (2**31 - 1, 2**31 - 1)],
)
def test_impossible_stack_length_is_malformed(kernel_len: int, user_len: int) -> None:
    record = stack_record((), (), kernel_len=kernel_len, user_len=user_len)
    with pytest.raises(MalformedRecord, match=f"stack lengths {kernel_len}/{user_len} exceed {MAX_STACK_DEPTH}"):
        decode(record, ctypes.sizeof(StackEventRecord))


def test_malformed_record_is_a_value_error() -> None:
    assert issubclass(MalformedRecord, ValueError)


@pytest.mark.parametrize(
    ("kind", "expected"), [(PROC_EVENT_NEW, ProcessEventKind.NEW), (PROC_EVENT_EXEC, ProcessEventKind.EXEC)]
)
def test_decode_proc_event(kind: int, expected: ProcessEventKind) -> None:
    record = ProcEventRecord(timestamp_ns=99, pid=31337, kind=kind)
    event = decode_proc_event(ctypes.addressof(record), ctypes.sizeof(record))
    assert event == ProcessEvent(timestamp_ns=99, pid=31337, kind=expected)
    assert event.kind is expected


@pytest.mark.parametrize("kind", [0, 3, 2**32 - 1])
def test_unknown_proc_event_kind_is_malformed(kind: int) -> None:
    record = ProcEventRecord(timestamp_ns=1, pid=2, kind=kind)
    with pytest.raises(MalformedRecord, match=f"proc_event: kind {kind}"):
        decode_proc_event(ctypes.addressof(record), ctypes.sizeof(record))


def test_too_short_proc_event_is_malformed() -> None:
    record = ProcEventRecord(timestamp_ns=1, pid=2, kind=PROC_EVENT_NEW)
    with pytest.raises(MalformedRecord, match="ProcEventRecord: 12 bytes, expected at least 16"):
        decode_proc_event(ctypes.addressof(record), 12)
