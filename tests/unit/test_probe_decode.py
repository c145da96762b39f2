"""Tests for the perf-buffer record decoders (`agent.probes.events`), fed with ctypes records built here.

Stack records arrive truncated after their last filled frame, so every stack record is handed to the
decoder as exactly the bytes the BPF program sends, followed by sentinel bytes that must never be read
as frames. Every record decoded by `decode_stack_event` here is also decoded twice by a fresh
`StackEventDecoder` (a cache miss, then a hit), which must give the same event or the same error.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

from agent.probes.events import (
    MalformedRecord,
    ProcessEvent,
    ProcessEventKind,
    RecordHeader,
    StackEvent,
    StackEventDecoder,
    UserStackCopy,
    ValuesOf,
    decode_proc_event,
    decode_stack_event,
)
from agent.probes.records import (
    AGENT_COMM_LEN,
    MAX_STACK_DEPTH,
    PROC_EVENT_EXEC,
    PROC_EVENT_NEW,
    PROC_EVENT_PYTHON_CODE,
    SAMPLE_FLAG_KERNEL_THREAD,
    STACK_EVENT_HEADER_SIZE,
    STACK_EVENT_SIZE,
    ProcEventRecord,
    StackEventRecord,
)
from agent.probes.stacks import StackDecoder
from agent.types import EMPTY_STACK, ImageLayout, Stack, StackStatus

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
    python: tuple[int, ...] = (),
    **fields: int,
) -> StackEventRecord:
    """A record as collect_stacks() fills it: kernel frames from ips[0], user frames right after them;
    then the walker's Python frames (`python`: two words each; python_frames = their count unless given)."""
    values = {"timestamp_ns": 123_456_789_012, "value": 52_631_579, "pid": 4242, "tid": 4243, "cpu": 3, "flags": 0}
    values["python_frames"] = len(python) // 2
    values.update(fields)
    record = StackEventRecord(
        kernel_stack_len=len(kernel) if kernel_len is None else kernel_len,
        user_stack_len=len(user) if user_len is None else user_len,
        **values,
    )
    frames = kernel + user + python
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
    """What collect_stacks() and the walker submit: the header and the filled frames only."""
    frames = max(record.kernel_stack_len, 0) + max(record.user_stack_len, 0) + 2 * max(record.python_frames, 0)
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
    cached = StackEventDecoder(
        profiler, StackDecoder(), RecordingValues() if isinstance(values_of, RecordingValues) else values_of
    )
    try:
        event = decode_stack_event(ctypes.addressof(buffer), size, stacks, profiler, values_of)
    except MalformedRecord as e:
        for _ in range(2):
            with pytest.raises(MalformedRecord) as cached_error:
                cached.decode(ctypes.addressof(buffer), size)
            assert str(cached_error.value) == str(e)
        assert len(cached) == 0
        raise
    assert cached.decode(ctypes.addressof(buffer), size) == event
    assert cached.decode(ctypes.addressof(buffer), size) == event
    return event


def identity(record: StackEventRecord) -> bytes:
    """What `StackEvent.identity` is: the bytes after timestamp, value and sampling, less the registers
    (python_frames, right before the frames, is part of it)."""
    raw = bytes(record)
    return raw[24:64] + raw[100 : sent_size(record)]


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
        identity=identity(stack_record()),
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
    ("kind", "expected"),
    [
        (PROC_EVENT_NEW, ProcessEventKind.NEW),
        (PROC_EVENT_EXEC, ProcessEventKind.EXEC),
        (PROC_EVENT_PYTHON_CODE, ProcessEventKind.PYTHON_CODE),
    ],
)
def test_decode_proc_event(kind: int, expected: ProcessEventKind) -> None:
    record = ProcEventRecord(timestamp_ns=99, pid=31337, kind=kind)
    event = decode_proc_event(ctypes.addressof(record), ctypes.sizeof(record))
    assert event == ProcessEvent(timestamp_ns=99, pid=31337, kind=expected)
    assert event.kind is expected


@pytest.mark.parametrize("kind", [0, 4, 2**32 - 1])
def test_unknown_proc_event_kind_is_malformed(kind: int) -> None:
    record = ProcEventRecord(timestamp_ns=1, pid=2, kind=kind)
    with pytest.raises(MalformedRecord, match=f"proc_event: kind {kind}"):
        decode_proc_event(ctypes.addressof(record), ctypes.sizeof(record))


def test_too_short_proc_event_is_malformed() -> None:
    record = ProcEventRecord(timestamp_ns=1, pid=2, kind=PROC_EVENT_NEW)
    size = ctypes.sizeof(ProcEventRecord)
    with pytest.raises(MalformedRecord, match=f"ProcEventRecord: 12 bytes, expected at least {size}"):
        decode_proc_event(ctypes.addressof(record), 12)


