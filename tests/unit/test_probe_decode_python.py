"""Decoding the Python frames the BPF walker appends after the user frames (docs/python.md).

Records are built as the walker fills them (tests/unit/test_probe_decode.py's `stack_record`, with
`python=`): two words per frame right after the user frames, `python_frames` their count or a reason
below zero, SAMPLE_FLAG_PYTHON_TRUNCATED when the walk stopped at its limit. Every record goes through
both decoders (`decode` checks that the cached one agrees, errors included).
"""

from __future__ import annotations

import pytest

from agent.probes.events import MalformedRecord, StackEventDecoder, UserStackCopy
from agent.probes.records import (
    PYTHON_FRAME_ENTRY,
    PYTHON_FRAME_SHIM,
    PYTHON_MAX_FRAMES,
    PYTHON_NO_FSBASE,
    PYTHON_NO_THREAD_STATE,
    PYTHON_READ_FAILED,
    SAMPLE_FLAG_PYTHON_TRUNCATED,
    STACK_EVENT_HEADER_SIZE,
)
from agent.probes.stacks import StackDecoder
from agent.types import NO_INTERPRETER_STACK, InterpreterStack, InterpreterStatus, Stack, StackStatus
from tests.unit.test_probe_decode import (
    KERNEL,
    USER,
    cached_decode,
    decode,
    identity,
    in_buffer,
    sent_size,
    stack_record,
)

CODE_A, CODE_B, SHIM = 0x7F12_3400_0010, 0x7F12_3400_0F80, 0x7FFF_0000_2000
# Leaf first: (code | flags, instruction) per frame.
PYTHON = (CODE_A, 0x7F12_3400_0062, CODE_B | PYTHON_FRAME_ENTRY, 0x7F12_3400_0FC4, SHIM | PYTHON_FRAME_SHIM, 0)


def test_python_frames_follow_the_user_frames() -> None:
    record = stack_record(python=PYTHON)
    assert sent_size(record) == 104 + (len(KERNEL) + len(USER) + len(PYTHON)) * 8
    event = decode(record)
    assert event.python == InterpreterStack(InterpreterStatus.OK, PYTHON)
    assert (event.kernel, event.user) == (Stack(StackStatus.OK, KERNEL), Stack(StackStatus.OK, USER))
    assert event.identity == identity(record)  # the Python frames are part of the record's identity


def test_python_frames_without_native_frames() -> None:
    """A kernel thread never has them, but a user thread whose stacks failed still can."""
    event = decode(stack_record((), (), kernel_len=-14, user_len=-14, python=PYTHON[:2]))
    assert event.python.frames == PYTHON[:2]
    assert event.user.status is StackStatus.MISSING


@pytest.mark.parametrize(
    ("python_frames", "status"),
    [
        (PYTHON_NO_THREAD_STATE, InterpreterStatus.NO_THREAD_STATE),
        (PYTHON_READ_FAILED, InterpreterStatus.READ_FAILED),
        (PYTHON_NO_FSBASE, InterpreterStatus.NO_FSBASE),
    ],
)
def test_negative_counts_say_why_there_are_none(python_frames: int, status: InterpreterStatus) -> None:
    record = stack_record(python_frames=python_frames)
    assert sent_size(record) == 104 + (len(KERNEL) + len(USER)) * 8  # no slots sent
    event = decode(record)
    assert event.python == InterpreterStack(status)
    assert event.python.frames == ()


def test_no_walk_is_no_interpreter_stack() -> None:
    assert decode(stack_record()).python is NO_INTERPRETER_STACK


