"""Tests of JIT symbolization from perf maps (`agent.symbolize.perf_map`) through `Symbolizer` on a fake /proc.

Each fake process gets its own root directory (standing for `/proc/PID/root`) holding `tmp/perf-N.map`,
an anonymous executable mapping for the JIT code and a `status` file with its `NSpid:` line.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.registry import ProcessRegistry
from agent.symbolize.perf_map import PerfMapStore, parse_perf_map, read_nspid
from agent.symbolize.stats import ErrorReason, SymbolizerStats
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import Frame, FrameKind
from agent.types import ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import AddFakeProcess

SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
JIT = 0x7F0000000000  # the anonymous executable mapping spans JIT .. JIT + 0x10000
JIT_MAPS = [f"{JIT:x}-{JIT + 0x10000:x} rwxp 00000000 00:00 0 "]


def jit_process(
    add_fake_process: AddFakeProcess, pid: int, nspid: int | None = None, maps: list[str] = JIT_MAPS
) -> Path:
    """A fake process whose root is a directory of its own; returns that root's tmp directory."""
    pid_dir = add_fake_process(pid, maps, comm="node")
    (pid_dir / "root").unlink()
    tmp = pid_dir / "root" / "tmp"
    tmp.mkdir(parents=True)
    ids = f"{pid}" if nspid is None else f"{pid}\t{nspid}"
    (pid_dir / "status").write_text(f"Name:\tnode\nTgid:\t{pid}\nPid:\t{pid}\nNSpid:\t{ids}\n")
    return tmp


def perf_line(offset: int, size: int, name: str) -> str:
    return f"{JIT + offset:x} {size:x} {name}\n"


def frames(symbolizer: Symbolizer, pid: int, *addresses: int) -> tuple[Frame, ...]:
    key = SampleKey(
        pid=pid, tid=pid, cpu=0, kernel=Stack(StackStatus.NOT_COLLECTED), user=Stack(StackStatus.OK, addresses)
    )
    sample = AggregatedSample(key=key, thread_name="node", values=(1,), timestamps_mono_ns=(1_500,))
    return symbolizer.symbolize(IntervalProfile(SPEC, 1_000, 2_000, 0, (sample,))).samples[0].frames


def names(symbolizer: Symbolizer, pid: int, *addresses: int) -> list[str]:
    # Callers are looked up at their address minus one (pprof's convention): pass leaves one at a time.
    return [frames(symbolizer, pid, address)[0].function for address in addresses]


