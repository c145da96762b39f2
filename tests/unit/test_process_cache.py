"""Tests of the process stage's bounded caches (`agent.process.cache`)."""

from __future__ import annotations

from array import array

import pytest

from agent.process.cache import ElfTableCache, LruCache
from agent.process.elf import ElfErrorReason, ElfReadError, ElfSymbols
from agent.process.maps import FileIdentity


def _table(build_id: str) -> ElfSymbols:
    return ElfSymbols(build_id, "ET_DYN", (), array("Q", [0x1000]), array("Q", [0x1010]), ("f",))


def test_lru_evicts_least_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now more recent than b
    cache.put("c", 3)
    assert "b" not in cache
    assert cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2 and cache.evictions == 1


def test_lru_put_of_existing_key_refreshes_without_growing() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    cache.put("c", 3)
    assert cache.get("a") == 10 and "b" not in cache


def test_lru_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LruCache[str, int](0)


def test_tables_are_keyed_by_build_id_across_identities() -> None:
    cache = ElfTableCache(4)
    first, second = FileIdentity(1, 10, 100), FileIdentity(2, 20, 200)
    table = _table("abc123")
    cache.put(first, table)
    assert cache.get_by_build_id("abc123") is table
    cache.put(second, _table("abc123"))  # the same binary parsed through another container's path
    assert cache.get(second) is table
    assert cache.sizes() == {"elf_tables": 1, "elf_identities": 2}


def test_tables_without_build_id_are_keyed_by_identity() -> None:
    cache = ElfTableCache(4)
    first, second = FileIdentity(1, 10, 100), FileIdentity(1, 10, 101)  # same inode, rewritten file
    cache.put(first, _table(""))
    assert cache.get(first) is not None
    assert cache.get(second) is None
    assert cache.get_by_build_id("") is None


def test_negative_entries_are_cached_by_identity() -> None:
    cache = ElfTableCache(4)
    identity = FileIdentity(1, 10, 100)
    error = ElfReadError(ElfErrorReason.NOT_ELF, "/bin/script", "no ELF magic")
    cache.put(identity, error)
    assert cache.get(identity) is error


def test_table_eviction_makes_identity_miss() -> None:
    cache = ElfTableCache(1)
    first, second = FileIdentity(1, 1, 1), FileIdentity(2, 2, 2)
    cache.put(first, _table("aa"))
    cache.put(second, _table("bb"))
    assert cache.get(first) is None
    assert cache.get(second) is not None


def test_lru_pop_and_key_list() -> None:
    from agent.process.cache import LruCache

    cache: LruCache[str, int] = LruCache(3)
    for key, value in (("a", 1), ("b", 2), ("c", 3)):
        cache.put(key, value)
    cache.get("a")
    assert cache.key_list() == ["b", "c", "a"]
    assert cache.pop("b") == 2 and cache.pop("b") is None
    assert (len(cache), cache.evictions) == (2, 0)
