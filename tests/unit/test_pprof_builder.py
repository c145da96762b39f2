"""Tests for the pprof stage: `agent.pprof.builder` against pprof's invariants and `go tool pprof`."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent._proto import profile_pb2
from agent.export.files import FileSink
from agent.pprof.builder import ProfileBuilder, build_pprof
from agent.pprof.strings import StringTable
from agent.symbolize.types import KERNEL_MAPPING_NAME, Frame, FrameKind, MappingInfo, ProcessInfo, Profile, Sample
from agent.types import ProfileSpec, ValueType

PERIOD = round(1e9 / 19)
CPU_SPEC = ProfileSpec(
    name="cpu",
    sample_types=(ValueType("samples", "count"), ValueType("cpu", "nanoseconds")),
    period_type=ValueType("cpu", "nanoseconds"),
    period=PERIOD,
)
START_NS = 1_795_363_512_123_456_789  # 2026-11-22T16:05:12Z
DURATION_NS = 10_000_000_000

# Paths that exist on no host, so `go tool pprof` cannot find and symbolize anything itself.
APP = MappingInfo("/opt/fixture/bin/app", 0x5555_5555_5000, 0x5555_5555_9000, 0x1000, "aa" * 20)
WORKER = MappingInfo("/opt/fixture/bin/worker", 0x5566_0000_1000, 0x5566_0000_4000, 0x1000, "cc" * 20)
LIB_IN_APP = MappingInfo("/opt/fixture/lib/libfix.so.1", 0x7F11_0000_0000, 0x7F11_0001_0000, 0x0, "bb" * 20)
LIB_IN_WORKER = MappingInfo("/opt/fixture/lib/libfix.so.1", 0x7F22_0000_0000, 0x7F22_0001_0000, 0x0, "bb" * 20)
KERNEL = MappingInfo(KERNEL_MAPPING_NAME, 0, 0, 0)

K_COPY = Frame(FrameKind.KERNEL, 0xFFFF_FFFF_8100_1234, "copy_user_generic", KERNEL)
K_SYSCALL = Frame(FrameKind.KERNEL, 0xFFFF_FFFF_8100_5677, "do_syscall_64", None)  # bare: gets [kernel.kallsyms]
K_WORKER_THREAD = Frame(FrameKind.KERNEL, 0xFFFF_FFFF_8120_0000, "worker_thread", KERNEL)
FIX_MEMCPY = Frame(FrameKind.NATIVE, 0x7F11_0000_0100, "fix_memcpy", LIB_IN_APP)
COMPUTE_HOT = Frame(FrameKind.NATIVE, 0x5555_5555_6100, "compute_hot", APP)
APP_MAIN = Frame(FrameKind.NATIVE, 0x5555_5555_6200, "main", APP)
UNNAMED = Frame(FrameKind.NATIVE, 0x5555_5555_6ABC, "", APP)
FIX_WORK_APP = Frame(FrameKind.NATIVE, 0x7F11_0000_0400, "fix_work", LIB_IN_APP)
FIX_WORK_WORKER = Frame(FrameKind.NATIVE, 0x7F22_0000_0400, "fix_work", LIB_IN_WORKER)
WORKER_MAIN = Frame(FrameKind.NATIVE, 0x5566_0000_2000, "worker_main", WORKER)
MARKER = Frame(FrameKind.MARKER, 0, "[user stack missing]", None)

HOT_STACK = (K_COPY, K_SYSCALL, FIX_MEMCPY, COMPUTE_HOT, APP_MAIN)


def cpu_values(count: int) -> tuple[int, int]:
    return (count, count * PERIOD)


def sample(pid: int, tid: int, cpu: int, thread: str, frames: tuple[Frame, ...], count: int) -> Sample:
    return Sample(pid, tid, cpu, thread, frames, cpu_values(count), (START_NS + 1,) * count)


def fixture_profile() -> Profile:
    samples = (
        sample(100, 101, 0, "app-main", HOT_STACK, 30),
        # Same stack (equal, separately built frames) on another thread: must share the locations.
        sample(100, 102, 1, "app-io", tuple(f._replace() for f in HOT_STACK), 10),
        sample(100, 101, 0, "app-main", (UNNAMED, APP_MAIN), 5),
        sample(100, 103, 2, "app-pool", (FIX_WORK_APP, APP_MAIN), 8),
        sample(200, 200, 3, "worker", (FIX_WORK_WORKER, WORKER_MAIN), 17),
        sample(300, 300, 1, "kworker/1:0", (K_WORKER_THREAD, MARKER), 3),  # pid 300 has no ProcessInfo
    )
    processes = {
        100: ProcessInfo(100, "app", APP.path),
        200: ProcessInfo(200, "worker", WORKER.path),
    }
    return Profile(CPU_SPEC, START_NS, DURATION_NS, samples, processes)


def parse(data: bytes) -> Any:
    return profile_pb2.Profile.FromString(data)


def strings(p: Any) -> list[str]:
    return list(p.string_table)


def function_names_of_location(p: Any, location: Any) -> list[str]:
    functions = {f.id: f for f in p.function}
    return [p.string_table[functions[line.function_id].name] for line in location.line]


def leaf_names(p: Any) -> list[list[str]]:
    locations = {loc.id: loc for loc in p.location}
    out = []
    for s in p.sample:
        out.append([(function_names_of_location(p, locations[i]) or [""])[0] for i in s.location_id])
    return out


def mapping_by_filename(p: Any, filename: str) -> list[Any]:
    return [m for m in p.mapping if p.string_table[m.filename] == filename]


def assert_pprof_invariants(p: Any) -> None:
    table = strings(p)
    assert table[0] == ""
    assert len(set(table)) == len(table), "duplicate strings"
    for kind in (p.mapping, p.location, p.function):
        assert [x.id for x in kind] == list(range(1, len(kind) + 1)), "ids must be non-zero, unique, sequential"
    mapping_ids = {m.id for m in p.mapping}
    location_ids = {loc.id for loc in p.location}
    function_ids = {f.id for f in p.function}
    for s in p.sample:
        assert len(s.value) == len(p.sample_type)
        assert set(s.location_id) <= location_ids
        for label in s.label:
            assert 0 < label.key < len(table)
            assert 0 <= label.str < len(table)
            assert not (label.str and label.num), "a label is either a string or a number"
    for loc in p.location:
        assert loc.mapping_id == 0 or loc.mapping_id in mapping_ids
        for line in loc.line:
            assert line.function_id in function_ids
    for f in p.function:
        assert 0 < f.name < len(table)
    for m in p.mapping:
        assert 0 < m.filename < len(table)
        assert not (m.has_filenames or m.has_line_numbers or m.has_inline_frames)
    assert 0 < p.default_sample_type < len(table)


def test_string_table_interns_with_empty_string_first() -> None:
    table = StringTable()
    assert table.index("") == 0
    assert table.index("cpu") == 1
    assert table.index("count") == 2
    assert table.index("cpu") == 1
    assert table.strings() == ("", "cpu", "count")
    assert len(table) == 3


def test_header_fields_follow_the_spec() -> None:
    p = parse(build_pprof(fixture_profile()))
    table = strings(p)
    assert [(table[v.type], table[v.unit]) for v in p.sample_type] == [("samples", "count"), ("cpu", "nanoseconds")]
    assert (table[p.period_type.type], table[p.period_type.unit]) == ("cpu", "nanoseconds")
    assert p.period == 52_631_579
    assert p.time_nanos == START_NS
    assert p.duration_nanos == DURATION_NS
    assert table[p.default_sample_type] == "cpu"


def test_output_satisfies_pprof_invariants() -> None:
    assert_pprof_invariants(parse(build_pprof(fixture_profile())))


def test_samples_keep_values_and_leaf_first_stacks() -> None:
    p = parse(build_pprof(fixture_profile()))
    assert [tuple(s.value) for s in p.sample] == [cpu_values(n) for n in (30, 10, 5, 8, 17, 3)]
    assert leaf_names(p) == [
        ["copy_user_generic", "do_syscall_64", "fix_memcpy", "compute_hot", "main"],
        ["copy_user_generic", "do_syscall_64", "fix_memcpy", "compute_hot", "main"],
        ["", "main"],
        ["fix_work", "main"],
        ["fix_work", "worker_main"],
        ["worker_thread", "[user stack missing]"],
    ]


def test_identical_stacks_share_locations_and_functions_are_deduplicated() -> None:
    p = parse(build_pprof(fixture_profile()))
    assert list(p.sample[0].location_id) == list(p.sample[1].location_id)
    # main in the app appears in four samples but is one location and one function.
    main_locations = [loc for loc in p.location if function_names_of_location(p, loc) == ["main"]]
    assert len(main_locations) == 1
    names = [p.string_table[f.name] for f in p.function]
    assert len(names) == len(set(names))
    # fix_work in two processes: one function, two locations (different runtime addresses and mappings).
    fix_work = [loc for loc in p.location if function_names_of_location(p, loc) == ["fix_work"]]
    assert len(fix_work) == 2
    assert len({loc.mapping_id for loc in fix_work}) == 2
    assert names.count("fix_work") == 1


def test_functions_carry_name_as_system_name_and_no_filename() -> None:
    p = parse(build_pprof(fixture_profile()))
    for f in p.function:
        assert f.system_name == f.name
        assert f.filename == 0


def test_labels_have_the_right_kinds() -> None:
    p = parse(build_pprof(fixture_profile()))
    table = strings(p)

    def labels(s: Any) -> dict[str, tuple[str, object]]:
        out: dict[str, tuple[str, object]] = {}
        for label in s.label:
            assert table[label.key] not in out, "one value per key"
            assert label.num_unit == 0
            out[table[label.key]] = ("str", table[label.str]) if label.str else ("num", label.num)
        return out

    assert labels(p.sample[1]) == {
        "pid": ("num", 100),
        "tid": ("num", 102),
        "cpu": ("num", 1),
        "comm": ("str", "app"),
        "thread_name": ("str", "app-io"),
    }
    # No ProcessInfo for pid 300: comm falls back to the thread name.
    assert labels(p.sample[5])["comm"] == ("str", "kworker/1:0")


def test_a_sample_from_before_an_exec_is_labelled_as_the_program_it_ran() -> None:
    """#17: pid 100 ran `worker` until an exec, then `app`. The earlier sample carries the old image's
    ProcessInfo, and its comm label says so; the later one is the current process's."""
    old = ProcessInfo(100, "worker", WORKER.path, container_id="c1")
    earlier = dataclasses.replace(sample(100, 100, 0, "worker", (WORKER_MAIN,), 2), process=old)
    later = sample(100, 100, 0, "app", (APP_MAIN,), 3)
    profile = Profile(CPU_SPEC, START_NS, DURATION_NS, (earlier, later), {100: ProcessInfo(100, "app", APP.path)})
    p = parse(build_pprof(profile))
    table = strings(p)
    comms = [next(table[label.str] for label in s.label if table[label.key] == "comm") for s in p.sample]
    containers = [[table[label.str] for label in s.label if table[label.key] == "container_id"] for s in p.sample]
    assert comms == ["worker", "app"]
    assert containers == [["c1"], []]


