"""Tests for the symbolize stage's kernel symbol table (`agent.symbolize.kallsyms`)."""

from __future__ import annotations

from pathlib import Path

from agent.symbolize.kallsyms import KallsymsCache, load_kallsyms, parse_kallsyms
from agent.symbolize.stats import ErrorReason, SymbolizerStats
from agent.symbolize.types import KERNEL_MAPPING_NAME

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000100 t do_one_thing
ffffffff81000180 D some_data
ffffffff81000200 W weak_thing
ffffffff81000300 T _etext
ffffffffc0201000 t ext4_readpage\t[ext4]
ffffffffc0201080 T ext4_writepage\t[ext4]
0000000000000000 A fixed_percpu_data
ffffffff81000280 r rodata_thing
"""


def test_parse_keeps_text_symbols_sorted_and_drops_module_suffix() -> None:
    table, hidden = parse_kallsyms(KALLSYMS.splitlines())
    assert not hidden and table.usable
    assert len(table) == 6  # _text shares _stext's address; D, r and A symbols are not text
    assert table.lookup(0xFFFFFFFF81000000) == "_stext"  # first in file order wins at one address
    assert table.lookup(0xFFFFFFFF81000150) == "do_one_thing"
    assert table.lookup(0xFFFFFFFF81000180) == "do_one_thing"  # data symbols do not split functions
    assert table.lookup(0xFFFFFFFF81000210) == "weak_thing"
    assert table.lookup(0xFFFFFFFFC0201000) == "ext4_readpage"
    assert table.lookup(0xFFFFFFFFC02010FF) == "ext4_writepage"


def test_mapping_spans_the_kernel_text_and_lookups_outside_it_are_unnamed() -> None:
    table, _ = parse_kallsyms(KALLSYMS.splitlines())
    assert table.mapping.path == KERNEL_MAPPING_NAME
    assert table.mapping.start == 0xFFFFFFFF81000000
    assert 0xFFFFFFFFC0201080 < table.mapping.limit <= 0xFFFFFFFFC0201080 + 2 * 4096
    assert table.mapping.file_offset == 0
    assert table.lookup(0xFFFFFFFF80FFFFFF) == ""
    assert table.lookup(table.mapping.limit) == ""


def test_all_zero_addresses_mean_restricted_and_unusable(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text("".join(f"0000000000000000 {line.split(' ', 1)[1]}\n" for line in KALLSYMS.splitlines()))
    stats = SymbolizerStats()
    table = load_kallsyms(path, stats)
    assert not table.usable
    assert table.lookup(0xFFFFFFFF81000150) == ""
    assert table.mapping.start == 0 and table.mapping.limit == (1 << 64) - 1
    assert stats.errors[ErrorReason.KALLSYMS_RESTRICTED] == 1


def test_unreadable_kallsyms_is_counted_not_raised(tmp_path: Path) -> None:
    stats = SymbolizerStats()
    table = load_kallsyms(tmp_path / "missing", stats)
    assert not table.usable and len(table) == 0
    assert stats.errors[ErrorReason.KALLSYMS_UNREADABLE] == 1
    assert stats.kallsyms_loads == 0


def test_cache_reloads_only_after_the_interval(tmp_path: Path) -> None:
    """With a modules file that cannot be read (here a directory), the interval alone decides."""
    path = tmp_path / "kallsyms"
    path.write_text("ffffffff81000000 T first_name\n")
    (tmp_path / "modules").mkdir()
    now = [1000.0]
    stats = SymbolizerStats()
    cache = KallsymsCache(path, stats, reload_interval_s=300.0, clock=lambda: now[0])
    assert cache.size() == 0  # nothing parsed before first use
    assert cache.table().lookup(0xFFFFFFFF81000010) == "first_name"
    path.write_text("ffffffff81000000 T second_name\n")
    now[0] += 299.0
    assert cache.table().lookup(0xFFFFFFFF81000010) == "first_name"
    now[0] += 1.0
    assert cache.table().lookup(0xFFFFFFFF81000010) == "second_name"
    assert stats.kallsyms_loads == 2
    assert cache.size() == 1


def test_cache_reloads_only_when_the_modules_changed(tmp_path: Path) -> None:
    """Due for a reload, kallsyms is parsed again only if /proc/modules (its neighbour) changed."""
    path, modules = tmp_path / "kallsyms", tmp_path / "modules"
    path.write_text("ffffffff81000000 T first_name\n")
    modules.write_text("ext4 1000 1 - Live 0x0\n")
    now = [1000.0]
    stats = SymbolizerStats()
    cache = KallsymsCache(path, stats, reload_interval_s=300.0, clock=lambda: now[0])
    assert cache.table().lookup(0xFFFFFFFF81000010) == "first_name"
    path.write_text("ffffffff81000000 T second_name\n")
    now[0] += 300.0
    assert cache.table().lookup(0xFFFFFFFF81000010) == "first_name"  # same modules: not parsed again
    modules.write_text("ext4 1000 1 - Live 0x0\nxfs 2000 0 - Live 0x0\n")
    now[0] += 300.0
    assert cache.table().lookup(0xFFFFFFFF81000010) == "second_name"
    assert stats.kallsyms_loads == 2


def test_a_kernel_without_modules_has_its_kallsyms_read_once(tmp_path: Path) -> None:
    """No /proc/modules (a kernel built without module support, as this VM's): its text never changes,
    so kallsyms is not parsed again. Parsing it again every 300 s grew the agent's RSS by 15 MB in one
    step, which Python's allocator never handed back (#17)."""
    path = tmp_path / "kallsyms"
    path.write_text("ffffffff81000000 T first_name\n")
    now = [1000.0]
    stats = SymbolizerStats()
    cache = KallsymsCache(path, stats, reload_interval_s=300.0, clock=lambda: now[0])
    for _ in range(4):
        assert cache.table().lookup(0xFFFFFFFF81000010) == "first_name"
        now[0] += 300.0
    assert stats.kallsyms_loads == 1
