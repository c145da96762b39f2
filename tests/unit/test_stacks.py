"""Tests for stack-id resolution and the two-generation stack maps (`agent.probes.stacks`)."""

from __future__ import annotations

import errno
from collections.abc import Iterable

import pytest

from agent.aggregate.types import EMPTY_STACK, Stack, StackStatus
from agent.probes.stacks import MAX_STACK_DEPTH, StackResolver


class FakeStackTable:
    """A BCC StackTrace stand-in: `walk` raises KeyError for an id the map does not hold."""

    def __init__(self, stacks: dict[int, tuple[int, ...]] | None = None) -> None:
        self.stacks: dict[int, tuple[int, ...]] = dict(stacks or {})
        self.walks: list[int] = []
        self.clears = 0
        self.clear_error: OSError | None = None

    def walk(self, stack_id: int) -> Iterable[int]:
        self.walks.append(stack_id)
        return iter(self.stacks[stack_id])

    def clear(self) -> None:
        self.clears += 1
        if self.clear_error is not None:
            raise self.clear_error
        self.stacks.clear()


class Resolver:
    """A StackResolver over two fake tables, recording set_generation calls."""

    def __init__(
        self, gen0: dict[int, tuple[int, ...]] | None = None, gen1: dict[int, tuple[int, ...]] | None = None
    ) -> None:
        self.tables = (FakeStackTable(gen0), FakeStackTable(gen1))
        self.generations: list[int] = []
        self.resolver = StackResolver(self.tables, self.generations.append)


@pytest.fixture
def r() -> Resolver:
    return Resolver({5: (0x1000, 0x2000, 0x3000)}, {5: (0xAAAA,), 9: (0xBBBB, 0xCCCC)})


def test_needs_exactly_two_tables() -> None:
    with pytest.raises(ValueError, match="exactly two"):
        StackResolver((FakeStackTable(),), lambda generation: None)


def test_starts_on_generation_zero(r: Resolver) -> None:
    assert r.generations == [0]
    assert r.resolver.active_generation == 0


def test_resolves_an_id_in_the_generation_it_names(r: Resolver) -> None:
    assert r.resolver.resolve(0, 5, kernel=False) == Stack(StackStatus.OK, (0x1000, 0x2000, 0x3000))
    assert r.resolver.resolve(1, 5, kernel=False) == Stack(StackStatus.OK, (0xAAAA,))
    assert r.resolver.resolve(1, 9, kernel=True) == Stack(StackStatus.OK, (0xBBBB, 0xCCCC))


def test_efault_on_the_kernel_stack_is_not_collected(r: Resolver) -> None:
    assert r.resolver.resolve(0, -errno.EFAULT, kernel=True) is EMPTY_STACK
    assert r.resolver.resolve(0, -errno.EFAULT, kernel=True, kernel_thread=True) is EMPTY_STACK
    assert r.resolver.status_counts == {}  # a sample in user mode is normal, not a loss


def test_efault_on_the_user_stack_of_a_kernel_thread_is_not_collected(r: Resolver) -> None:
    assert r.resolver.resolve(0, -errno.EFAULT, kernel=False, kernel_thread=True) is EMPTY_STACK
    assert r.resolver.status_counts == {}


def test_efault_on_a_user_stack_is_missing(r: Resolver) -> None:
    assert r.resolver.resolve(0, -errno.EFAULT, kernel=False) == Stack(StackStatus.MISSING)
    assert r.resolver.status_counts == {"MISSING": 1}


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize(
    ("err", "status"),
    [
        (errno.EEXIST, StackStatus.COLLISION),
        (errno.ENOMEM, StackStatus.MAP_FULL),
        (errno.EINVAL, StackStatus.ERROR),
        (1, StackStatus.ERROR),
    ],
)
def test_other_errors_are_classified(r: Resolver, err: int, status: StackStatus, kernel: bool) -> None:
    stack = r.resolver.resolve(1, -err, kernel=kernel)
    assert stack == Stack(status)
    assert stack.addresses == ()
    assert r.resolver.status_counts == {status.name: 1}
    assert r.tables[0].walks == r.tables[1].walks == []  # a negative id is never looked up


def test_missing_id_is_lost(r: Resolver) -> None:
    assert r.resolver.resolve(0, 9, kernel=False) == Stack(StackStatus.LOST)  # 9 is only in generation 1
    assert r.resolver.status_counts == {"LOST": 1}


