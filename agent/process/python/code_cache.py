"""Process stage: the bounded cache of code objects read from Python processes.

This module owns `CodeCache`: `CodeInfo` by (pid, code key) in an LRU of at most `limit` entries,
filled by `resolve` on a miss (one `read_code`). A code key is the address with the fingerprint the BPF
walker read beside it (`agent.types.code_key`): CPython frees code objects while the process runs (a
module's body once imported, exec'd code) and allocates others at their addresses, so an entry by
address alone would name every later sample after the first object read there. A read whose object has
another fingerprint than the sample's is the new object: it is cached under its own key, and the sample's
key fails as `replaced`. A failed read is counted by its reason and remembered for `negative_ttl` seconds
in a smaller LRU of its own, so a key that names no readable code object (a stale or garbage frame slot)
is not read again on every sample that carries it. `forget(pid)` drops a process's entries when it execs
or is announced again: its addresses then mean other objects.
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
from agent.process.python.objects import CodeErrorReason, CodeInfo, CodeReadError, read_code
from agent.types import code_key, split_code_key

logger = logging.getLogger(__name__)

NEGATIVE_TTL = 30.0  # seconds a failed key is not read again
NEGATIVE_SHARE = 4  # the negative LRU holds limit // NEGATIVE_SHARE entries (at least 1)

_Key = tuple[int, int]  # (pid, code key)


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
    """Code objects of live processes by (pid, code key), bounded; safe to use from several threads."""

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

    def get(self, pid: int, key: int) -> CodeInfo | None:
        """The cached code object, without reading the process (and without counting)."""
        with self._lock:
            return self._codes.get((pid, key))

    def resolve(
        self, pid: int, memory: MemoryReader, layout: PythonLayout, key: int, code_type_address: int
    ) -> CodeInfo | None:
        """The code object `key` (address and fingerprint) of `pid`: cached, else read now; None when it
        cannot be read, or the object at its address now is another one."""
        address, fingerprint = split_code_key(key)
        entry = (pid, key)
        with self._lock:
            cached = self._codes.get(entry)
            if cached is not None:
                self._hits += 1
                return cached
            failed = self._failed.get(entry)
            if failed is not None and failed[0] > self._clock():
                self._negative_hits += 1
                return None
            self._misses += 1
        try:
            info = read_code(memory, layout, address, code_type_address)
            if info.fingerprint != fingerprint:
                with self._lock:  # the object there now: later samples carry its key
                    self._codes.put((pid, code_key(address, info.fingerprint)), info)
                detail = f"fingerprint {info.fingerprint:#06x}, the sample's {fingerprint:#06x}"
                raise CodeReadError(address, CodeErrorReason.REPLACED, detail)
        except CodeReadError as e:
            with self._lock:
                self._failures[e.reason] += 1
                self._failed.put(entry, (self._clock() + self._negative_ttl, e.reason))
            logger.debug("pid %d: code object at %#x: %s", pid, address, e)
            return None
        with self._lock:
            self._codes.put(entry, info)
            self._failed.pop(entry)
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
