"""Process stage (stage-neutral): snapshots of a process's executable mappings, comm and exe.

They are read from `<proc_root>/PID`; the unwind and the symbolize stages read them through the process
registry, and the probes' C library tracking uses this module's maps-line parser.

This module owns `ProcessMaps` (the immutable snapshot), `MapEntry`, `FileIdentity` and the rule for
opening a mapped file later: through `<proc_root>/PID/root/<path>` so a container's files resolve in
its own mount namespace, else, once the process has gone, through the host path, but only when the
file there is still the one the process mapped (same device, inode and mtime as at snapshot time).

Only executable mappings are kept: the load bias of a file is derived from its executable mapping's
start and offset together with the ELF program header covering that offset (see `load_bias`), so the
read-only and data mappings add nothing.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import os
from pathlib import Path
from typing import NamedTuple

from agent.process.elf import LoadSegment
from agent.process.pinned import PINNED

_DELETED_SUFFIX = " (deleted)"


class MapKind(enum.Enum):
    FILE = "file"  # a regular file that can be opened and parsed as ELF
    ANON = "anon"  # no backing file: JIT code, anonymous executable memory
    VDSO = "vdso"
    VSYSCALL = "vsyscall"
    SPECIAL = "special"  # other bracketed kernel names: [heap], [stack], [uprobes], ...
    DELETED = "deleted"  # the file was unlinked after being mapped; its path names nothing now
    MEMFD = "memfd"  # memfd_create() memory; has no path outside the process


class FileIdentity(NamedTuple):
    dev: int
    ino: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns)


@dataclasses.dataclass(frozen=True, slots=True)
class MapEntry:
    """One line of /proc/PID/maps (runtime addresses), plus the file's identity when it is a FILE."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str  # as shown in maps, " (deleted)" included; undecodable bytes kept as surrogates (see `printable`)
    kind: MapKind
    identity: FileIdentity | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessMaps:
    pid: int
    comm: str
    exe_path: str  # /proc/PID/exe target as valid UTF-8; "" for kernel threads or when unreadable
    mappings: tuple[MapEntry, ...]  # executable mappings, sorted by start
    starts: tuple[int, ...]  # mappings[i].start, for bisection

    def index_of(self, address: int) -> int:
        """Index in `mappings` of the mapping holding `address`, or -1."""
        i = bisect.bisect_right(self.starts, address) - 1
        return i if i >= 0 and address < self.mappings[i].end else -1

    def find(self, address: int) -> MapEntry | None:
        i = self.index_of(address)
        return self.mappings[i] if i >= 0 else None


def classify(path: str, inode: int) -> MapKind:
    if not path or path.startswith("[anon"):
        return MapKind.ANON
    if path == "[vdso]":
        return MapKind.VDSO
    if path == "[vsyscall]":
        return MapKind.VSYSCALL
    if path.startswith("["):
        return MapKind.SPECIAL
    if path.startswith("/memfd:"):
        return MapKind.MEMFD
    if path.endswith(_DELETED_SUFFIX):
        return MapKind.DELETED
    if inode == 0 or not path.startswith("/"):
        # Not a file reachable by path (e.g. anonymous shared memory named by the kernel).
        return MapKind.SPECIAL
    return MapKind.FILE


def parse_maps_line(line: str) -> MapEntry | None:
    """Parse `start-end perms offset dev inode [path]`; None for a line that does not have that shape."""
    parts = line.rstrip("\n").split(maxsplit=5)
    if len(parts) < 5:
        return None
    try:
        start_s, end_s = parts[0].split("-", 1)
        start, end = int(start_s, 16), int(end_s, 16)
        offset = int(parts[2], 16)
        inode = int(parts[4])
    except ValueError:
        return None
    # The path is everything after the inode column; paths may contain spaces, so split only 5 times.
    path = parts[5].strip() if len(parts) == 6 else ""
    return MapEntry(start, end, parts[1], offset, inode, path, classify(path, inode))


def printable(path: str) -> str:
    """`path` as valid UTF-8 for profiles; paths are read with surrogateescape so that they still open."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def root_path(proc_root: Path, pid: int, path: str) -> Path:
    """`path` as seen from the process's mount namespace, through the /proc/PID/root magic link."""
    return proc_root / str(pid) / "root" / path.lstrip("/")