def test_empty_string_labels_are_skipped() -> None:
    nameless = Sample(7, 7, 0, "", (APP_MAIN,), cpu_values(1), ())
    profile = Profile(CPU_SPEC, START_NS, DURATION_NS, (nameless,), {7: ProcessInfo(7, "", "")})
    p = parse(build_pprof(profile))
    keys = [p.string_table[label.key] for label in p.sample[0].label]
    assert keys == ["pid", "tid", "cpu"]


def test_mappings_main_binary_first_kernel_last_and_runtime_addresses() -> None:
    p = parse(build_pprof(fixture_profile()))
    table = strings(p)
    # The first sample's first user frame is in the library, yet the app's executable must be mapping[0].
    assert [table[m.filename] for m in p.mapping] == [
        APP.path,
        LIB_IN_APP.path,
        LIB_IN_WORKER.path,
        WORKER.path,
        KERNEL_MAPPING_NAME,
    ]
    app = p.mapping[0]
    assert (app.memory_start, app.memory_limit, app.file_offset) == (APP.start, APP.limit, APP.file_offset)
    assert table[app.build_id] == APP.build_id
    libs = mapping_by_filename(p, LIB_IN_APP.path)
    assert sorted(m.memory_start for m in libs) == [LIB_IN_APP.start, LIB_IN_WORKER.start]
    # Bare kernel frames and kernel frames with the kernel mapping land in one mapping.
    assert len(mapping_by_filename(p, KERNEL_MAPPING_NAME)) == 1


