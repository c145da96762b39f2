"""Tests for decoding the inline stacks of a record into `Stack`s (`agent.probes.stacks.StackDecoder`)."""

from __future__ import annotations

import errno
import struct

import pytest

from agent.probes.records import MAX_STACK_DEPTH
from agent.probes.stacks import CACHE_LIMIT, StackDecoder
from agent.types import EMPTY_STACK, Stack, StackStatus

USER = (0x401000, 0x402000, 0x403000)
KERNEL = (0xFFFFFFFF81000000, 0xFFFFFFFF81000100)


def pack(addresses: tuple[int, ...]) -> bytes:
    """The frames as the kernel writes them into `ips`: u64 little-endian, leaf first."""
    return struct.pack(f"<{len(addresses)}Q", *addresses)


def decode(decoder: StackDecoder, addresses: tuple[int, ...], *, kernel: bool = False) -> Stack:
    return decoder.decode(len(addresses), pack(addresses), kernel=kernel)


@pytest.fixture
def decoder() -> StackDecoder:
    return StackDecoder()


def test_depth_limit_is_the_kernels() -> None:
    assert MAX_STACK_DEPTH == 127
    assert CACHE_LIMIT > 0


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("addresses", [USER, KERNEL, (0x1,), (2**64 - 1, 1)])
def test_decodes_frames_leaf_first(decoder: StackDecoder, addresses: tuple[int, ...], kernel: bool) -> None:
    stack = decode(decoder, addresses, kernel=kernel)
    assert stack == Stack(StackStatus.OK, addresses)
    assert type(stack.addresses) is tuple
    assert decoder.status_counts == {"OK": 1}


def test_frames_are_little_endian_u64() -> None:
    raw = bytes.fromhex("0010400000000000") + bytes.fromhex("efcdab8967452301")
    assert StackDecoder().decode(2, raw, kernel=False) == Stack(StackStatus.OK, (0x401000, 0x0123456789ABCDEF))


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("kernel_thread", [True, False])
def test_zero_frames_is_not_collected(decoder: StackDecoder, kernel: bool, kernel_thread: bool) -> None:
    # A user-mode sample has no kernel frames: that is no loss, and nothing is counted or cached.
    assert decoder.decode(0, b"", kernel=kernel, kernel_thread=kernel_thread) is EMPTY_STACK
    assert decoder.status_counts == {}
    assert len(decoder) == 0


@pytest.mark.parametrize(
    ("depth", "status"),
    [(1, StackStatus.OK), (MAX_STACK_DEPTH - 1, StackStatus.OK), (MAX_STACK_DEPTH, StackStatus.TRUNCATED)],
)
@pytest.mark.parametrize("kernel", [True, False])
def test_a_stack_at_the_depth_limit_is_truncated(depth: int, status: StackStatus, kernel: bool) -> None:
    addresses = tuple(range(0x400000, 0x400000 + depth))
    decoder = StackDecoder()
    stack = decode(decoder, addresses, kernel=kernel)
    assert stack == Stack(status, addresses)  # a truncated stack keeps every frame it has
    assert decoder.status_counts == {status.name: 1}


@pytest.mark.parametrize("kernel_thread", [True, False])
def test_efault_on_the_kernel_stack_is_not_collected(decoder: StackDecoder, kernel_thread: bool) -> None:
    assert decoder.decode(-errno.EFAULT, b"", kernel=True, kernel_thread=kernel_thread) is EMPTY_STACK
    assert decoder.status_counts == {}  # a sample in user mode is normal, not a loss


def test_efault_on_the_user_stack_of_a_kernel_thread_is_not_collected(decoder: StackDecoder) -> None:
    assert decoder.decode(-errno.EFAULT, b"", kernel=False, kernel_thread=True) is EMPTY_STACK
    assert decoder.status_counts == {}


def test_efault_on_a_user_stack_is_missing(decoder: StackDecoder) -> None:
    stack = decoder.decode(-errno.EFAULT, b"", kernel=False)
    assert stack == Stack(StackStatus.MISSING)
    assert stack.addresses == ()
    assert decoder.status_counts == {"MISSING": 1}


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("kernel_thread", [True, False])
@pytest.mark.parametrize("err", [errno.EINVAL, errno.EEXIST, errno.ENOMEM, errno.ENOENT, 1, 2**31])
def test_other_errors_are_errors(decoder: StackDecoder, err: int, kernel: bool, kernel_thread: bool) -> None:
    stack = decoder.decode(-err, b"", kernel=kernel, kernel_thread=kernel_thread)
    assert stack == Stack(StackStatus.ERROR)
    assert stack.addresses == ()
    assert decoder.status_counts == {"ERROR": 1}
    assert len(decoder) == 0  # errors are not cached


