"""Process stage (stage-neutral): bounded caches, and the one of parsed ELF symbol tables.

This module owns `LruCache`, a small least-recently-used map on an `OrderedDict` (the unwind stage
bounds its unwind tables with it), and `ElfTableCache` (the symbolize stage's),
which keys symbol tables by ELF identity: the GNU build id when the file has one, else
(st_dev, st_ino, st_mtime_ns). A file that could not be parsed is cached as its `ElfReadError`
(a negative entry) under its (dev, ino, mtime) key, so a bad file is not parsed again every interval.
A table of exported symbols only (`ElfSymbols.complete` false) gives way to a complete one of the same
build id: stripped and unstripped copies of one build share the id but not the names.

Processes know their files by (dev, ino, mtime) only; a second, larger LRU maps that identity to the
table's key, so one binary seen through several identities (the same image in several containers) is
stored once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from agent.process.elf import ElfReadError, ElfSymbols
from agent.process.maps import FileIdentity

K = TypeVar("K")
V = TypeVar("V")

ElfKey = str | FileIdentity  # build id, else file identity
ElfEntry = ElfSymbols | ElfReadError


class LruCache(Generic[K, V]):
    """A map holding at most `capacity` items; inserting past it evicts the least recently used one."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"LRU capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.evictions = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.evictions += 1

    def pop(self, key: K) -> V | None:
        """Remove `key` (not an eviction); its value, or None when it was not there."""
        return self._items.pop(key, None)

    def key_list(self) -> list[K]:
        """The keys, least recently used first (a copy: the cache may change while it is used)."""
        return list(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class ElfTableCache:
    """Symbol tables (and negative entries) by ELF identity, at most `capacity` of them."""

    # Identity-to-key entries are two small tuples each; keeping several per table lets the identities
    # of several containers' copies of one binary all point at its single table.
    IDENTITIES_PER_TABLE = 4

    def __init__(self, capacity: int) -> None:
        self._tables: LruCache[ElfKey, ElfEntry] = LruCache(capacity)
        self._keys: LruCache[FileIdentity, ElfKey] = LruCache(capacity * self.IDENTITIES_PER_TABLE)

    def get(self, identity: FileIdentity) -> ElfEntry | None:
        """The table or cached error for the file with `identity`; None when it must be (re)loaded."""
        key = self._keys.get(identity)
        return self._tables.get(key) if key is not None else None

    def get_by_build_id(self, build_id: str) -> ElfSymbols | None:
        entry = self._tables.get(build_id) if build_id else None
        return entry if isinstance(entry, ElfSymbols) else None

    def put(self, identity: FileIdentity, entry: ElfEntry) -> None:
        key: ElfKey = entry.build_id if isinstance(entry, ElfSymbols) and entry.build_id else identity
        self._keys.put(identity, key)
        if key not in self._tables or isinstance(key, FileIdentity) or self._improves(key, entry):
            self._tables.put(key, entry)
        else:
            self._tables.get(key)  # already there under its build id: only refresh its recency

    def _improves(self, key: ElfKey, entry: ElfEntry) -> bool:
        """A complete table replaces an exports-only one of the same build id (a stripped copy seen first)."""
        cached = self._tables.get(key)
        return (
            isinstance(entry, ElfSymbols) and entry.complete and isinstance(cached, ElfSymbols) and not cached.complete
        )

    def sizes(self) -> dict[str, int]:
        return {"elf_tables": len(self._tables), "elf_identities": len(self._keys)}
