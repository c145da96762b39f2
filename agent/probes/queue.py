"""Probes stage: the bounded hand-off between the perf-buffer reader thread and the pipeline thread.

`put` never blocks (the reader must keep draining the kernel's buffers): when the queue is full the
oldest event is dropped and counted. `get_batch` hands the consumer everything queued so far.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._items: deque[T] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.dropped = 0

    def put(self, item: T) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1  # deque(maxlen) evicts the oldest on append
            self._items.append(item)
        self._ready.set()

    def get_batch(self, timeout: float) -> list[T]:
        """Everything queued, waiting up to `timeout` seconds for the first item."""
        if not self._ready.wait(timeout):
            return []
        with self._lock:
            batch = list(self._items)
            self._items.clear()
            self._ready.clear()
        return batch

    def __len__(self) -> int:
        return len(self._items)