def test_equal_raw_bytes_return_the_same_object(decoder: StackDecoder) -> None:
    first = decode(decoder, USER)
    for _ in range(3):
        # A fresh bytes object each time, as every perf-buffer record gives.
        assert decoder.decode(len(USER), bytes(bytearray(pack(USER))), kernel=False) is first
    assert decode(decoder, USER, kernel=True) is first  # a stack is its addresses, whichever side
    assert len(decoder) == 1
    assert decoder.status_counts == {"OK": 5}  # cached hits are counted too


def test_different_raw_bytes_are_different_stacks(decoder: StackDecoder) -> None:
    a = decode(decoder, USER)
    b = decode(decoder, USER[:2])
    c = decode(decoder, USER[::-1])
    assert (a.addresses, b.addresses, c.addresses) == (USER, USER[:2], USER[::-1])
    assert len(decoder) == 3


def test_truncated_stacks_are_cached_with_their_status(decoder: StackDecoder) -> None:
    addresses = tuple(range(1, MAX_STACK_DEPTH + 1))
    first = decode(decoder, addresses)
    assert first.status is StackStatus.TRUNCATED
    assert decode(decoder, addresses) is first
    assert decoder.status_counts == {"TRUNCATED": 2}


def test_cache_is_cleared_when_the_limit_is_reached() -> None:
    decoder = StackDecoder(cache_limit=2)
    a = decode(decoder, (0xA,))
    b = decode(decoder, (0xB,))
    assert len(decoder) == 2
    assert decode(decoder, (0xA,)) is a  # a hit never evicts
    assert len(decoder) == 2
    c = decode(decoder, (0xC,))  # a miss at the limit starts afresh
    assert c == Stack(StackStatus.OK, (0xC,))
    assert len(decoder) == 1
    assert decode(decoder, (0xC,)) is c
    a_again = decode(decoder, (0xA,))
    assert a_again == a and a_again is not a  # decoded anew after the clear
    assert decode(decoder, (0xB,)) is not b
    assert len(decoder) == 1  # (0xB,) found the cache full again
    assert decoder.status_counts == {"OK": 7}


def test_cache_never_exceeds_its_limit() -> None:
    decoder = StackDecoder(cache_limit=5)
    for i in range(23):
        decode(decoder, (0x1000 + i,))
        assert 1 <= len(decoder) <= 5


def test_status_counts_accumulate_across_kinds(decoder: StackDecoder) -> None:
    decode(decoder, USER)
    decode(decoder, KERNEL, kernel=True)
    decode(decoder, USER)
    decode(decoder, tuple(range(1, MAX_STACK_DEPTH + 1)))
    decoder.decode(-errno.EFAULT, b"", kernel=False)
    decoder.decode(-errno.EFAULT, b"", kernel=False)
    decoder.decode(-errno.EFAULT, b"", kernel=True)  # not counted
    decoder.decode(-errno.EFAULT, b"", kernel=False, kernel_thread=True)  # not counted
    decoder.decode(0, b"", kernel=True)  # not counted
    decoder.decode(-errno.EINVAL, b"", kernel=True)
    decoder.decode(-errno.ENOMEM, b"", kernel=False)
    assert decoder.status_counts == {"OK": 3, "TRUNCATED": 1, "MISSING": 2, "ERROR": 2}


def test_a_zero_return_address_ends_the_stack() -> None:
    decoder = StackDecoder()
    raw = struct.pack("<3Q", 0x7F0000001BD3, 0, 0x401000)
    assert decoder.decode(3, raw, kernel=False) == Stack(StackStatus.OK, (0x7F0000001BD3,))
    assert decoder.decode(1, struct.pack("<Q", 0), kernel=False) == Stack(StackStatus.MISSING)


def test_status_counts_keep_counting_between_reads(decoder: StackDecoder) -> None:
    decode(decoder, USER)
    assert decoder.status_counts == {"OK": 1}
    decode(decoder, USER)
    decoder.decode(-errno.EINVAL, b"", kernel=True)
    assert decoder.status_counts == {"OK": 2, "ERROR": 1}
    assert decoder.status_counts == {"OK": 2, "ERROR": 1}  # a read takes nothing twice


def test_a_pair_signature_counts_both_stacks_of_an_event(decoder: StackDecoder) -> None:
    ok = decoder.stack(len(USER), pack(USER), kernel=False)
    missing = decoder.stack(-errno.EFAULT, b"", kernel=False)
    assert decoder.status_counts == {}  # `stack` hands out without counting
    decoder.counts[decoder.signature(ok, missing)] += 2
    decoder.counts[decoder.signature(EMPTY_STACK, ok)] += 1
    decoder.counts[decoder.signature(EMPTY_STACK, EMPTY_STACK)] += 5  # no loss: nothing to count
    assert decoder.status_counts == {"OK": 3, "MISSING": 2}


def test_status_counts_is_one_counter_that_can_be_added_to(decoder: StackDecoder) -> None:
    decoder.status_counts.update({"OK": 5})
    decode(decoder, USER)
    assert decoder.status_counts == {"OK": 6}
