"""Process stage: CodeCache: hits without reads, failures counted and not re-read until their TTL,
the LRU bound, forgetting one process's entries, and a freed code object's address reused by another."""

from __future__ import annotations

import struct

from agent.process.python.code_cache import CodeCache
from agent.process.python.layouts import PY312
from agent.process.python.objects import CodeErrorReason
from agent.types import split_code_key
from tests.support.fake_memory import CODE_TYPE, FakeMemory, ObjectImages
from tests.support.python_codes import code_key_at

TABLE = bytes([0x80 | 13 << 3 | 3, 2])  # one entry: 4 code units, line +1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _images() -> ObjectImages:
    return ObjectImages(PY312, FakeMemory())


def _place(images: ObjectImages, name: str, first_line: int) -> int:
    """A code object's key (address and fingerprint), as the walker would send it."""
    return code_key_at(images.memory, PY312, images.place_code(name, name, "/m.py", first_line, TABLE, 4))


def test_hit_reads_nothing() -> None:
    images = _images()
    address = code_key_at(images.memory, PY312, images.place_code("f", "m.f", "/m.py", 7, TABLE, 4))
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
    address = _place(images, "f", 7)
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
    addresses = [_place(images, f"f{i}", i + 1) for i in range(10)]
    cache = CodeCache(4)
    for address in addresses:
        assert cache.resolve(1, images.memory, PY312, address, CODE_TYPE) is not None
    stats = cache.stats
    assert (stats.entries, stats.evictions) == (4, 6)
    assert cache.get(1, addresses[0]) is None and cache.get(1, addresses[-1]) is not None


def test_forget_one_process() -> None:
    images = _images()
    address = _place(images, "f", 1)
    cache = CodeCache(16)
    for pid in (1, 2):
        cache.resolve(pid, images.memory, PY312, address, CODE_TYPE)
        cache.resolve(pid, images.memory, PY312, 0x10, CODE_TYPE)
    assert (cache.stats.entries, cache.stats.negative_entries) == (2, 2)
    assert cache.forget(1) == 1
    assert cache.get(1, address) is None and cache.get(2, address) is not None
    assert (cache.stats.entries, cache.stats.negative_entries) == (1, 1)
    # After an exec the key is read again, not answered from the old process's entry.
    misses = cache.stats.misses
    assert cache.resolve(1, images.memory, PY312, address, CODE_TYPE) is not None
    assert cache.stats.misses == misses + 1


def test_a_freed_code_objects_address_reused_by_another_is_told_apart() -> None:
    """CPython frees a module's body after its import and may allocate a function's code object at its
    address: the samples of each must be named after their own object (seen: every sample of a function
    named `<module>` of site.py)."""
    images = _images()
    old_key = _place(images, "<module>", 1)
    address = split_code_key(old_key)[0]
    cache = CodeCache(16)
    old = cache.resolve(1, images.memory, PY312, old_key, CODE_TYPE)
    assert old is not None and old.name == "<module>"
    # Freed, and another code object made at the same address (its own first line and file name).
    image = images.memory.regions[address]
    struct.pack_into("<i", image, PY312.code_firstlineno, 12)
    struct.pack_into("<Q", image, PY312.code_name, images.place_str("burn"))
    struct.pack_into("<Q", image, PY312.code_filename, images.place_str("/main.py"))
    new_key = code_key_at(images.memory, PY312, address)
    assert new_key != old_key
    new = cache.resolve(1, images.memory, PY312, new_key, CODE_TYPE)
    assert new is not None and (new.name, new.filename, new.first_line) == ("burn", "/main.py", 12)
    # Samples taken while the old object lived keep its name; both stay cached.
    assert cache.resolve(1, images.memory, PY312, old_key, CODE_TYPE) is old
    assert cache.get(1, new_key) is new and cache.stats.entries == 2


def test_a_sample_whose_code_object_was_replaced_before_it_was_read_is_unknown() -> None:
    images = _images()
    sampled_key = _place(images, "gone", 3)
    address = split_code_key(sampled_key)[0]
    image = images.memory.regions[address]
    struct.pack_into("<i", image, PY312.code_firstlineno, 30)  # replaced before the pipeline read it
    struct.pack_into("<Q", image, PY312.code_name, images.place_str("now"))
    cache = CodeCache(16)
    assert cache.resolve(1, images.memory, PY312, sampled_key, CODE_TYPE) is None
    assert dict(cache.stats.failures) == {CodeErrorReason.REPLACED: 1}
    # What was read is the object there now: cached under its own key, for the samples that carry it.
    reads = images.memory.reads
    now_key = code_key_at(images.memory, PY312, address)
    info = cache.get(1, now_key)
    assert info is not None and info.name == "now"
    assert cache.resolve(1, images.memory, PY312, now_key, CODE_TYPE) is info
    assert images.memory.reads == reads + 1  # code_key_at's own read only
    # The sampled key is remembered as failed: not read again on every sample that carries it.
    assert cache.resolve(1, images.memory, PY312, sampled_key, CODE_TYPE) is None
    assert cache.stats.negative_hits == 1
