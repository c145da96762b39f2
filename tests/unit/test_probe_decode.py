"""Tests for the perf-buffer record decoders (`agent.probes.events`), fed with ctypes records built here."""

from __future__ import annotations

import ctypes

import pytest

from agent.probes.events import (
    StackEvent,
    MalformedRecord,
    ProcessEvent,
    ProcessEventKind,
    decode_cpu_sample,
    decode_proc_event,
)
from agent.probes.records import (
    AGENT_COMM_LEN,
    PROC_EVENT_EXEC,
    PROC_EVENT_NEW,
    SAMPLE_FLAG_KERNEL_THREAD,
    CpuSampleRecord,
    ProcEventRecord,
)

EFAULT_ID = -14


def cpu_record(comm: bytes = b"worker", **fields: int) -> CpuSampleRecord:
    values = {
        "timestamp_ns": 123_456_789_012,
        "pid": 4242,
        "tid": 4243,
        "cpu": 3,
        "user_stack_id": 17,
        "kernel_stack_id": EFAULT_ID,
        "stack_gen": 1,
        "flags": 0,
    }
    values.update(fields)
    record = CpuSampleRecord(**values)
    set_comm(record, comm)
    return record


def set_comm(record: CpuSampleRecord, raw: bytes) -> None:
    """Write the comm bytes exactly as given (ctypes' own setter would stop at a NUL)."""
    assert len(raw) <= AGENT_COMM_LEN
    buffer = raw.ljust(AGENT_COMM_LEN, b"\0")
    ctypes.memmove(ctypes.addressof(record) + CpuSampleRecord.comm.offset, buffer, AGENT_COMM_LEN)


VALUES = (1, 52_631_579)


def decode(record: ctypes.Structure, size: int | None = None) -> StackEvent:
    return decode_cpu_sample(ctypes.addressof(record), ctypes.sizeof(record) if size is None else size, VALUES)


def test_decode_cpu_sample_copies_every_field() -> None:
    record = cpu_record(user_stack_id=17, kernel_stack_id=EFAULT_ID, stack_gen=1)
    assert decode(record) == StackEvent(
        profiler="cpu",
        timestamp_ns=123_456_789_012,
        pid=4242,
        tid=4243,
        cpu=3,
        user_stack_id=17,
        kernel_stack_id=EFAULT_ID,
        stack_gen=1,
        kernel_thread=False,
        comm="worker",
        values=VALUES,
    )


def test_large_unsigned_and_negative_signed_values() -> None:
    record = cpu_record(timestamp_ns=2**64 - 1, pid=2**32 - 1, user_stack_id=-(2**31), kernel_stack_id=2**31 - 1)
    event = decode(record)
    assert event.timestamp_ns == 2**64 - 1
    assert event.pid == 2**32 - 1
    assert (event.user_stack_id, event.kernel_stack_id) == (-(2**31), 2**31 - 1)


@pytest.mark.parametrize(
    ("flags", "kernel_thread"),
    [(0, False), (SAMPLE_FLAG_KERNEL_THREAD, True), (SAMPLE_FLAG_KERNEL_THREAD | 0x100, True), (0x100, False)],
)
def test_kernel_thread_flag(flags: int, kernel_thread: bool) -> None:
    assert decode(cpu_record(flags=flags)).kernel_thread is kernel_thread


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
    assert decode(cpu_record(comm=raw)).comm == comm


def test_event_does_not_keep_the_view() -> None:
    record = cpu_record(comm=b"before")
    event = decode(record)
    ctypes.memset(ctypes.addressof(record), 0xFF, ctypes.sizeof(record))
    assert (event.pid, event.comm, event.stack_gen) == (4242, "before", 1)


def test_decode_from_a_larger_raw_buffer() -> None:
    # perf-buffer records carry trailing padding: a larger size is fine.
    record = cpu_record()
    raw = ctypes.create_string_buffer(bytes(record) + b"\0" * 4)
    event = decode_cpu_sample(ctypes.addressof(raw), ctypes.sizeof(record) + 4, VALUES)
    assert (event.pid, event.comm) == (4242, "worker")


@pytest.mark.parametrize("size", [0, 1, ctypes.sizeof(CpuSampleRecord) - 1])
def test_too_short_cpu_sample_is_malformed(size: int) -> None:
    with pytest.raises(MalformedRecord, match=f"CpuSampleRecord: {size} bytes, expected"):
        decode(cpu_record(), size)


@pytest.mark.parametrize("stack_gen", [2, 7, 2**32 - 1])
def test_impossible_stack_generation_is_malformed(stack_gen: int) -> None:
    with pytest.raises(MalformedRecord, match=f"stack generation {stack_gen}"):
        decode(cpu_record(stack_gen=stack_gen))


@pytest.mark.parametrize("stack_gen", [0, 1])
def test_both_stack_generations_are_valid(stack_gen: int) -> None:
    assert decode(cpu_record(stack_gen=stack_gen)).stack_gen == stack_gen


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
    with pytest.raises(MalformedRecord, match="ProcEventRecord: 12 bytes, expected 16"):
        decode_proc_event(ctypes.addressof(record), 12)