def test_empty_walk_is_lost() -> None:
    r = Resolver({3: ()})
    assert r.resolver.resolve(0, 3, kernel=True) == Stack(StackStatus.LOST)


@pytest.mark.parametrize(
    ("depth", "status"),
    [(1, StackStatus.OK), (MAX_STACK_DEPTH - 1, StackStatus.OK), (MAX_STACK_DEPTH, StackStatus.TRUNCATED)],
)
def test_a_stack_at_the_depth_limit_is_truncated(depth: int, status: StackStatus) -> None:
    addresses = tuple(range(0x400000, 0x400000 + depth))
    r = Resolver({1: addresses})
    stack = r.resolver.resolve(0, 1, kernel=False)
    assert MAX_STACK_DEPTH == 127
    assert stack == Stack(status, addresses)


def test_lookups_are_cached_per_generation(r: Resolver) -> None:
    first = r.resolver.resolve(0, 5, kernel=False)
    for _ in range(3):
        assert r.resolver.resolve(0, 5, kernel=False) is first
    r.resolver.resolve(1, 5, kernel=False)
    r.resolver.resolve(0, 9, kernel=False)  # LOST
    r.resolver.resolve(0, 9, kernel=False)
    assert r.tables[0].walks == [5, 9]
    assert r.tables[1].walks == [5]
    assert r.resolver.status_counts == {"OK": 5, "LOST": 2}  # cached hits are counted too


def test_rotate_clears_the_idle_table_and_switches_to_it(r: Resolver) -> None:
    r.resolver.rotate()
    assert (r.tables[0].clears, r.tables[1].clears) == (0, 1)
    assert r.generations == [0, 1]
    assert r.resolver.active_generation == 1
    r.resolver.rotate()
    assert (r.tables[0].clears, r.tables[1].clears) == (1, 1)
    assert r.generations == [0, 1, 0]
    assert r.resolver.active_generation == 0


def test_rotate_drops_only_the_cleared_generations_cache(r: Resolver) -> None:
    r.resolver.resolve(0, 5, kernel=False)
    r.resolver.resolve(1, 5, kernel=False)
    r.resolver.rotate()  # clears generation 1
    r.tables[1].stacks[5] = (0xDDDD,)  # the kernel reuses the bucket for another stack
    assert r.resolver.resolve(1, 5, kernel=False) == Stack(StackStatus.OK, (0xDDDD,))
    assert r.resolver.resolve(0, 5, kernel=False) == Stack(StackStatus.OK, (0x1000, 0x2000, 0x3000))
    assert r.tables[1].walks == [5, 5]
    assert r.tables[0].walks == [5]


def test_a_stale_id_after_rotation_is_lost_not_served_from_cache(r: Resolver) -> None:
    r.resolver.resolve(1, 9, kernel=False)
    r.resolver.rotate()
    assert r.resolver.resolve(1, 9, kernel=False) == Stack(StackStatus.LOST)


def test_rotate_survives_a_failed_clear(r: Resolver, caplog: pytest.LogCaptureFixture) -> None:
    r.tables[1].clear_error = OSError(errno.EPERM, "Operation not permitted")
    r.resolver.resolve(1, 5, kernel=False)
    r.resolver.rotate()
    assert r.generations == [0, 1]
    assert r.resolver.active_generation == 1
    assert "could not clear stack map 1" in caplog.text
    r.resolver.resolve(1, 5, kernel=False)
    assert r.tables[1].walks == [5, 5]  # the cache was dropped all the same


def test_status_counts_accumulate_across_kinds(r: Resolver) -> None:
    r.resolver.resolve(0, 5, kernel=False)
    r.resolver.resolve(0, 5, kernel=True)
    r.resolver.resolve(0, -errno.EEXIST, kernel=True)
    r.resolver.resolve(0, -errno.EEXIST, kernel=False)
    r.resolver.resolve(0, -errno.ENOMEM, kernel=False)
    r.resolver.resolve(0, -errno.EFAULT, kernel=False)
    r.resolver.resolve(0, -errno.EFAULT, kernel=True)  # not counted
    r.resolver.resolve(0, 77, kernel=False)
    assert r.resolver.status_counts == {"OK": 2, "COLLISION": 2, "MAP_FULL": 1, "MISSING": 1, "LOST": 1}
