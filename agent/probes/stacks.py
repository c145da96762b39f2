"""Probes stage: turns the raw frames inside a record into `Stack`s, classifying what went wrong.

Records carry their stacks inline (see `bpf/common.h`): a length, or a negative errno from
`bpf_get_stack`, and that many addresses. Identical stacks recur constantly, so decoded `Stack`s are
cached by their raw bytes: a hit costs one dict lookup, and equal stacks share one object, which keeps
aggregation cheap. The cache is content-addressed, so it can never be stale; it is only bounded.
"""

from __future__ import annotations

import errno
import struct
from collections import Counter

from agent.aggregate.types import EMPTY_STACK, Stack, StackStatus
from agent.probes.records import MAX_STACK_DEPTH

CACHE_LIMIT = 65536


class StackDecoder:
    def __init__(self, cache_limit: int = CACHE_LIMIT) -> None:
        self._cache: dict[bytes, Stack] = {}
        self._limit = cache_limit
        self.status_counts: Counter[str] = Counter()

    def decode(self, length: int, raw: bytes, *, kernel: bool, kernel_thread: bool = False) -> Stack:
        """`length` frames in `raw` (8 bytes each, leaf first), or `-errno` when none were captured."""
        if length < 0:
            return self._classify_error(-length, kernel=kernel, kernel_thread=kernel_thread)
        if length == 0:
            return EMPTY_STACK  # a user-mode sample has no kernel frames, and that is no loss
        stack = self._cache.get(raw)
        if stack is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()  # cheaper than LRU bookkeeping on every hit; refills in one interval
            status = StackStatus.TRUNCATED if length >= MAX_STACK_DEPTH else StackStatus.OK
            addresses = struct.unpack(f"<{length}Q", raw)
            if 0 in addresses:
                # A frame-pointer walk can end on a zero return address (a thread's outermost frame,
                # or a frame pointer used as a general register): nothing real lies at or beyond it.
                addresses = addresses[: addresses.index(0)]
            stack = Stack(status, addresses) if addresses else Stack(StackStatus.MISSING)
            self._cache[raw] = stack
        self.status_counts[stack.status.name] += 1
        return stack

    def _classify_error(self, err: int, *, kernel: bool, kernel_thread: bool) -> Stack:
        # -EFAULT on the kernel stack means the sample hit user mode, and on the user stack of a kernel
        # thread that there is no user space: both are normal, not losses.
        if err == errno.EFAULT and (kernel or kernel_thread):
            return EMPTY_STACK
        status = StackStatus.MISSING if err == errno.EFAULT else StackStatus.ERROR
        self.status_counts[status.name] += 1
        return Stack(status)

    def __len__(self) -> int:
        return len(self._cache)