def test_has_functions_only_when_every_location_is_named() -> None:
    p = parse(build_pprof(fixture_profile()))
    flags = {p.string_table[m.filename] + f"@{m.memory_start:#x}": m.has_functions for m in p.mapping}
    assert flags == {
        f"{APP.path}@{APP.start:#x}": False,  # holds the unnamed frame
        f"{LIB_IN_APP.path}@{LIB_IN_APP.start:#x}": True,
        f"{WORKER.path}@{WORKER.start:#x}": True,
        f"{LIB_IN_WORKER.path}@{LIB_IN_WORKER.start:#x}": True,
        f"{KERNEL_MAPPING_NAME}@0x0": True,
    }


def test_unnamed_frame_keeps_mapping_and_address_without_line() -> None:
    p = parse(build_pprof(fixture_profile()))
    unnamed = [loc for loc in p.location if not loc.line]
    assert len(unnamed) == 1
    assert unnamed[0].address == UNNAMED.address
    assert p.string_table[p.mapping[unnamed[0].mapping_id - 1].filename] == APP.path


def test_marker_frame_has_no_mapping_but_a_named_line() -> None:
    p = parse(build_pprof(fixture_profile()))
    markers = [loc for loc in p.location if function_names_of_location(p, loc) == ["[user stack missing]"]]
    assert len(markers) == 1
    assert markers[0].mapping_id == 0


