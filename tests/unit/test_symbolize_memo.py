"""Tests of the symbolize memos that outlive one `Symbolizer.symbolize` call (`agent.symbolize.native`).

A steady workload's addresses are resolved once, not once per interval; a new snapshot of a pid (exec,
refresh, a new process under a reused pid), a changed ELF cache entry and a perf map that grows all
give fresh names, and the memos stay bounded.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.elf import DebugHints, ElfSymbols
from agent.process.maps import read_process_maps
from agent.process.registry import ProcessRegistry
from agent.symbolize import native
from agent.symbolize.native import NativeResolver
from agent.symbolize.stats import SymbolizerStats
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import Frame
from agent.types import EMPTY_STACK, ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import AddFakeProcess, MapsFor, NmFunctions

PIE_BASE = 0x555555554000
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
KALLSYMS = "ffffffff81000000 T _stext\nffffffff81000100 T do_syscall_64\n"


def agg(pid: int, *addresses: int, kernel: Stack = EMPTY_STACK) -> AggregatedSample:
    key = SampleKey(pid=pid, tid=pid, cpu=0, kernel=kernel, user=Stack(StackStatus.OK, addresses))
    return AggregatedSample(key=key, thread_name="worker", values=(1,), timestamps_mono_ns=(1_500,))


def frames_of(symbolizer: Symbolizer, *samples: AggregatedSample) -> list[tuple[Frame, ...]]:
    profile = symbolizer.symbolize(IntervalProfile(SPEC, 1_000, 2_000, 0, samples))
    return [sample.frames for sample in profile.samples]


@pytest.fixture
def pie(symbolize_binaries: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "pie_copy"  # a private copy, so its identity is this test's own
    shutil.copy(symbolize_binaries["pie"], copy)
    return copy


def test_frames_and_stacks_survive_across_intervals(
    pie: Path, fake_proc: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor, nm_functions: NmFunctions
) -> None:
    (fake_proc / "kallsyms").write_text(KALLSYMS)
    add_fake_process(100, maps_for(pie, PIE_BASE))
    nm = nm_functions(pie)
    kernel = Stack(StackStatus.OK, (0xFFFFFFFF81000110,))
    sample = agg(100, PIE_BASE + nm["leaf_a"][0], PIE_BASE + nm["main"][0] + 1, kernel=kernel)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    first = frames_of(symbolizer, sample)[0]
    lookups = 0
    real_lookup = ElfSymbols.lookup

    def counting_lookup(self: ElfSymbols, vaddr: int) -> str:
        nonlocal lookups
        lookups += 1
        return real_lookup(self, vaddr)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ElfSymbols, "lookup", counting_lookup)
        second = frames_of(symbolizer, sample)[0]
        # Another stack of the same process in a later interval: only its new address is named.
        other = frames_of(symbolizer, agg(100, PIE_BASE + nm["middle_b"][0], PIE_BASE + nm["main"][0] + 1))[0]
    assert [f.function for f in second] == ["do_syscall_64", "leaf_a", "main"]
    assert all(a is b for a, b in zip(first, second, strict=True))  # the very frames of the first interval
    assert [f.function for f in other] == ["middle_b", "main"] and other[1] is first[2]
    assert lookups == 1
    assert symbolizer.stats.elf_tables_loaded == 1 and symbolizer.stats.frames_symbolized == 3 + 3 + 2
    assert symbolizer.cache_sizes()["symbol_memo"] > 0


def test_exec_gives_the_pid_a_new_snapshot_and_fresh_names(
    symbolize_binaries: dict[str, Path],
    fake_proc: Path,
    add_fake_process: AddFakeProcess,
    maps_for: MapsFor,
    nm_functions: NmFunctions,
) -> None:
    pie, lib = symbolize_binaries["pie"], symbolize_binaries["stripped_lib"]
    pid_dir = add_fake_process(200, maps_for(pie, PIE_BASE))
    address = PIE_BASE + nm_functions(pie)["leaf_a"][0]
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(200)
    before = frames_of(symbolizer, agg(200, address))[0][0]
    assert before.function == "leaf_a" and before.mapping is not None and before.mapping.path == str(pie)
    # exec(): the same pid now maps another image at the same address.
    (pid_dir / "maps").write_text("".join(line + "\n" for line in maps_for(lib, PIE_BASE)))
    symbolizer.processes.on_exec(200)
    symbolizer.processes.observe_process(200)
    lib_functions = nm_functions(lib)
    expected = next(name for name, (start, size) in lib_functions.items() if start <= address - PIE_BASE < start + size)
    after = frames_of(symbolizer, agg(200, address))[0][0]
    assert after is not before
    assert after.function == expected and after.mapping is not None and after.mapping.path == str(lib)


def test_a_reused_pid_gets_fresh_names_and_expired_memos_are_dropped(
    symbolize_binaries: dict[str, Path],
    fake_proc: Path,
    add_fake_process: AddFakeProcess,
    maps_for: MapsFor,
    nm_functions: NmFunctions,
) -> None:
    pie, nopie = symbolize_binaries["pie"], symbolize_binaries["nopie"]
    add_fake_process(300, maps_for(pie, PIE_BASE))
    address = PIE_BASE + nm_functions(pie)["outer_c"][0]
    symbolizer = Symbolizer(ProcessRegistry(fake_proc, ttl_intervals=1))
    assert frames_of(symbolizer, agg(300, address))[0][0].function == "outer_c"
    assert symbolizer.cache_sizes()["symbol_memo"] > 0
    frames_of(symbolizer, agg(1, 0x10))  # pid 300 unseen for an interval: its snapshot and memo expire
    assert symbolizer.processes.sizes()["processes"] == 0 and symbolizer.cache_sizes()["symbol_memo"] == 0
    # A new process under the same pid, with another image where the old one was.
    shutil.rmtree(fake_proc / "300")
    nopie_main = nm_functions(nopie)["main"][0]
    add_fake_process(300, maps_for(nopie, 0))
    assert frames_of(symbolizer, agg(300, nopie_main))[0][0].function == "main"


def test_an_evicted_elf_table_is_noticed_and_loaded_again(
    symbolize_binaries: dict[str, Path],
    fake_proc: Path,
    add_fake_process: AddFakeProcess,
    maps_for: MapsFor,
    nm_functions: NmFunctions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pie, nopie = symbolize_binaries["pie"], symbolize_binaries["nopie"]
    add_fake_process(400, maps_for(pie, PIE_BASE))
    add_fake_process(401, maps_for(nopie, 0))
    samples = (agg(400, PIE_BASE + nm_functions(pie)["leaf_a"][0]), agg(401, nm_functions(nopie)["middle_b"][0]))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), elf_cache_size=1)  # the two tables evict each other
    assert [frames[0].function for frames in frames_of(symbolizer, *samples)] == ["leaf_a", "middle_b"]
    real_read = native.read_elf_with_hints

    def read_renamed(path: Path, display: str) -> tuple[ElfSymbols, DebugHints]:
        table, hints = real_read(path, display)
        return dataclasses.replace(table, names=tuple(name.upper() for name in table.names)), hints

    # The table is read again only if the memo notices that the cache no longer holds the one it used.
    monkeypatch.setattr(native, "read_elf_with_hints", read_renamed)
    assert [frames[0].function for frames in frames_of(symbolizer, *samples)] == ["LEAF_A", "MIDDLE_B"]
    assert symbolizer.stats.elf_tables_loaded == 4


def test_memos_are_bounded(
    pie: Path, fake_proc: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor, nm_functions: NmFunctions
) -> None:
    add_fake_process(500, maps_for(pie, PIE_BASE))
    maps = read_process_maps(fake_proc, 500)
    resolver = NativeResolver(fake_proc, 8, SymbolizerStats(), max_memo_entries=10)
    leaf = PIE_BASE + nm_functions(pie)["leaf_a"][0]
    resolver.begin_call()
    frames, stable = resolver.frames(maps, [leaf + i for i in range(6)])
    assert stable and {f.function for f in frames} == {"leaf_a"}
    resolver.begin_call()
    assert resolver.memo_entries() == 6  # under the bound: kept
    resolver.frames(maps, [leaf + i for i in range(6, 12)])
    assert resolver.memo_entries() == 12
    resolver.begin_call()
    assert resolver.memo_entries() == 0  # over it: dropped at the next call
    frames, _ = resolver.frames(maps, [leaf])
    assert frames[0].function == "leaf_a"
    resolver.retain(set())
    assert resolver.memo_entries() == 0


def test_jit_frames_are_not_remembered_across_calls(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    jit = 0x7F0000000000
    pid_dir = add_fake_process(600, [f"{jit:x}-{jit + 0x10000:x} rwxp 00000000 00:00 0 "], comm="node")
    (pid_dir / "root").unlink()
    tmp = pid_dir / "root" / "tmp"
    tmp.mkdir(parents=True)
    (pid_dir / "status").write_text("Name:\tnode\nNSpid:\t600\n")
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    sample = agg(600, jit + 0x100)
    assert frames_of(symbolizer, sample)[0][0].function == ""  # the runtime has not written its map yet
    (tmp / "perf-600.map").write_text(f"{jit + 0x100:x} 10 LazyCompile:*hot\n")
    assert frames_of(symbolizer, sample)[0][0].function == "LazyCompile:*hot"
