"""Tests of the process stage's /proc/PID snapshots (`agent.process.maps`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agent.process.elf import LoadSegment
from agent.process.maps import (
    FileIdentity,
    MapEntry,
    MapKind,
    load_bias,
    parse_maps_line,
    read_process_maps,
    resolve_file,
)
from tests.support.fixture_types import AddFakeProcess


@pytest.mark.parametrize(
    ("line", "kind", "path"),
    [
        ("7f00-7f10 r-xp 00001000 fd:01 1234 /usr/lib/libc.so.6", MapKind.FILE, "/usr/lib/libc.so.6"),
        ("7f00-7f10 r-xp 00000000 fd:01 1234 /opt/my app/bin tool", MapKind.FILE, "/opt/my app/bin tool"),
        ("7f00-7f10 r-xp 00000000 00:00 0 ", MapKind.ANON, ""),
        ("7f00-7f10 rwxp 00000000 00:00 0 [anon:jit]", MapKind.ANON, "[anon:jit]"),
        ("7f00-7f10 r-xp 00000000 00:00 0 [vdso]", MapKind.VDSO, "[vdso]"),
        ("ff600000-ff601000 --xp 00000000 00:00 0 [vsyscall]", MapKind.VSYSCALL, "[vsyscall]"),
        ("7f00-7f10 rw-p 00000000 00:00 0 [heap]", MapKind.SPECIAL, "[heap]"),
        ("7f00-7f10 r-xp 00000000 fd:01 99 /tmp/x (deleted)", MapKind.DELETED, "/tmp/x (deleted)"),
        ("7f00-7f10 r-xp 00000000 00:01 77 /memfd:jit (deleted)", MapKind.MEMFD, "/memfd:jit (deleted)"),
        ("7f00-7f10 rw-s 00000000 00:01 77 /SYSV00000000", MapKind.FILE, "/SYSV00000000"),
    ],
)
def test_parse_maps_line_classifies_every_kind(line: str, kind: MapKind, path: str) -> None:
    entry = parse_maps_line(line)
    assert entry is not None
    assert entry.kind is kind
    assert entry.path == path


def test_parse_maps_line_reads_offset_inode_and_perms() -> None:
    entry = parse_maps_line("555555554000-555555555000 r-xp 00001000 fd:01 1234 /bin/prog\n")
    assert entry == MapEntry(0x555555554000, 0x555555555000, "r-xp", 0x1000, 1234, "/bin/prog", MapKind.FILE)


@pytest.mark.parametrize("line", ["", "garbage", "zz-10 r-xp 0 fd:01 1 /x", "10-20 r-xp 00 fd:01 notanumber /x"])
def test_parse_maps_line_rejects_malformed_lines(line: str) -> None:
    assert parse_maps_line(line) is None


def test_read_process_maps_keeps_executable_mappings_with_identity(
    fake_proc: Path, add_fake_process: AddFakeProcess, tmp_path: Path
) -> None:
    binary = tmp_path / "prog"
    binary.write_bytes(b"\x7fELF")
    lines = [
        f"555555554000-555555555000 r--p 00000000 fd:01 1 {binary}",
        f"555555556000-555555557000 r-xp 00001000 fd:01 1 {binary}",
        "7ffff7fc1000-7ffff7fc3000 r-xp 00000000 00:00 0 [vdso]",
        "7ffff0000000-7ffff0001000 rwxp 00000000 00:00 0 ",
        "400000-401000 r-xp 00000000 fd:01 5 /gone/lib.so (deleted)",
    ]
    add_fake_process(42, lines, comm="prog", exe=binary)
    maps = read_process_maps(fake_proc, 42)
    assert (maps.pid, maps.comm, maps.exe_path) == (42, "prog", str(binary))
    assert [m.start for m in maps.mappings] == [0x400000, 0x555555556000, 0x7FFFF0000000, 0x7FFFF7FC1000]
    file_entry = maps.find(0x555555556123)
    assert file_entry is not None and file_entry.kind is MapKind.FILE
    assert file_entry.identity == FileIdentity.of(os.stat(binary))
    assert maps.find(0x555555554100) is None  # read-only mapping: not kept
    assert maps.find(0x555555557000) is None  # end is exclusive
    deleted = maps.find(0x400010)
    assert deleted is not None and deleted.identity is None


def test_kernel_thread_has_no_mappings_and_no_exe(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    add_fake_process(2, [], comm="kthreadd")
    maps = read_process_maps(fake_proc, 2)
    assert (maps.comm, maps.exe_path, maps.mappings) == ("kthreadd", "", ())
    assert maps.find(0x1000) is None


def test_vanished_process_raises_file_not_found(fake_proc: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_process_maps(fake_proc, 999)


def test_resolve_file_prefers_process_root_then_checks_host_identity(
    fake_proc: Path, add_fake_process: AddFakeProcess, tmp_path: Path
) -> None:
    binary = tmp_path / "prog"
    binary.write_bytes(b"\x7fELF")
    pid_dir = add_fake_process(7, [f"1000-2000 r-xp 00000000 fd:01 1 {binary}"])
    entry = read_process_maps(fake_proc, 7).mappings[0]
    assert resolve_file(fake_proc, 7, entry) == pid_dir / "root" / str(binary).lstrip("/")
    shutil.rmtree(pid_dir)
    assert resolve_file(fake_proc, 7, entry) == binary
    os.utime(binary, ns=(0, 12345))  # a different file now lives at the host path
    assert resolve_file(fake_proc, 7, entry) is None


def test_resolve_file_refuses_non_files() -> None:
    entry = parse_maps_line("7f00-7f10 r-xp 00000000 00:00 0 [vdso]")
    assert entry is not None
    assert resolve_file(Path("/proc"), 1, entry) is None


@pytest.mark.parametrize(
    ("start", "offset", "segment", "bias"),
    [
        # PIE with separate code: text at file offset 0x1000, vaddr 0x1000, loaded at base 0x555555554000.
        (0x555555555000, 0x1000, LoadSegment(0x1000, 0x1000, 0x22D, 0x22D, True), 0x555555554000),
        # non-PIE: mapped at its link-time address, no bias.
        (0x401000, 0x1000, LoadSegment(0x1000, 0x401000, 0x200, 0x200, True), 0),
        # segment whose p_offset is not page aligned and whose vaddr differs from its offset.
        (0x7F0000201000, 0x1000, LoadSegment(0x1040, 0x201040, 0x100, 0x100, True), 0x7F0000000000),
    ],
)
def test_load_bias(start: int, offset: int, segment: LoadSegment, bias: int) -> None:
    entry = MapEntry(start, start + 0x1000, "r-xp", offset, 1, "/x", MapKind.FILE)
    assert load_bias(entry, segment) == bias