def test_identical_mapping_tuples_in_two_processes_are_one_mapping() -> None:
    shared = Frame(FrameKind.NATIVE, 0x7F11_0000_0400, "fix_work", LIB_IN_APP)
    samples = (
        Sample(1, 1, 0, "a", (shared,), cpu_values(1), ()),
        Sample(2, 2, 0, "b", (shared,), cpu_values(1), ()),
    )
    processes = {1: ProcessInfo(1, "a", "/bin/a"), 2: ProcessInfo(2, "b", "/bin/b")}
    p = parse(build_pprof(Profile(CPU_SPEC, START_NS, DURATION_NS, samples, processes)))
    assert len(p.mapping) == 1
    assert len(p.location) == 1


def test_output_is_deterministic() -> None:
    first = build_pprof(fixture_profile())
    assert build_pprof(fixture_profile()) == first
    # Equal content held in distinct objects (a fresh dict, copied records) gives the same bytes.
    profile = fixture_profile()
    copied = dataclasses.replace(
        profile,
        samples=tuple(dataclasses.replace(s) for s in profile.samples),
        processes=dict(reversed(list(profile.processes.items()))),
    )
    assert build_pprof(copied) == first


def test_sample_with_wrong_value_count_is_rejected() -> None:
    builder = ProfileBuilder(CPU_SPEC)
    with pytest.raises(ValueError, match="1 values but profile 'cpu' has 2 sample types"):
        builder.add_sample(Sample(1, 1, 0, "t", (APP_MAIN,), (1,), ()), "comm")


def test_profile_without_samples_is_still_valid() -> None:
    p = parse(build_pprof(Profile(CPU_SPEC, START_NS, DURATION_NS, (), {})))
    assert_pprof_invariants(p)
    assert len(p.sample_type) == 2
    assert not p.sample and not p.mapping and not p.location and not p.function


# --- read back with the independent reader -------------------------------------------------------------


