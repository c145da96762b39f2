"""Flow: the bounded hand-off between the perf-buffer reader thread and the pipeline thread.

`put` never blocks (the reader must keep draining the kernel's buffers): when the queue is full the
oldest item is dropped and counted. `get_batch` hands the consumer everything queued so far.

Waking the consumer costs far more than queueing an item, so `put` does it only when it matters: for
an item of a `lazy` type (by default `StackEvent`, which is only summed until the next interval mark)
only once `wake_at` items are waiting; for any other item (an interval mark, a process event) at once.
A consumer that waits with a timeout takes whatever is waiting when the timeout ends, so lazy items
wait at most that long.
"""

from __future__ import annotations

import threading
from collections import deque
from itertools import repeat, starmap
from typing import Generic, TypeVar

from agent.probes.events import StackEvent

T = TypeVar("T")

WAKE_AT = 1024  # lazy items that wake the consumer (fewer when the queue is small)


class DropOldestQueue(Generic[T]):
    def __init__(self, capacity: int, *, lazy: tuple[type, ...] = (StackEvent,), wake_at: int = WAKE_AT) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._items: deque[T] = deque(maxlen=capacity)
        self._capacity = capacity
        self._lazy = frozenset(lazy)
        self._wake_at = max(1, min(wake_at, capacity // 4))
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._woken = False  # the event is set (written under the lock)
        self.dropped = 0

    def put(self, item: T) -> None:
        """Queue `item` (from one producer thread at a time); never blocks for longer than a batch is taken."""
        items = self._items
        if len(items) < self._capacity:
            items.append(item)  # atomic, and the consumer only takes: no lock on the common path
        else:
            with self._lock:  # full: count the drop exactly (the consumer may be taking right now)
                if len(items) == self._capacity:
                    self.dropped += 1  # deque(maxlen) evicts the oldest on append
                items.append(item)
        if self._woken or (item.__class__ in self._lazy and len(items) < self._wake_at):
            return  # already woken (taking a batch resets this before it counts the items), or it can wait
        with self._lock:
            if not self._woken:
                self._woken = True
                self._ready.set()

    def get_batch(self, timeout: float) -> list[T]:
        """Everything queued, after waiting up to `timeout` seconds to be woken (see the module docstring)."""
        self._ready.wait(timeout)
        with self._lock:
            self._ready.clear()
            self._woken = False
            items = self._items
            # Exactly as many as are here now: the producer may append meanwhile, without the lock.
            return list(starmap(items.popleft, repeat((), len(items))))

    def __len__(self) -> int:
        return len(self._items)
