"""Probes stage: turns (generation, stack id) pairs from records into `Stack`s of addresses.

The BPF programs write stacks into one of two stack-trace maps, chosen by a generation number in a
control map. At each interval end `rotate()` clears the idle map and makes it the active one: every
record that referred to the idle map was emitted before the previous rotation and has been read by
now, so an id is never looked up after its bucket could have been reused for another stack. Lookups
are cached per generation; a cache is dropped when its map is cleared.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from agent.aggregate.types import EMPTY_STACK, Stack, StackStatus

logger = logging.getLogger(__name__)

# The kernel walks at most this many frames (PERF_MAX_STACK_DEPTH, BCC's stack-map value size).
MAX_STACK_DEPTH = 127

_ERRNO_STATUS = {
    errno.EFAULT: StackStatus.MISSING,
    errno.EEXIST: StackStatus.COLLISION,
    errno.ENOMEM: StackStatus.MAP_FULL,
}


class StackTable(Protocol):
    """What we need of a BCC `StackTrace` table."""

    def walk(self, stack_id: int) -> Iterable[int]: ...

    def clear(self) -> None: ...


class StackResolver:
    def __init__(self, tables: Sequence[StackTable], set_generation: Callable[[int], None]) -> None:
        if len(tables) != 2:
            raise ValueError("StackResolver needs exactly two stack tables")
        self._tables = tables
        self._set_generation = set_generation
        self._active = 0
        self._caches: tuple[dict[int, Stack], dict[int, Stack]] = ({}, {})
        self.status_counts: Counter[str] = Counter()
        set_generation(0)

    @property
    def active_generation(self) -> int:
        return self._active

    def resolve(self, generation: int, stack_id: int, *, kernel: bool, kernel_thread: bool = False) -> Stack:
        """The stack behind one id of one record. Never raises: failures become a non-OK status."""
        if stack_id < 0:
            return self._classify_error(-stack_id, kernel=kernel, kernel_thread=kernel_thread)
        cache = self._caches[generation]
        stack = cache.get(stack_id)
        if stack is None:
            stack = self._lookup(generation, stack_id)
            cache[stack_id] = stack
        self.status_counts[stack.status.name] += 1
        return stack

    def _classify_error(self, err: int, *, kernel: bool, kernel_thread: bool) -> Stack:
        # -EFAULT on the kernel stack means the sample hit user mode, and on the user stack of a kernel
        # thread that there is no user space: both are normal, not losses.
        if err == errno.EFAULT and (kernel or kernel_thread):
            return EMPTY_STACK
        status = _ERRNO_STATUS.get(err, StackStatus.ERROR)
        self.status_counts[status.name] += 1
        return Stack(status)

    def _lookup(self, generation: int, stack_id: int) -> Stack:
        try:
            addresses = tuple(self._tables[generation].walk(stack_id))
        except KeyError:
            return Stack(StackStatus.LOST)
        if not addresses:
            return Stack(StackStatus.LOST)
        status = StackStatus.TRUNCATED if len(addresses) >= MAX_STACK_DEPTH else StackStatus.OK
        return Stack(status, addresses)

    def rotate(self) -> None:
        """Clear the idle map and switch the programs to it (call at an interval end, after draining)."""
        idle = 1 - self._active
        try:
            self._tables[idle].clear()
        except OSError as e:  # the map stays usable; stale ids only cost collisions
            logger.warning("could not clear stack map %d: %s", idle, e)
        self._caches[idle].clear()
        self._set_generation(idle)
        self._active = idle
