"""Symbolize stage against a real, live process: the workload binary spinning, read through the real /proc."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.maps import parse_maps_line
from agent.process.registry import ProcessRegistry
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import FrameKind
from agent.types import ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import NmFunctions

SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)


@pytest.fixture
def spinning_pie(symbolize_binaries: dict[str, Path]) -> Iterator[subprocess.Popen[bytes]]:
    """The PIE workload spinning forever, once the kernel shows its image mapped (exec is done)."""
    binary = symbolize_binaries["pie"]
    proc = subprocess.Popen([str(binary), "1000", "spin"])
    try:
        deadline = time.monotonic() + 10.0
        while str(binary) not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert proc.poll() is None, "the workload exited"
            assert time.monotonic() < deadline, "the workload's image never showed up in its maps"
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _base_of(pid: int, path_fragment: str) -> tuple[str, int]:
    """Path and start of the offset-0 mapping whose path contains `path_fragment` (the load base when vaddr 0)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        entry = parse_maps_line(line)
        if entry is not None and path_fragment in entry.path and entry.offset == 0:
            return entry.path, entry.start
    raise AssertionError(f"no mapping of {path_fragment} in /proc/{pid}/maps")


def test_live_process_functions_resolve_from_real_proc(
    spinning_pie: subprocess.Popen[bytes], symbolize_binaries: dict[str, Path], nm_functions: NmFunctions
) -> None:
    pid = spinning_pie.pid
    binary = symbolize_binaries["pie"]
    _, base = _base_of(pid, str(binary))
    nm = nm_functions(binary)
    libc_path, libc_base = _base_of(pid, "libc.so")
    libc_nm = nm_functions(Path(libc_path), weak=True)
    libc_names_at_strtoul = {name for name, (a, _) in libc_nm.items() if a == libc_nm["strtoul"][0]}
    addresses = (
        libc_base + libc_nm["strtoul"][0] + 1,  # leaf: a function that is not in the workload
        base + nm["leaf_a"][0] + 5,
        base + nm["middle_b"][0] + 9,
        base + nm["outer_c"][0] + 9,
        base + nm["main"][0] + 20,
    )
    symbolizer = Symbolizer(ProcessRegistry())  # the real /proc
    symbolizer.processes.observe_process(pid)
    key = SampleKey(
        pid=pid, tid=pid, cpu=0, kernel=Stack(StackStatus.NOT_COLLECTED), user=Stack(StackStatus.OK, addresses)
    )
    sample = AggregatedSample(key=key, thread_name="workload_pie", values=(1,), timestamps_mono_ns=(5,))
    profile = symbolizer.symbolize(IntervalProfile(SPEC, 0, 10, 0, (sample,)))
    frames = profile.samples[0].frames
    assert frames[0].function in libc_names_at_strtoul
    assert [f.function for f in frames[1:]] == ["leaf_a", "middle_b", "outer_c", "main"]
    assert all(f.kind is FrameKind.NATIVE for f in frames)
    assert frames[1].mapping is not None and frames[1].mapping.path == str(binary)
    assert profile.processes[pid].exe_path == str(binary)
    assert profile.processes[pid].comm == binary.name[:15]
    assert symbolizer.stats.errors.total() == 0
