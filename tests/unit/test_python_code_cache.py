"""Process stage: CodeCache: hits without reads, failures counted and not re-read until their TTL,
the LRU bound, and forgetting one process's entries."""

from __future__ import annotations

import struct

from agent.process.python.code_cache import CodeCache
from agent.process.python.layouts import PY312
from agent.process.python.objects import CodeErrorReason
from tests.support.fake_memory import CODE_TYPE, FakeMemory, ObjectImages

TABLE = bytes([0x80 | 13 << 3 | 3, 2])  # one entry: 4 code units, line +1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _images() -> ObjectImages:
    return ObjectImages(PY312, FakeMemory())


def test_hit_reads_nothing() -> None:
    images = _images()
    address = images.place_code("f", "m.f", "/m.py", 7, TABLE, 4)
    cache = CodeCache(8)
    assert cache.get(1, address) is None
    info = cache.resolve(1, images.memory, PY312, address, CODE_TYPE)
    assert info is not None and info.qualname == "m.f" and info.line_for(info.code_start + 6) == 8
    reads = images.memory.reads
    assert cache.resolve(1, images.memory, PY312, address, CODE_TYPE) is info
    assert cache.get(1, address) is info
    assert images.memory.reads == reads
    stats = cache.stats
    assert (stats.entries, stats.hits, stats.misses, dict(stats.failures)) == (1, 1, 1, {})
    # The same address in another process is another object.
    assert cache.resolve(2, images.memory, PY312, address, CODE_TYPE) is not info
    assert cache.stats.misses == 2


def test_failures_are_counted_and_not_reread_until_the_ttl() -> None:
    images = _images()
    address = images.place_code("f", "f", "/m.py", 7, TABLE, 4)
    clock = Clock()
    cache = CodeCache(8, negative_ttl=10.0, clock=clock)
    assert cache.resolve(1, images.memory, PY312, address, CODE_TYPE + 8) is None  # wrong type
    assert cache.resolve(1, images.memory, PY312, 0x10, CODE_TYPE) is None  # nothing there
    reads = images.memory.reads
    for _ in range(5):
        assert cache.resolve(1, images.memory, PY312, address, CODE_TYPE + 8) is None
    assert images.memory.reads == reads
    stats = cache.stats
    assert dict(stats.failures) == {CodeErrorReason.NOT_CODE: 1, CodeErrorReason.UNREADABLE: 1}
    assert (stats.negative_hits, stats.misses, stats.negative_entries) == (5, 2, 2)
    clock.now += 10.5
    assert cache.resolve(1, images.memory, PY312, address, CODE_TYPE) is not None  # expired: read again, fine now
    assert cache.stats.negative_entries == 1


def test_unreadable_reason() -> None:
    images = _images()
    cache = CodeCache(4)
    assert cache.resolve(1, images.memory, PY312, 0x6000_0000_0000, CODE_TYPE) is None
    assert dict(cache.stats.failures) == {"unreadable": 1}


def test_bounded() -> None:
    images = _images()
    addresses = [images.place_code(f"f{i}", f"f{i}", "/m.py", i + 1, TABLE, 4) for i in range(10)]
    cache = CodeCache(4)
    for address in addresses:
        assert cache.resolve(1, images.memory, PY312, address, CODE_TYPE) is not None
    stats = cache.stats
    assert (stats.entries, stats.evictions) == (4, 6)
    assert cache.get(1, addresses[0]) is None and cache.get(1, addresses[-1]) is not None


def test_forget_one_process() -> None:
    images = _images()
    address = images.place_code("f", "f", "/m.py", 1, TABLE, 4)
    cache = CodeCache(16)
    for pid in (1, 2):
        cache.resolve(pid, images.memory, PY312, address, CODE_TYPE)
        cache.resolve(pid, images.memory, PY312, 0x10, CODE_TYPE)
    assert (cache.stats.entries, cache.stats.negative_entries) == (2, 2)
    assert cache.forget(1) == 1
    assert cache.get(1, address) is None and cache.get(2, address) is not None
    assert (cache.stats.entries, cache.stats.negative_entries) == (1, 1)
    # After an exec the address is read again, not answered from the old process's entry.
    image = images.memory.regions[address]
    struct.pack_into("<i", image, PY312.code_firstlineno, 40)
    info = cache.resolve(1, images.memory, PY312, address, CODE_TYPE)
    assert info is not None and info.first_line == 40