def test_an_announcement_says_where_its_image_lies() -> None:
    fields = {"start_code": 0x5555_5555_5000, "mmap_base": 0x7FFF_F7FF_F000, "vdso": 0x7FFF_F7FC_1000}
    record = ProcEventRecord(timestamp_ns=5, pid=7, kind=PROC_EVENT_NEW, exe_ino=42, exe_dev=(8 << 20) | 1, **fields)
    record.comm = b"sed"
    event = decode_proc_event(ctypes.addressof(record), ctypes.sizeof(record))
    assert event.layout == ImageLayout((8 << 20) | 1, 42, 0x5555_5555_5000, 0x7FFF_F7FF_F000, 0x7FFF_F7FC_1000, "sed")
    # BPF could not read the image (no BTF offsets, a kernel thread's missing mm): no layout, as for EXEC.
    for kind, exe_ino in ((PROC_EVENT_NEW, 0), (PROC_EVENT_EXEC, 42)):
        record = ProcEventRecord(timestamp_ns=5, pid=7, kind=kind, exe_ino=exe_ino, **fields)
        assert decode_proc_event(ctypes.addressof(record), ctypes.sizeof(record)).layout is None


# StackEventDecoder: what its cache shares between records, and what it reads afresh


def in_buffer(record: StackEventRecord, size: int | None = None, padding: bytes = b"") -> ctypes.Array[ctypes.c_char]:
    raw = bytes(record)[: sent_size(record) if size is None else size] + padding
    return ctypes.create_string_buffer(raw, len(raw))


def cached_decode(decoder: StackEventDecoder, buffer: ctypes.Array[ctypes.c_char]) -> StackEvent:
    return decoder.decode(ctypes.addressof(buffer), len(buffer))


def test_a_cached_record_reads_its_timestamp_and_worth_afresh() -> None:
    values_of = RecordingValues()
    decoder = StackEventDecoder("offcpu", StackDecoder(), values_of)
    first = cached_decode(decoder, in_buffer(stack_record(timestamp_ns=10, value=100, sampling=1)))
    second = cached_decode(decoder, in_buffer(stack_record(timestamp_ns=20, value=200, sampling=2)))
    assert len(decoder) == 1  # one record, seen twice
    assert (first.timestamp_ns, first.values, second.timestamp_ns, second.values) == (10, (1, 100), 20, (1, 200))
    assert second._replace(timestamp_ns=10, values=(1, 100)) == first
    assert second.identity is first.identity  # one object: the aggregator's key, hashed once
    assert values_of.seen == [(RecordHeader, 4242, 100), (RecordHeader, 4242, 200)]


def test_every_event_is_worth_a_constant_worth() -> None:
    decoder = StackEventDecoder("cpu", StackDecoder(), (1, 52_631_578))
    events = [cached_decode(decoder, in_buffer(stack_record(value=v))) for v in (0, 5, 7)]
    assert {event.values for event in events} == {(1, 52_631_578)}
    assert events[0] == decode(stack_record(), values_of=lambda _: (1, 52_631_578))


def test_the_identity_leaves_out_the_user_registers_but_not_the_thread() -> None:
    decoder = StackEventDecoder("alloc", StackDecoder(), (1,))
    base = cached_decode(decoder, in_buffer(stack_record()))
    registers = cached_decode(decoder, in_buffer(stack_record(user_ip=1, user_sp=2, user_bp=3)))
    assert registers == base and registers.identity == base.identity
    for changed in (stack_record(comm=b"renamed"), stack_record(tid=1), stack_record(cpu=0), stack_record(pid=1)):
        event = cached_decode(decoder, in_buffer(changed))
        assert event.identity == identity(changed) != base.identity


def test_perf_padding_is_not_part_of_the_key() -> None:
    decoder = StackEventDecoder("cpu", StackDecoder(), (1,))
    a = cached_decode(decoder, in_buffer(stack_record(), padding=b"\x01\x02\x03\x04"))
    b = cached_decode(decoder, in_buffer(stack_record(), padding=b"\xff\xfe\xfd\xfc"))  # never written by perf
    assert a == b and a.identity is b.identity
    assert len(decoder) == 1
    odd = cached_decode(decoder, in_buffer(stack_record(), padding=b"\x05" * 12))  # not perf's: not cached
    assert odd == a and len(decoder) == 1


def test_hits_count_their_stacks() -> None:
    stacks = StackDecoder()
    decoder = StackEventDecoder("cpu", stacks, (1,))
    for _ in range(3):
        cached_decode(decoder, in_buffer(stack_record()))
    cached_decode(decoder, in_buffer(stack_record(KERNEL, (), user_len=-errno.EFAULT)))
    assert stacks.status_counts == {"OK": 7, "MISSING": 1}


def test_a_malformed_worth_is_raised_on_a_hit_too() -> None:
    def values_of(record: RecordHeader) -> tuple[float, ...]:
        if record.value == 0:
            raise MalformedRecord("alloc record: size 0")
        return (1, record.value)

    stacks = StackDecoder()
    decoder = StackEventDecoder("alloc", stacks, values_of)
    cached_decode(decoder, in_buffer(stack_record(value=5)))
    with pytest.raises(MalformedRecord, match="size 0"):
        cached_decode(decoder, in_buffer(stack_record(value=0)))
    assert stacks.status_counts == {"OK": 2}  # the rejected record's stacks are not counted