def test_jit_addresses_are_named_from_the_perf_map_and_keep_the_anon_mapping(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    tmp = jit_process(add_fake_process, 700)
    (tmp / "perf-700.map").write_text(
        perf_line(0x100, 0x40, "LazyCompile:*hot /app/server.js:12")
        + perf_line(0x200, 0x10, "Builtin:ArgumentsAdaptor")
    )
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(700)
    got = frames(symbolizer, 700, JIT + 0x13F, JIT + 0x205)
    assert [f.function for f in got] == ["LazyCompile:*hot /app/server.js:12", "Builtin:ArgumentsAdaptor"]
    assert all(f.kind is FrameKind.NATIVE for f in got)
    mapping = got[0].mapping
    assert mapping is not None and (mapping.path, mapping.start, mapping.limit) == ("", JIT, JIT + 0x10000)
    # One past an entry's end, and between entries, belongs to no function.
    assert names(symbolizer, 700, JIT + 0x140, JIT + 0x1FF, JIT + 0x210) == ["", "", ""]
    assert symbolizer.stats.perf_map_hits == 2 and symbolizer.stats.perf_map_misses == 3
    assert symbolizer.cache_sizes()["perf_maps"] == 1 and symbolizer.cache_sizes()["perf_map_entries"] == 2
    assert symbolizer.stats.errors.total() == 0


def test_growth_is_read_from_where_the_last_read_stopped(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    tmp = jit_process(add_fake_process, 701)
    path = tmp / "perf-701.map"
    path.write_text(perf_line(0x100, 0x10, "first") + "7f0000000300 10 unfini")  # a line still being written
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    assert names(symbolizer, 701, JIT + 0x100, JIT + 0x300) == ["first", ""]
    # Rewrite the parsed bytes in place (same size and inode): an incremental reader does not see it.
    data = path.read_bytes()
    path.write_bytes(data.replace(b"first", b"XXXXX") + b"shed\n" + perf_line(0x50, 0x10, "below").encode())
    assert names(symbolizer, 701, JIT + 0x100, JIT + 0x300, JIT + 0x55) == ["first", "unfinished", "below"]
    assert symbolizer.stats.perf_map_reads == 2
    assert symbolizer.stats.errors.total() == 0


def test_a_replaced_or_shrunk_file_is_read_again_from_the_start(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    tmp = jit_process(add_fake_process, 702)
    path = tmp / "perf-702.map"
    path.write_text(perf_line(0x100, 0x10, "old_a") + perf_line(0x200, 0x10, "old_b"))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    assert names(symbolizer, 702, JIT + 0x100, JIT + 0x200) == ["old_a", "old_b"]
    replacement = tmp / "new.map"
    replacement.write_text(perf_line(0x200, 0x10, "new_b"))
    os.replace(replacement, path)
    assert names(symbolizer, 702, JIT + 0x100, JIT + 0x200) == ["", "new_b"]
    assert symbolizer.cache_sizes()["perf_map_entries"] == 1


def test_same_start_later_line_wins(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    tmp = jit_process(add_fake_process, 703)
    path = tmp / "perf-703.map"
    path.write_text(perf_line(0x100, 0x10, "freed") + perf_line(0x300, 0x10, "other"))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    assert names(symbolizer, 703, JIT + 0x100) == ["freed"]
    with open(path, "a") as f:
        f.write(perf_line(0x100, 0x20, "reused"))
    assert names(symbolizer, 703, JIT + 0x100, JIT + 0x11F, JIT + 0x300) == ["reused", "reused", "other"]


def test_malformed_lines_are_counted_and_skipped(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    tmp = jit_process(add_fake_process, 704)
    (tmp / "perf-704.map").write_text(
        "not hex at all\n"
        + "7f0000000100\n"  # no size
        + "7f0000000100 0 zero_size\n"
        + "7f0000000100 10\n"  # no name
        + "ffffffffffffffff 10 wraps_around\n"
        + "\n"
        + perf_line(0x400, 0x10, "good one")
    )
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    assert names(symbolizer, 704, JIT + 0x100, JIT + 0x400) == ["", "good one"]
    assert symbolizer.stats.errors[ErrorReason.PERF_MAP_MALFORMED] == 5


def test_parse_accepts_0x_prefixes_and_names_with_spaces() -> None:
    entries, malformed = parse_perf_map(b"0x1000 0x20 Interpreted void Foo.bar(int) \n2000 8 py::main:/app/x.py\n")
    assert entries == [(0x1000, 0x1020, "Interpreted void Foo.bar(int)"), (0x2000, 0x2008, "py::main:/app/x.py")]
    assert malformed == 0


def test_container_process_uses_its_namespace_pid(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    tmp = jit_process(add_fake_process, 705, nspid=7)
    (tmp / "perf-705.map").write_text(perf_line(0x100, 0x10, "wrong_file"))  # the host pid's name: not this one
    (tmp / "perf-7.map").write_text(perf_line(0x100, 0x10, "in_container"))
    assert read_nspid(fake_proc, 705) == 7
    assert names(Symbolizer(ProcessRegistry(fake_proc)), 705, JIT + 0x100) == ["in_container"]


def test_address_outside_every_mapping_is_named_from_the_perf_map(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    tmp = jit_process(add_fake_process, 706, maps=[])
    (tmp / "perf-706.map").write_text(perf_line(0x100, 0x10, "unmapped_since"))
    frame = frames(Symbolizer(ProcessRegistry(fake_proc)), 706, JIT + 0x108)[0]
    assert (frame.function, frame.mapping) == ("unmapped_since", None)


def test_process_without_perf_map_keeps_mapping_and_address(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    jit_process(add_fake_process, 707)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(707)
    frame = frames(symbolizer, 707, JIT + 0x100)[0]
    assert (frame.function, frame.address) == ("", JIT + 0x100)
    assert frame.mapping is not None and frame.mapping.start == JIT
    assert symbolizer.stats.perf_map_misses == 1 and symbolizer.stats.errors.total() == 0


def test_map_is_read_at_observe_even_before_any_code_is_mapped(
    fake_proc: Path,
    add_fake_process: AddFakeProcess,
    symbolize_binaries: dict[str, Path],
    maps_for: Callable[..., list[str]],
) -> None:
    # A runtime's first sample comes before it maps its code space: the snapshot shows only files.
    tmp = jit_process(add_fake_process, 708, maps=maps_for(symbolize_binaries["pie"], 0x555555554000))
    (tmp / "perf-708.map").write_text(perf_line(0x100, 0x10, "compiled_later"))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(708)
    assert symbolizer.cache_sizes()["perf_maps"] == 1
    shutil.rmtree(fake_proc / "708")  # exits before the interval ends
    frame = frames(symbolizer, 708, JIT + 0x104)[0]
    assert (frame.function, frame.mapping) == ("compiled_later", None)


def test_processes_without_a_perf_map_are_not_counted(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    jit_process(add_fake_process, 715)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    for _ in range(2):
        symbolizer.processes.observe_process(715)
    assert symbolizer.cache_sizes()["perf_maps"] == 0 and symbolizer.stats.errors.total() == 0


def test_map_read_at_observe_survives_the_process(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    tmp = jit_process(add_fake_process, 709)
    (tmp / "perf-709.map").write_text(perf_line(0x100, 0x10, "seen_alive"))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(709)
    shutil.rmtree(fake_proc / "709")
    assert names(symbolizer, 709, JIT + 0x100) == ["seen_alive"]


def test_after_exit_the_host_file_is_read_only_when_it_is_the_same_file(
    fake_proc: Path, add_fake_process: AddFakeProcess, tmp_path: Path
) -> None:
    jit_process(add_fake_process, 710)
    host = tmp_path / "host"  # a host-namespace process: /proc/710/root is the host's /
    (host / "tmp").mkdir(parents=True)
    shutil.rmtree(fake_proc / "710" / "root")
    (fake_proc / "710" / "root").symlink_to(host)
    path = host / "tmp" / "perf-710.map"
    path.write_text(perf_line(0x100, 0x10, "early"))
    store = PerfMapStore(fake_proc, SymbolizerStats(), host_tmp=host / "tmp")
    store.observe(710)
    with open(path, "a") as f:
        f.write(perf_line(0x200, 0x10, "just_before_exit"))
    shutil.rmtree(fake_proc / "710")  # the process exits: /proc/710 goes, its file in /tmp stays
    store.begin_call()
    assert [store.lookup(710, JIT + 0x100), store.lookup(710, JIT + 0x200)] == ["early", "just_before_exit"]
    # Another file under that name (a later process with the same pid) is never taken for it.
    other = host / "tmp" / "other.map"
    other.write_text(perf_line(0x100, 0x10, "someone_else") + perf_line(0x300, 0x10, "someone_else"))
    os.replace(other, path)
    store.begin_call()
    assert [store.lookup(710, JIT + 0x100), store.lookup(710, JIT + 0x300)] == ["early", ""]


def test_entries_past_the_budget_are_dropped_and_counted(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    tmp_a, tmp_b = jit_process(add_fake_process, 711), jit_process(add_fake_process, 712)
    (tmp_a / "perf-711.map").write_text("".join(perf_line(0x10 * i, 0x10, f"a{i}") for i in range(3)))
    (tmp_b / "perf-712.map").write_text("".join(perf_line(0x10 * i, 0x10, f"b{i}") for i in range(3)))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), perf_map_max_entries=4)
    assert names(symbolizer, 711, JIT, JIT + 0x10, JIT + 0x20) == ["a0", "a1", "a2"]
    assert names(symbolizer, 712, JIT, JIT + 0x10, JIT + 0x20) == ["b0", "", ""]
    assert symbolizer.cache_sizes()["perf_map_entries"] == 4
    assert symbolizer.stats.perf_map_entries_dropped == 2
    assert symbolizer.stats.errors[ErrorReason.PERF_MAP_FULL] == 1


def test_the_map_lives_as_long_as_the_processs_snapshot(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    tmp = jit_process(add_fake_process, 713)
    (tmp / "perf-713.map").write_text(perf_line(0x100, 0x10, "f"))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc, ttl_intervals=1))
    symbolizer.processes.observe_process(713)
    assert symbolizer.cache_sizes()["perf_map_entries"] == 1
    symbolizer.processes.on_exec(713)  # a new image rewrites the file if it has one: the map stays until then
    symbolizer.processes.observe_process(713)
    assert symbolizer.cache_sizes()["perf_maps"] == 1
    frames(symbolizer, 999, 0x10)  # an interval without pid 713: its snapshot expires, and its map with it
    assert symbolizer.cache_sizes()["perf_maps"] == 0 and symbolizer.cache_sizes()["perf_map_entries"] == 0


@pytest.mark.parametrize("exit_state", ["gone", "zombie"])
def test_a_process_announced_again_as_it_exits_keeps_its_snapshot_and_map(
    fake_proc: Path, add_fake_process: AddFakeProcess, exit_state: str
) -> None:
    # A runtime's main thread exits before its other threads: the probe announces the pid again, which
    # the pipeline passes on as on_exec + observe, by then of a process with no memory (or no /proc).
    tmp = jit_process(add_fake_process, 716)
    (tmp / "perf-716.map").write_text(perf_line(0x100, 0x10, "js_function"))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(716)
    if exit_state == "gone":
        shutil.rmtree(fake_proc / "716")
    else:
        (fake_proc / "716" / "maps").write_text("")
    symbolizer.processes.on_exec(716)
    symbolizer.processes.observe_process(716)
    frame = frames(symbolizer, 716, JIT + 0x100)[0]
    assert frame.function == "js_function"
    assert frame.mapping is not None and frame.mapping.start == JIT
    assert symbolizer.processes.stats.vanished >= 1


def test_a_retired_snapshot_is_dropped_after_two_intervals(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    jit_process(add_fake_process, 717)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(717)
    symbolizer.processes.on_exec(717)
    frames(symbolizer, 999, 0x10)
    frames(symbolizer, 999, 0x10)
    shutil.rmtree(fake_proc / "717")
    assert frames(symbolizer, 717, JIT + 0x100)[0].mapping is None


@pytest.mark.parametrize("content", [b"\xff\xfe garbage \x00\x01", b"7f0000000100 10 caf\xc3\xa9 \xff\n"])
def test_binary_garbage_never_raises(fake_proc: Path, add_fake_process: AddFakeProcess, content: bytes) -> None:
    tmp = jit_process(add_fake_process, 714)
    (tmp / "perf-714.map").write_bytes(content)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    name = names(symbolizer, 714, JIT + 0x100)[0]
    assert name in ("", "caf\u00e9 \ufffd")
    name.encode("utf-8")
