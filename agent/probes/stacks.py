"""Probes stage: turns the raw frames inside a record into `Stack`s, classifying what went wrong.

Records carry their stacks inline (see `bpf/common.h`): a length, or a negative errno from
`bpf_get_stack`, and that many addresses. Identical stacks recur constantly, so decoded `Stack`s are
cached by their raw bytes: a hit costs one dict lookup, and equal stacks share one object, which keeps
aggregation cheap. The cache is content-addressed, so it can never be stale; it is only bounded.

Every stack handed out is counted by status, except the ones that are no loss (`EMPTY_STACK`). The
counting is one list increment per event on the reader thread (`count`, by a pair's `signature`);
`status_counts`, read by the metrics stage on its own thread, folds what was counted since its last
read into a `Counter` by status name.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections import Counter

from agent.probes.records import MAX_STACK_DEPTH
from agent.types import EMPTY_STACK, Stack, StackStatus

CACHE_LIMIT = 65536

# A signature packs what one event's two stacks count as: a status per stack, or nothing (SLOTS - 1)
# for a stack that is no loss.
_NOTHING = len(StackStatus)
SLOTS = _NOTHING + 1
_STATUS_NAMES = {status.value: status.name for status in StackStatus}
_MISSING, _ERROR = Stack(StackStatus.MISSING), Stack(StackStatus.ERROR)


def _slot(stack: Stack) -> int:
    return _NOTHING if stack is EMPTY_STACK else int(stack.status)


class StackDecoder:
    def __init__(self, cache_limit: int = CACHE_LIMIT) -> None:
        self._cache: dict[bytes, Stack] = {}
        self._limit = cache_limit
        # Written only by the reader thread (`counts[signature] += 1`); `_folded` is what
        # `status_counts` has already taken from each slot.
        self.counts = [0] * (SLOTS * SLOTS)
        self._folded = [0] * (SLOTS * SLOTS)
        self._fold_lock = threading.Lock()
        self._status_counts: Counter[str] = Counter()

    @staticmethod
    def signature(first: Stack, second: Stack = EMPTY_STACK) -> int:
        """The slot of `counts` that one event with these stacks increments."""
        return _slot(first) * SLOTS + _slot(second)

    @property
    def status_counts(self) -> Counter[str]:
        """Stacks handed out so far, by status name (the stacks that are no loss are not counted)."""
        with self._fold_lock:
            counts, folded, totals = self.counts, self._folded, self._status_counts
            for signature, folded_so_far in enumerate(folded):
                new = counts[signature] - folded_so_far
                if new:
                    folded[signature] += new
                    for slot in divmod(signature, SLOTS):
                        if slot != _NOTHING:
                            totals[_STATUS_NAMES[slot]] += new
            return totals

    def decode(self, length: int, raw: bytes, *, kernel: bool, kernel_thread: bool = False) -> Stack:
        """`length` frames in `raw` (8 bytes each, leaf first), or `-errno` when none were captured; counted."""
        stack = self.stack(length, raw, kernel=kernel, kernel_thread=kernel_thread)
        self.counts[_slot(stack) * SLOTS + _NOTHING] += 1
        return stack

    def stack(self, length: int, raw: bytes, *, kernel: bool, kernel_thread: bool = False) -> Stack:
        """What `decode` returns, without counting it (the caller counts the event's pair)."""
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
            stack = Stack(status, addresses) if addresses else _MISSING
            self._cache[raw] = stack
        return stack

    def _classify_error(self, err: int, *, kernel: bool, kernel_thread: bool) -> Stack:
        # -EFAULT on the kernel stack means the sample hit user mode, and on the user stack of a kernel
        # thread that there is no user space: both are normal, not losses.
        if err == errno.EFAULT and (kernel or kernel_thread):
            return EMPTY_STACK
        return _MISSING if err == errno.EFAULT else _ERROR

    def __len__(self) -> int:
        return len(self._cache)
