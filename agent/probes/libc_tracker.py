"""Probes stage: which C library files the profiled processes map, for the allocation profiler.

Owns finding them in `<proc_root>/PID/maps`, identifying each by (device, inode) as seen through the
process's own root (`<proc_root>/PID/root/<path>`, so a container's libc is its own file, however it is
named on the host), and working out at each scan which uprobe targets are wanted: one per file for
every process, or one per file and process when profiling is restricted to some pids (a per-process
uprobe traps only in that process, so the others do not pay for it). A library whose file was replaced
since the process mapped it (a package upgrade shows it as "(deleted)") is opened through
`<proc_root>/PID/map_files`. This module touches no BPF: `agent.probes.alloc.AllocProbe` attaches
and detaches what `LibcTracker.scan` reports.

Scans are incremental: a process is read when first seen, again when it is reported to have exec'd
(`note_pids`), again on its first few scans while it maps no C library yet (the dynamic loader maps
libc just after exec; a process with no address space, a kernel thread, is never young), and every
process is read again every `full_scan_every` scans (a minute at the daemon's one-second refresh):
reading every process's maps costs about 0.3 ms each, too much to repeat every second on a busy host.
When every process is profiled, /proc itself is listed (for exits, and for new processes whose exec
event was lost) only every `list_every` scans; on the scans between, new images are the ones
announced by exec events.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from agent.process.maps import MapKind, map_files_path, mapped_path, parse_maps_line, root_path

ALL_PROCESSES = -1  # Target.pid of a system-wide uprobe

# glibc (libc.so.6, or libc-2.31.so on older releases) and musl (libc.musl-<arch>.so.1, mapped under
# its loader's name ld-musl-<arch>.so.1). Not libc++, libcrypto, libcap, ...
C_LIBRARY_NAME = re.compile(r"libc\.so(\.\d+)*|libc-\d[\d.]*\.so|(libc\.musl|ld-musl)-[\w.]+\.so(\.\d+)*")


class LibraryKey(NamedTuple):
    """A file's identity: the same library seen through two paths (or mount namespaces) is one key."""

    dev: int
    ino: int


class Target(NamedTuple):
    """One set of uprobes: a library, in every process (`ALL_PROCESSES`) or in one process."""

    library: LibraryKey
    pid: int


@dataclass(frozen=True, slots=True)
class Source:
    """Where a target's file can be opened: through a process that maps it."""

    pid: int
    path: str  # as the process maps it, for logs
    open_path: Path  # through the process's root (or map_files for a replaced file)


@dataclass(slots=True)
class _Scanned:
    libraries: dict[LibraryKey, Source] = field(default_factory=dict)
    scans: int = 0


def is_c_library(path: str) -> bool:
    return C_LIBRARY_NAME.fullmatch(path.rsplit("/", 1)[-1]) is not None


def c_libraries_of(proc_root: Path, pid: int) -> dict[LibraryKey, Source]:
    """The C libraries process `pid` maps, by identity. Raises OSError when the process has gone."""
    with open(proc_root / str(pid) / "maps", encoding="utf-8", errors="surrogateescape") as f:
        return _c_libraries_in(proc_root, pid, f.readlines())


def _c_libraries_in(proc_root: Path, pid: int, lines: list[str]) -> dict[LibraryKey, Source]:
    found: dict[LibraryKey, Source] = {}
    seen: set[str] = set()
    for line in lines:
        entry = parse_maps_line(line)
        if entry is None or entry.path in seen:
            continue
        if entry.kind is MapKind.FILE and is_c_library(entry.path):
            open_path = root_path(proc_root, pid, entry.path)
        elif entry.kind is MapKind.DELETED and is_c_library(mapped_path(entry)):
            open_path = map_files_path(proc_root, pid, entry)
        else:
            continue
        seen.add(entry.path)
        try:
            st = os.stat(open_path)
        except OSError:
            continue  # unreachable from here (or the process is exiting): the next scan tries again
        found.setdefault(LibraryKey(st.st_dev, st.st_ino), Source(pid, entry.path, open_path))
    return found


def _listed_pids(proc_root: Path) -> set[int]:
    with os.scandir(proc_root) as entries:
        return {int(entry.name) for entry in entries if entry.name.isdigit()}


class LibcTracker:
    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        pids: Iterable[int] = (),
        *,
        full_scan_every: int = 60,
        young_scans: int = 3,
        list_every: int = 5,
    ) -> None:
        self._proc_root = proc_root
        self._only = frozenset(pids)  # empty: every process
        self._full_scan_every = max(1, full_scan_every)
        self._list_every = max(1, list_every)
        self._young_scans = young_scans
        self._processes: dict[int, _Scanned] = {}
        self._young: set[int] = set()  # read again at every scan: they map no C library yet
        self._noted: set[int] = set()
        self._noted_lock = threading.Lock()  # note_pids is called from the perf-buffer reader thread
        self.scans = 0
        self.process_reads = 0  # /proc/PID/maps files read, over all scans

    @property
    def restricted(self) -> bool:
        return bool(self._only)

    def note_pids(self, pids: Iterable[int]) -> None:
        """These processes are new or exec'd: read their mappings again at the next scan."""
        with self._noted_lock:
            self._noted.update(pids)

    def scan(self) -> dict[Target, Source]:
        """Every target the profiled processes need now, each with a place to open its file from."""
        with self._noted_lock:
            noted, self._noted = self._noted, set()
        if self._only:  # exec events come from every process: with --pid only those are profiled
            noted &= self._only
        full = self.scans % self._full_scan_every == 0
        listing = full or self.scans % self._list_every == 0
        self.scans += 1
        if self._only or listing:
            live = set(self._only) if self._only else _listed_pids(self._proc_root)
            for pid in self._processes.keys() - live:
                self._forget(pid)
            to_read = live if full else live - self._processes.keys()
        else:
            # On the scans between listings /proc is not read at all (listing it alone costs more than
            # the rest of a scan on a busy host): a new image is announced by its exec event (noted), and
            # a forked child maps its parent's libraries. What an exit frees waits for the next listing.
            to_read = set()
        for pid in to_read | noted | self._young:
            state = self._processes.get(pid)
            self._read(pid, scans=1 if state is None or pid in noted else state.scans + 1)  # new image: young again
        wanted: dict[Target, Source] = {}
        for pid, state in sorted(self._processes.items()):
            for library, source in state.libraries.items():
                wanted.setdefault(Target(library, pid if self._only else ALL_PROCESSES), source)
        return wanted

    def _forget(self, pid: int) -> None:
        self._processes.pop(pid, None)
        self._young.discard(pid)

    def _read(self, pid: int, scans: int) -> None:
        self.process_reads += 1
        try:
            with open(self._proc_root / str(pid) / "maps", encoding="utf-8", errors="surrogateescape") as f:
                lines = f.readlines()
        except OSError:
            self._forget(pid)  # gone (or never there: a configured pid that does not exist)
            return
        if not lines:  # no address space: a kernel thread (or a zombie) will never map a library
            scans = max(scans, self._young_scans)
        state = self._processes[pid] = _Scanned(_c_libraries_in(self._proc_root, pid, lines), scans)
        if not state.libraries and scans < self._young_scans:
            self._young.add(pid)  # the loader may not have mapped libc yet: read it again next scan
        else:
            self._young.discard(pid)