def _stat_identity(path: Path | str) -> FileIdentity | None:
    try:
        return FileIdentity.of(os.stat(path))
    except OSError:
        return None


def read_process_maps(proc_root: Path, pid: int) -> ProcessMaps:
    """Snapshot `<proc_root>/PID`: executable mappings with file identities, comm and exe.

    Raises `OSError` when the maps cannot be read (`FileNotFoundError` or `ProcessLookupError` when the
    process has gone). comm and exe are best effort: kernel threads have no exe.
    """
    pid_dir = proc_root / str(pid)
    with open(pid_dir / "maps", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.readlines()
    identities: dict[str, FileIdentity | None] = {}
    entries: list[MapEntry] = []
    root = f"{proc_root}/{pid}/root/"
    for line in lines:
        # Most lines are data, not code: skip them before parsing (`start-end rwxp ...`: x is the third
        # letter of perms). An exec storm captures hundreds of processes a second (#16).
        space = line.find(" ")
        if line[space + 3 : space + 4] != "x":
            continue
        entry = parse_maps_line(line)
        if entry is None or "x" not in entry.perms:
            continue
        if entry.kind is MapKind.FILE:
            if entry.path not in identities:
                identities[entry.path] = _stat_identity(root + entry.path.lstrip("/"))
            entry = dataclasses.replace(entry, identity=identities[entry.path])
        elif entry.kind is MapKind.DELETED:
            # Unlinked (a package upgrade replaces binaries under running processes): the mapping's
            # map_files link still reaches the very file, while the process lives.
            entry = dataclasses.replace(entry, identity=_stat_identity(map_files_path(proc_root, pid, entry)))
        entries.append(entry)
    entries.sort(key=lambda e: e.start)
    return ProcessMaps(
        pid=pid,
        comm=_read_comm(pid_dir),
        exe_path=printable(_read_exe(pid_dir)),
        mappings=tuple(entries),
        starts=tuple(e.start for e in entries),
    )


def _read_comm(pid_dir: Path) -> str:
    try:
        return (pid_dir / "comm").read_text(encoding="utf-8", errors="replace").rstrip("\n")
    except OSError:
        return ""


def _read_exe(pid_dir: Path) -> str:
    try:
        return os.readlink(pid_dir / "exe")
    except OSError:
        return ""


def resolve_file(proc_root: Path, pid: int, entry: MapEntry) -> Path | None:
    """A path through which the agent can open the very file `entry` maps, or None.

    The process's own view comes first. The host path is only trusted when its identity matches the
    snapshot: after the process has gone, the same path on the host may be another binary (a container
    image layer, a reinstalled package). Last, /proc/PID/map_files, which reaches a file that was
    deleted or replaced since it was mapped, for as long as the process lives; after it, the
    descriptor `agent.process.pinned.PINNED` holds for a deleted file.
    """
    if entry.kind not in (MapKind.FILE, MapKind.DELETED) or entry.identity is None:
        return None
    candidates = [root_path(proc_root, pid, entry.path), Path(entry.path)] if entry.kind is MapKind.FILE else []
    for candidate in (*candidates, map_files_path(proc_root, pid, entry)):
        if _stat_identity(candidate) == entry.identity:
            return candidate
    return PINNED.path_of(entry.identity)  # a deleted file the registry pinned while it was mapped


def map_files_path(proc_root: Path, pid: int, entry: MapEntry) -> Path:
    """The process's link to the file a mapping maps (root only), whatever became of its path."""
    return proc_root / str(pid) / "map_files" / f"{entry.start:x}-{entry.end:x}"


def mapped_path(entry: MapEntry) -> str:
    """The mapped file's path, without the " (deleted)" the kernel appends once it is unlinked."""
    return entry.path.removesuffix(_DELETED_SUFFIX) if entry.kind is MapKind.DELETED else entry.path


def load_bias(entry: MapEntry, segment: LoadSegment) -> int:
    """Runtime address minus link-time virtual address for addresses inside `entry`.

    The loader maps the page holding `p_offset` at the page holding `p_vaddr + bias`. The mapping
    starts at file offset `entry.offset`, so a runtime address A is file offset
    `A - start + offset`, which is virtual address `file_offset - p_offset + p_vaddr`. Hence
    `bias = start - offset + p_offset - p_vaddr`: 0 for non-PIE executables, the load base for PIE
    executables and shared objects.
    """
    return entry.start - entry.offset + segment.offset - segment.vaddr