def test_the_truncation_flag() -> None:
    frames = tuple(range(8, 8 + 2 * PYTHON_MAX_FRAMES))
    event = decode(stack_record(python=frames, flags=SAMPLE_FLAG_PYTHON_TRUNCATED))
    assert event.python == InterpreterStack(InterpreterStatus.TRUNCATED, frames)
    assert not event.kernel_thread  # the flag is not the kernel-thread flag


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"python_frames": PYTHON_MAX_FRAMES + 1}, "129 Python frames exceed 128"),
        ({"python_frames": -4}, "python_frames -4"),
        ({"python_frames": -(2**31)}, "python_frames -2147483648"),
        ({"python_frames": 0, "flags": SAMPLE_FLAG_PYTHON_TRUNCATED}, "python_frames 0 truncated"),
        ({"python_frames": PYTHON_NO_THREAD_STATE, "flags": SAMPLE_FLAG_PYTHON_TRUNCATED}, "-1 truncated"),
    ],
)
def test_impossible_python_counts_are_malformed(fields: dict[str, int], message: str) -> None:
    record = stack_record(python_frames=fields["python_frames"], flags=fields.get("flags", 0))
    with pytest.raises(MalformedRecord, match=message):
        decode(record, 104 + (len(KERNEL) + len(USER)) * 8)


@pytest.mark.parametrize("missing_words", [1, 2, len(PYTHON)])
def test_python_frames_beyond_the_record_are_malformed(missing_words: int) -> None:
    record = stack_record(python=PYTHON)
    with pytest.raises(MalformedRecord, match="cannot hold 3 Python frames"):
        decode(record, sent_size(record) - 8 * missing_words)


def test_records_differing_only_in_their_python_frames_are_different_events() -> None:
    decoder = StackEventDecoder("cpu", StackDecoder(), (1,))
    variants = [
        stack_record(),
        stack_record(python=PYTHON),
        stack_record(python=PYTHON[:4]),
        stack_record(python=(CODE_A, 0x7F12_3400_0064, *PYTHON[2:])),  # another instruction
        stack_record(python_frames=PYTHON_NO_THREAD_STATE),
        stack_record(python_frames=PYTHON_READ_FAILED),
        stack_record(python=PYTHON, flags=SAMPLE_FLAG_PYTHON_TRUNCATED),
    ]
    events = [cached_decode(decoder, in_buffer(record)) for record in variants]
    assert len({event.identity for event in events}) == len(variants)
    assert len({event.python for event in events}) == len(variants)
    again = [cached_decode(decoder, in_buffer(record)) for record in variants]
    assert again == events and all(a.python is b.python for a, b in zip(again, events, strict=True))
    assert len(decoder) == len(variants)


def test_the_weighed_decoder_keeps_the_python_frames() -> None:
    decoder = StackEventDecoder("offcpu", StackDecoder(), lambda header: (1, header.value))
    first = cached_decode(decoder, in_buffer(stack_record(python=PYTHON, value=5)))
    second = cached_decode(decoder, in_buffer(stack_record(python=PYTHON, value=7)))
    assert first.python == second.python == InterpreterStack(InterpreterStatus.OK, PYTHON)
    assert (first.values, second.values) == ((1, 5), (1, 7))


def test_a_record_with_a_stack_copy_keeps_its_python_frames() -> None:
    """The Python frames sit after the user frames as always, and the copy right after them; the unwound
    event carries them."""
    sp, base = 0x7FFD0000_1010, 0x7FFD0000_1000
    record = stack_record(
        python=PYTHON, user_ip=0x401234, user_sp=sp, user_bp=sp + 32, user_stack_base=base, user_stack_bytes=512
    )
    copy = bytes(range(256)) * 2
    buffer = in_buffer(record, padding=copy)
    assert len(buffer) == STACK_EVENT_HEADER_SIZE + 8 * (len(KERNEL) + len(USER) + len(PYTHON)) + 512
    expected = InterpreterStack(InterpreterStatus.OK, PYTHON)
    in_full = cached_decode(StackEventDecoder("cpu", StackDecoder(), (1,)), buffer)
    assert in_full.python == expected
    assert in_full.user_copy == UserStackCopy(0x401234, sp, sp + 32, base, copy)

    def unwind(pid: int, user_copy: UserStackCopy, frame_pointer_stack: Stack) -> Stack:
        return frame_pointer_stack

    unwound = cached_decode(StackEventDecoder("cpu", StackDecoder(), (1,), unwind=unwind), buffer)
    assert unwound.python == expected
    assert unwound.user == Stack(StackStatus.OK, USER)