def test_the_cache_is_bounded() -> None:
    decoder = StackEventDecoder("cpu", StackDecoder(), (1,), cache_limit=2)
    for pid in range(7):
        event = cached_decode(decoder, in_buffer(stack_record(pid=pid)))
        assert event.pid == pid
        assert 1 <= len(decoder) <= 2


# A small copy makes a record no bigger than one with every slot filled; the default one, bigger.
@pytest.mark.parametrize("copy_bytes", [512, 8192])
def test_a_record_with_a_stack_copy_is_decoded_in_full_every_time(copy_bytes: int) -> None:
    """The copy starts right after the last filled frame: the unfilled slots are not sent."""
    sp, base = 0x7FFD0000_1010, 0x7FFD0000_1000
    record = stack_record(
        user_ip=0x401234, user_sp=sp, user_bp=sp + 32, user_stack_base=base, user_stack_bytes=copy_bytes
    )
    copy = bytes(range(256)) * (copy_bytes // 256)
    buffer = in_buffer(record, padding=copy)
    assert len(buffer) == STACK_EVENT_HEADER_SIZE + 8 * (len(KERNEL) + len(USER)) + copy_bytes
    assert (len(buffer) <= STACK_EVENT_SIZE) == (copy_bytes == 512)
    decoder = StackEventDecoder("cpu", StackDecoder(), (1,))
    for _ in range(2):
        event = cached_decode(decoder, buffer)
        assert event.user_copy == UserStackCopy(0x401234, sp, sp + 32, base, copy)
        assert event.identity is None  # its user stack is what the unwinder makes of the copy
        assert event.user == Stack(StackStatus.OK, USER)
    assert len(decoder) == 0


@pytest.mark.parametrize("copy_bytes", [512, 8192])
def test_a_stack_copy_is_unwound_inside_the_callback_by_the_unwind_stage(copy_bytes: int) -> None:
    """With an unwind stage the copy is handed over where it lies (a view of the record, read while the
    callback runs), and the event carries the unwound stack instead of the copy."""
    sp, base = 0x7FFD0000_1010, 0x7FFD0000_1000
    record = stack_record(
        user_ip=0x401234, user_sp=sp, user_bp=sp + 32, user_stack_base=base, user_stack_bytes=copy_bytes
    )
    copy = bytes(range(256)) * (copy_bytes // 256)
    buffer = in_buffer(record, padding=copy)
    unwound = Stack(StackStatus.OK, (0x401234, 0x401500, 0x401600))
    calls: list[tuple[int, UserStackCopy, Stack]] = []

    def unwind(pid: int, user_copy: UserStackCopy, frame_pointer_stack: Stack) -> Stack:
        assert bytes(user_copy.data) == copy  # read during the call: the view is the record's own bytes
        calls.append((pid, user_copy._replace(data=b""), frame_pointer_stack))
        return unwound

    stacks = StackDecoder()
    decoder = StackEventDecoder("cpu", stacks, (1,), unwind=unwind)
    for _ in range(2):
        event = cached_decode(decoder, buffer)
        assert (event.user, event.user_copy, event.identity) == (unwound, None, None)
        assert (event.pid, event.kernel, event.values) == (4242, Stack(StackStatus.OK, KERNEL), (1,))
    assert calls == [(4242, UserStackCopy(0x401234, sp, sp + 32, base, b""), Stack(StackStatus.OK, USER))] * 2
    assert stacks.status_counts == {"OK": 4}  # the kernel's stacks are what the status metrics count


def test_a_stack_copy_that_does_not_fit_is_malformed_before_the_unwind_stage() -> None:
    record = stack_record(user_sp=0x1010, user_stack_base=0x1000, user_stack_bytes=4096)
    buffer = in_buffer(record, padding=b"\0" * 512)

    def unwind(pid: int, user_copy: UserStackCopy, frame_pointer_stack: Stack) -> Stack:
        raise AssertionError("a malformed record must not be unwound")

    with pytest.raises(MalformedRecord, match="cannot hold a 4096-byte stack copy after 144 bytes"):
        cached_decode(StackEventDecoder("cpu", StackDecoder(), (1,), unwind=unwind), buffer)


def test_the_cached_decoder_does_not_keep_the_view() -> None:
    decoder = StackEventDecoder("cpu", StackDecoder(), (1,))
    for _ in range(2):  # a miss, then a hit
        buffer = in_buffer(stack_record(comm=b"before"))
        event = cached_decode(decoder, buffer)
        ctypes.memset(ctypes.addressof(buffer), 0xFF, len(buffer))
        assert (event.pid, event.comm, event.timestamp_ns) == (4242, "before", 123_456_789_012)
        assert event.user == Stack(StackStatus.OK, USER)
