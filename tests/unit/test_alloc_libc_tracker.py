"""Finding the C libraries of profiled processes (`agent.probes.libc_tracker`) in a fake /proc.

Each fake process has a `maps` file and a `root` link to its own fake root directory, so the host and
"containers" can map the same path to different files, as real containers do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.probes.libc_tracker import ALL_PROCESSES, LibcTracker, LibraryKey, Target, c_libraries_of, is_c_library

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
MUSL = "/lib/ld-musl-x86_64.so.1"
CRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"


def maps_lines(*paths: str, base: int = 0x7F0000000000) -> list[str]:
    """A read-only and an executable mapping of each file, as the dynamic loader maps a library."""
    lines = []
    for i, path in enumerate(paths):
        start = base + i * 0x400000
        lines.append(f"{start:x}-{start + 0x28000:x} r--p 00000000 fd:01 {1000 + i} {path}")
        lines.append(f"{start + 0x28000:x}-{start + 0x1BD000:x} r-xp 00028000 fd:01 {1000 + i} {path}")
    lines.append("7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]")
    return lines


class FakeHost:
    def __init__(self, tmp_path: Path) -> None:
        self.proc = tmp_path / "proc"
        self.proc.mkdir()
        self.roots = tmp_path / "roots"

    def root(self, name: str, *files: str) -> Path:
        """A root directory holding `files` (each a distinct file, so a distinct identity)."""
        root = self.roots / name
        for path in files:
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"{name}:{path}")
        return root

    def process(self, pid: int, root: Path, lines: list[str]) -> Path:
        pid_dir = self.proc / str(pid)
        pid_dir.mkdir()
        (pid_dir / "root").symlink_to(root)
        self.set_maps(pid, lines)
        return pid_dir

    def set_maps(self, pid: int, lines: list[str]) -> None:
        (self.proc / str(pid) / "maps").write_text("".join(line + "\n" for line in lines))

    def exit(self, pid: int) -> None:
        pid_dir = self.proc / str(pid)
        for child in pid_dir.iterdir():
            child.unlink()
        pid_dir.rmdir()


def key(path: Path) -> LibraryKey:
    st = os.stat(path)
    return LibraryKey(st.st_dev, st.st_ino)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


@pytest.mark.parametrize(
    "path",
    [LIBC, "/usr/lib64/libc.so.6", "/lib/libc-2.31.so", "/lib/libc.musl-x86_64.so.1", MUSL, "/tmp/x/libc.so"],
)
def test_c_library_names(path: str) -> None:
    assert is_c_library(path)


@pytest.mark.parametrize(
    "path",
    [CRYPTO, "/usr/lib/libc++.so.1", "/lib/libcap.so.2", "/lib/libcom_err.so.2", "/usr/bin/libc.so.6.bak", "/bin/app"],
)
def test_other_files_are_not_c_libraries(path: str) -> None:
    assert not is_c_library(path)


def test_whole_host_targets_each_file_once(host: FakeHost) -> None:
    host_root = host.root("host", LIBC, CRYPTO)
    container = host.root("container", LIBC)  # the same path, its own file
    alpine = host.root("alpine", MUSL)
    for pid in (10, 11):
        host.process(pid, host_root, maps_lines("/bin/app", CRYPTO, LIBC))
    host.process(20, container, maps_lines("/usr/bin/nginx", LIBC))
    host.process(30, alpine, maps_lines("/bin/busybox", MUSL))
    host.process(40, host_root, [])  # a kernel thread
    host.process(50, host_root, maps_lines("/usr/local/bin/static-go-binary"))
    wanted = LibcTracker(host.proc).scan()
    host_libc, container_libc, musl = key(host_root / LIBC[1:]), key(container / LIBC[1:]), key(alpine / MUSL[1:])
    assert set(wanted) == {
        Target(host_libc, ALL_PROCESSES),
        Target(container_libc, ALL_PROCESSES),
        Target(musl, ALL_PROCESSES),
    }
    assert wanted[Target(host_libc, ALL_PROCESSES)].pid == 10
    container_source = wanted[Target(container_libc, ALL_PROCESSES)]
    assert (container_source.pid, container_source.path) == (20, LIBC)
    assert container_source.open_path.read_text() == f"container:{LIBC}"  # opened through its own root
    assert wanted[Target(musl, ALL_PROCESSES)].open_path.read_text() == f"alpine:{MUSL}"


def test_libraries_no_process_maps_any_more_are_dropped(host: FakeHost) -> None:
    host_root, container = host.root("host", LIBC), host.root("container", LIBC)
    host.process(10, host_root, maps_lines(LIBC))
    host.process(20, container, maps_lines(LIBC))
    tracker = LibcTracker(host.proc, list_every=2)
    assert len(tracker.scan()) == 2
    host.exit(20)
    assert len(tracker.scan()) == 2  # exits are noticed when /proc is listed: a stale target costs nothing
    assert set(tracker.scan()) == {Target(key(host_root / LIBC[1:]), ALL_PROCESSES)}


def test_pid_restriction_targets_each_process_and_reads_no_other(host: FakeHost) -> None:
    host_root, container = host.root("host", LIBC), host.root("container", LIBC)
    host.process(10, host_root, maps_lines(LIBC))
    host.process(11, host_root, maps_lines(LIBC))
    host.process(20, container, maps_lines(LIBC))
    tracker = LibcTracker(host.proc, pids=(10, 20, 99))  # 99 does not exist
    assert tracker.restricted
    wanted = tracker.scan()
    assert set(wanted) == {Target(key(host_root / LIBC[1:]), 10), Target(key(container / LIBC[1:]), 20)}
    assert tracker.process_reads == 3  # 10, 20 and the attempt at 99; never 11


def test_known_processes_are_read_again_only_when_noted_or_at_a_full_scan(host: FakeHost) -> None:
    host_root = host.root("host", LIBC)
    other = host.root("other", LIBC)
    host.process(10, host_root, maps_lines(LIBC))
    tracker = LibcTracker(host.proc, full_scan_every=4)
    first = tracker.scan()
    reads = tracker.process_reads
    (host.proc / "10" / "root").unlink()
    (host.proc / "10" / "root").symlink_to(other)  # an exec into another image
    assert tracker.scan() == first and tracker.process_reads == reads  # not read: nothing said it changed
    tracker.note_pids([10])
    assert set(tracker.scan()) == {Target(key(other / LIBC[1:]), ALL_PROCESSES)}
    host.set_maps(10, maps_lines("/bin/static"))
    assert tracker.scan() != {}  # scan 4 of 4: not yet
    assert tracker.scan() == {}  # scans 0, 4, 8, ... read everything again


def test_between_full_scans_only_announced_processes_are_read(host: FakeHost) -> None:
    """/proc is listed every few scans: a new image is found by its exec event, or by the next listing."""
    host_root = host.root("host", LIBC)
    host.process(10, host_root, maps_lines(LIBC))
    tracker = LibcTracker(host.proc, list_every=3)
    assert len(tracker.scan()) == 1
    other = host.root("other", LIBC)
    host.process(20, other, maps_lines(LIBC))  # its exec event was lost
    host.process(30, host_root, maps_lines(LIBC))
    tracker.note_pids([30])
    reads = tracker.process_reads
    assert set(tracker.scan()) == {Target(key(host_root / LIBC[1:]), ALL_PROCESSES)}
    assert tracker.process_reads == reads + 1  # 30 only: nothing else was listed or read
    assert len(tracker.scan()) == 1
    assert len(tracker.scan()) == 2  # the listing finds 20


def test_a_process_without_libc_yet_is_read_again_while_young(host: FakeHost) -> None:
    host_root = host.root("host", LIBC)
    host.process(10, host_root, maps_lines("/usr/bin/app", "/lib64/ld-linux-x86-64.so.2"))  # just exec'd
    tracker = LibcTracker(host.proc, young_scans=3, full_scan_every=100)
    assert tracker.scan() == {}
    host.set_maps(10, maps_lines("/usr/bin/app", "/lib64/ld-linux-x86-64.so.2", LIBC))
    assert set(tracker.scan()) == {Target(key(host_root / LIBC[1:]), ALL_PROCESSES)}
    host.process(11, host_root, maps_lines("/usr/local/bin/static"))
    host.process(12, host_root, [])  # a kernel thread: no address space, nothing to wait for
    tracker.note_pids([11, 12])  # as their exec events do
    reads = tracker.process_reads
    for _ in range(3):
        tracker.scan()
    assert tracker.process_reads == reads + 4  # 11 at each of its first three scans, 12 once
    tracker.scan()  # now 11 rests too; 10 has its libc
    assert tracker.process_reads == reads + 4


def test_a_replaced_library_is_opened_through_map_files(host: FakeHost) -> None:
    host_root = host.root("host", LIBC)
    old = host.root("old-package", LIBC) / LIBC[1:]  # the file the process still maps
    (host_root / LIBC[1:]).write_text("the upgraded libc")
    lines = [line + " (deleted)" if line.endswith(LIBC) else line for line in maps_lines(LIBC)]
    pid_dir = host.process(10, host_root, lines)
    (pid_dir / "map_files").mkdir()
    start, end = lines[0].split()[0].split("-")
    (pid_dir / "map_files" / f"{start}-{end}").symlink_to(old)
    found = c_libraries_of(host.proc, 10)
    assert list(found) == [key(old)]
    assert found[key(old)].open_path.read_text() == f"old-package:{LIBC}"


def test_unreachable_files_are_skipped(host: FakeHost) -> None:
    empty_root = host.root("empty")
    empty_root.mkdir(parents=True)
    host.process(10, empty_root, maps_lines(LIBC))  # the root does not hold the mapped file
    assert c_libraries_of(host.proc, 10) == {}
    with pytest.raises(FileNotFoundError):
        c_libraries_of(host.proc, 12345)
