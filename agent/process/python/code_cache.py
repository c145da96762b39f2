"""Process stage: the bounded cache of code objects read from Python processes.

This module owns `CodeCache`: `CodeInfo` by (pid, code object address) in an LRU of at most `limit`
entries, filled by `resolve` on a miss (one `read_code`). A failed read is counted by its reason and
remembered for `negative_ttl` seconds in a smaller LRU of its own, so an address that is not a code
object (a stale or garbage frame slot) is not read again on every sample that carries it. `forget(pid)`
drops a process's entries when it execs or is announced again: its addresses then mean other objects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from agent.process.cache import LruCache
from agent.process.memory import MemoryReader
from agent.process.python.layouts import PythonLayout
from agent.process.python.objects import CodeInfo, CodeReadError, read_code

logger = logging.getLogger(__name__)

NEGATIVE_TTL = 30.0  # seconds a failed address is not read again
NEGATIVE_SHARE = 4  # the negative LRU holds limit // NEGATIVE_SHARE entries (at least 1)

_Key = tuple[int, int]  # (pid, code object address)


@dataclass(frozen=True, slots=True)
class CodeCacheStats:
    entries: int
    negative_entries: int
    hits: int  # resolved from the cache
    misses: int  # read from the process (successfully or not)
    negative_hits: int  # a recently failed address, not read again
    evictions: int
    failures: Mapping[str, int]  # failed reads by CodeErrorReason


class CodeCache:
    """Code objects of live processes by (pid, address), bounded; safe to use from several threads."""

    def __init__(
        self, limit: int, *, negative_ttl: float = NEGATIVE_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._codes: LruCache[_Key, CodeInfo] = LruCache(limit)
        self._failed: LruCache[_Key, tuple[float, str]] = LruCache(max(1, limit // NEGATIVE_SHARE))
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._hits = self._misses = self._negative_hits = 0
        self._failures: Counter[str] = Counter()

    def get(self, pid: int, address: int) -> CodeInfo | None:
        """The cached code object, without reading the process (and without counting)."""
        with self._lock:
            return self._codes.get((pid, address))

    def resolve(
        self, pid: int, memory: MemoryReader, layout: PythonLayout, address: int, code_type_address: int
    ) -> CodeInfo | None:
        """The code object at `address` of `pid`: cached, else read now; None when it cannot be read."""
        key = (pid, address)
        with self._lock:
            cached = self._codes.get(key)
            if cached is not None:
                self._hits += 1
                return cached
            failed = self._failed.get(key)
            if failed is not None and failed[0] > self._clock():
                self._negative_hits += 1
                return None
            self._misses += 1
        try:
            info = read_code(memory, layout, address, code_type_address)
        except CodeReadError as e:
            with self._lock:
                self._failures[e.reason] += 1
                self._failed.put(key, (self._clock() + self._negative_ttl, e.reason))
            logger.debug("pid %d: code object at %#x: %s", pid, address, e)
            return None
        with self._lock:
            self._codes.put(key, info)
            self._failed.pop(key)
        return info

    def forget(self, pid: int) -> int:
        """Drop every entry (positive and negative) of `pid`; how many code objects were dropped."""
        with self._lock:
            dropped = 0
            for cache in (self._codes, self._failed):
                for key in cache.key_list():
                    if key[0] == pid:
                        cache.pop(key)
                        dropped += cache is self._codes
            return dropped

    @property
    def stats(self) -> CodeCacheStats:
        with self._lock:
            return CodeCacheStats(
                entries=len(self._codes),
                negative_entries=len(self._failed),
                hits=self._hits,
                misses=self._misses,
                negative_hits=self._negative_hits,
                evictions=self._codes.evictions,
                failures=MappingProxyType(dict(self._failures)),
            )