GO = shutil.which("go")
needs_go = pytest.mark.skipif(GO is None, reason="`go` is not on PATH, so `go tool pprof` cannot read the output")


def go_pprof(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert GO is not None
    # An empty binary search path keeps pprof from symbolizing the fixture with some file on this host.
    # HOME stays: `go tool` builds and caches the pprof tool under it, and an empty cache costs ~20 s.
    env = {**os.environ, "PPROF_BINARY_PATH": str(tmp_path / "no-binaries")}
    return subprocess.run(
        [GO, "tool", "pprof", *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def written_fixture(tmp_path: Path) -> Path:
    sink = FileSink(tmp_path / "out", max_files=0, max_bytes=0)
    return sink.export(fixture_profile(), build_pprof(fixture_profile()))


@needs_go
def test_go_pprof_raw_reads_the_file(tmp_path: Path) -> None:
    path = written_fixture(tmp_path)
    result = go_pprof(tmp_path, "-raw", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("copy_user_generic", "do_syscall_64", "fix_memcpy", "compute_hot", "main", "fix_work"):
        assert re.search(rf"\b{re.escape(name)}\b", out), name
    assert "[user stack missing]" in out
    assert "PeriodType: cpu nanoseconds" in out
    assert f"Period: {PERIOD}" in out
    # Each sample line starts with its values: count, then cpu nanoseconds.
    value_lines = Counter(tuple(int(v) for v in m.groups()) for m in re.finditer(r"^\s+(\d+)\s+(\d+):", out, re.M))
    assert value_lines == Counter(cpu_values(n) for n in (30, 10, 5, 8, 17, 3))


@needs_go
def test_go_pprof_top_orders_functions_by_flat_cpu(tmp_path: Path) -> None:
    path = written_fixture(tmp_path)
    result = go_pprof(tmp_path, "-top", "-sample_index=cpu", str(path))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    header = next(i for i, row in enumerate(rows) if row[:2] == ["flat", "flat%"])
    # Rows: flat flat% sum% cum cum% name; functions with flat time come first, in decreasing order.
    flat = [(" ".join(row[5:]), row[1]) for row in rows[header + 1 :] if row and row[0] != "0"]
    # copy_user_generic 40 of 73 samples; fix_work 8 + 17 (one function in two processes); the unnamed
    # frame, which pprof names after its mapping, 5; worker_thread 3.
    assert flat == [
        ("copy_user_generic", "54.79%"),
        ("fix_work", "34.25%"),
        ("[app]", "6.85%"),
        ("worker_thread", "4.11%"),
    ]
    cumulative = {" ".join(row[5:]): row[4] for row in rows[header + 1 :] if row}
    assert cumulative["main"] == "72.60%"
    assert cumulative["worker_main"] == "23.29%"


def test_frame_objects_shared_by_processes_still_find_each_ones_main_binary() -> None:
    # The builder skips a frame object it has seen, per process: the same objects in another process
    # must still make that process's executable the main mapping.
    frames = (FIX_MEMCPY, COMPUTE_HOT)
    samples = (sample(100, 100, 0, "a", frames, 1), sample(200, 200, 0, "b", frames, 1))
    processes = {100: ProcessInfo(100, "a", "/opt/fixture/bin/other"), 200: ProcessInfo(200, "b", APP.path)}
    message = parse(build_pprof(Profile(CPU_SPEC, START_NS, DURATION_NS, samples, processes)))
    names = [message.string_table[m.filename] for m in message.mapping]
    assert names == [APP.path, LIB_IN_APP.path]
    # Each sample keeps its own labels although the builder shares label sets between equal ones.
    labels = [{message.string_table[label.key]: label.num or label.str for label in s.label} for s in message.sample]
    assert [(d["pid"], d["tid"]) for d in labels] == [(100, 100), (200, 200)]


def test_mapping_hash_is_its_fields_hash_and_equality_ignores_it() -> None:
    copy = dataclasses.replace(APP)
    assert copy == APP and hash(copy) == hash(APP) and copy is not APP
    assert {APP: 1}[copy] == 1 and dataclasses.replace(APP, start=0) != APP
