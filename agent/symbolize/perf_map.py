"""Symbolize stage: names for JIT-compiled code from perf maps (`/tmp/perf-PID.map`).

This module owns `PerfMapStore`. Runtimes that generate code write one `START SIZE name` line (hex
start and size; the name may hold spaces) per compiled function to `/tmp/perf-<pid>.map`: Node with
`--perf-basic-prof`, the JVM after `jcmd PID Compiler.perfmap`, Python 3.12+ with `-X perf`. An
address in a mapping with no ELF file behind it (anonymous, memfd, or no mapping at all) is named
from that file.

- **Where.** The file is read through the process's root, `/proc/PID/root/tmp/perf-<nspid>.map`,
  where `nspid` is the pid inside the process's own pid namespace (the last `NSpid:` field of
  `/proc/PID/status`): a containerized runtime names the file after the pid it sees.
- **When.** At `observe` (the pipeline thread, once per pid and interval, while the process is alive;
  for a process without a perf map that costs one failed `open`; the snapshot's mappings are no
  guide, since it is usually taken before a runtime has mapped any code), and at most once per
  `symbolize` call per pid on a lookup. Runtimes do not delete the file when they exit, but
  `/proc/PID/root` goes away with the process: a host-namespace process's file is then read at the
  host path, only when it is still the file (device, inode) read before, so what was appended just
  before exit is not lost. A containerized process's last lines are lost when it exits between two
  reads. The agent does not ask a JVM to write its map (`jcmd PID Compiler.perfmap`).
- **Growth.** Each map remembers the file's identity, size and mtime and how many bytes it parsed (up
  to the last complete line). A grown file is read from there; a shrunk or replaced one is re-read.
- **Memory.** All maps together hold at most `max_entries` entries; lines past the budget are
  dropped and counted. A map lives as long as the process's snapshot in the process registry.
- **Lookups.** Entries are kept sorted by start; an address is named by the entry with the greatest
  start at or below it, when that entry covers it. At an equal start, the later line wins (code
  reused after the runtime freed it).

Threads: a refresh takes the map's own lock without waiting (a map another thread is reading is used
as it is); tables are immutable and swapped whole, under the store's lock, so lookups never lock.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from array import array
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from agent.process.maps import MapKind, root_path
from agent.symbolize.stats import ErrorReason, SymbolizerStats

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 500_000  # about 60 MB at the ~120 bytes an entry costs with a JVM-sized name
MAX_READ_BYTES = 16 << 20  # per refresh; the rest of a huge file is read by the next refreshes
# Executable mappings whose code no ELF file describes: where JIT code lives.
JIT_KINDS = frozenset({MapKind.ANON, MapKind.MEMFD, MapKind.SPECIAL})
_ADDRESS_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True, eq=False)
class PerfMapTable:
    """One perf map's entries sorted by start: `names[i]` covers `[starts[i], ends[i])`."""

    starts: array[int]
    ends: array[int]
    names: tuple[str, ...]

    def lookup(self, address: int) -> str:
        i = bisect.bisect_right(self.starts, address) - 1
        return self.names[i] if i >= 0 and address < self.ends[i] else ""

    def __len__(self) -> int:
        return len(self.names)


EMPTY_TABLE = PerfMapTable(array("Q"), array("Q"), ())
Entry = tuple[int, int, str]  # start, end (exclusive), name


def parse_perf_map(data: bytes) -> tuple[list[Entry], int]:
    """Entries of the complete lines in `data`, in file order, and how many lines were malformed."""
    entries: list[Entry] = []
    malformed = 0
    for line in data.split(b"\n"):
        parts = line.split(None, 2)
        if not parts:
            continue
        try:
            start, size = int(parts[0], 16), int(parts[1], 16)
            name = parts[2].strip().decode("utf-8", "replace")
        except (ValueError, IndexError):
            malformed += 1
            continue
        if start < 0 or size <= 0 or start + size >= _ADDRESS_LIMIT or not name:
            malformed += 1
            continue
        entries.append((start, start + size, name))
    return entries, malformed


def merge_entries(table: PerfMapTable, entries: list[Entry]) -> PerfMapTable:
    """`table` with `entries` (in file order) added; at an equal start the later entry wins."""
    if not entries:
        return table
    latest = {start: (end, name) for start, end, name in entries}
    if not table.starts or min(latest) > table.starts[-1]:
        added = sorted(latest.items())  # the common case: code placed above everything seen so far
        starts, ends = array("Q", table.starts), array("Q", table.ends)
        starts.extend(start for start, _ in added)
        ends.extend(end for _, (end, _name) in added)
        return PerfMapTable(starts, ends, table.names + tuple(name for _, (_end, name) in added))
    merged = dict(zip(table.starts, zip(table.ends, table.names, strict=True), strict=True))
    merged.update(latest)
    keys = sorted(merged)  # an old sorted run plus a new one: timsort merges them in linear time
    return PerfMapTable(array("Q", keys), array("Q", (merged[k][0] for k in keys)), tuple(merged[k][1] for k in keys))


def read_nspid(proc_root: Path, pid: int) -> int | None:
    """The pid of `pid` in its own pid namespace; None when the process has gone."""
    try:
        status = (proc_root / str(pid) / "status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            return int(fields[-1]) if fields and fields[-1].isdigit() else pid
    return pid  # no NSpid line (kernels before 4.1): only the host namespace is supported


@dataclass(frozen=True, slots=True)
class _Chunk:
    """New bytes of a perf map: complete lines only, from `offset` (0 when the file is read afresh)."""

    data: bytes
    offset: int
    restart: bool
    identity: tuple[int, int]
    seen: tuple[int, int]


@dataclass(slots=True, eq=False)
class _PerfMap:
    pid: int
    nspid: int
    table: PerfMapTable = EMPTY_TABLE
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file parsed so far
    consumed: int = 0  # bytes parsed, up to the end of the last complete line
    seen: tuple[int, int] = (-1, -1)  # (st_size, st_mtime_ns) at the last read
    reading: threading.Lock = field(default_factory=threading.Lock)


class PerfMapStore:
    def __init__(
        self,
        proc_root: Path,
        stats: SymbolizerStats,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        host_tmp: Path = Path("/tmp"),
    ) -> None:
        self._proc_root = proc_root
        self._stats = stats
        self._max_entries = max_entries
        self._host_tmp = host_tmp
        self._lock = threading.Lock()  # guards _maps, _total, table swaps and the counters refreshes touch
        self._maps: dict[int, _PerfMap] = {}
        self._total = 0
        self._called: dict[int, _PerfMap | None] = {}  # this symbolize call's maps (report thread only)
        self._unnamed: set[int] = set()  # pids with JIT addresses no perf map named, since the last take

    def observe(self, pid: int) -> None:
        """Read (or catch up with) `pid`'s perf map now, while it is alive, if it has one."""
        perf_map = self._get(pid)
        if perf_map is not None:
            self._refresh(perf_map)

    def begin_call(self) -> None:
        self._called.clear()

    def lookup(self, pid: int, address: int) -> str:
        """The perf map's name for `address` of `pid` ("" when none); the map is refreshed once per call."""
        if pid in self._called:
            perf_map = self._called[pid]
        else:
            perf_map = self._called[pid] = self._get(pid)
            if perf_map is not None:
                self._refresh(perf_map)
        name = perf_map.table.lookup(address) if perf_map is not None else ""
        if name:
            self._stats.perf_map_hits += 1
        else:
            self._stats.perf_map_misses += 1
            self._unnamed.add(pid)
        return name

    def take_unnamed(self) -> set[int]:
        """The pids whose JIT code went unnamed since the last call (e.g. JVMs to ask for a perf map)."""
        with self._lock:
            taken, self._unnamed = self._unnamed, set()
        return taken

    def retain(self, pids: Collection[int]) -> None:
        """Drop the maps of processes no longer tracked."""
        with self._lock:
            for pid in [pid for pid in self._maps if pid not in pids]:
                self._total -= len(self._maps.pop(pid).table)

    def sizes(self) -> dict[str, int]:
        """Perf maps found (pids without one are not counted) and their entries."""
        with self._lock:
            found = sum(1 for perf_map in self._maps.values() if perf_map.identity is not None)
            return {"perf_maps": found, "perf_map_entries": self._total}

    def _get(self, pid: int) -> _PerfMap | None:
        with self._lock:
            perf_map = self._maps.get(pid)
        if perf_map is not None:
            return perf_map
        nspid = read_nspid(self._proc_root, pid)  # needs the live process
        if nspid is None:
            return None
        with self._lock:
            return self._maps.setdefault(pid, _PerfMap(pid, nspid))

    def _refresh(self, perf_map: _PerfMap) -> None:
        if not perf_map.reading.acquire(blocking=False):
            return  # the other thread is reading it: use the table as it is
        try:
            chunk = self._read_new(perf_map)
            if chunk is not None:
                self._apply(perf_map, chunk)
        finally:
            perf_map.reading.release()

    def _read_new(self, perf_map: _PerfMap) -> _Chunk | None:
        name = f"perf-{perf_map.nspid}.map"
        paths = [(root_path(self._proc_root, perf_map.pid, f"/tmp/{name}"), False)]
        if perf_map.nspid == perf_map.pid and perf_map.identity is not None:
            paths.append((self._host_tmp / name, True))  # the process may have gone: its file outlives it
        for path, same_file_only in paths:
            try:
                with open(path, "rb") as stream:
                    st = os.fstat(stream.fileno())
                    identity = (st.st_dev, st.st_ino)
                    if same_file_only and identity != perf_map.identity:
                        return None
                    restart = identity != perf_map.identity or st.st_size < perf_map.consumed
                    seen = (st.st_size, st.st_mtime_ns)
                    if not restart and seen == perf_map.seen:
                        return None
                    offset = 0 if restart else perf_map.consumed
                    stream.seek(offset)
                    data = stream.read(min(st.st_size - offset, MAX_READ_BYTES))
            except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
                continue
            except OSError as e:
                with self._lock:
                    self._stats.errors[ErrorReason.PERF_MAP_UNREADABLE] += 1
                logger.debug("cannot read %s: %s", path, e)
                return None
            complete = data.rfind(b"\n") + 1
            if complete == 0 and len(data) == MAX_READ_BYTES:
                complete = len(data)  # no line is that long: parse it (as malformed) rather than retry forever
            return _Chunk(data[:complete], offset, restart, identity, seen)
        return None

    def _apply(self, perf_map: _PerfMap, chunk: _Chunk) -> None:
        entries, malformed = parse_perf_map(chunk.data)
        with self._lock:
            old = perf_map.table
            base = EMPTY_TABLE if chunk.restart else old
            room = max(0, self._max_entries - (self._total - len(old)) - len(base))
            if len(entries) > room:
                self._stats.perf_map_entries_dropped += len(entries) - room
                self._stats.errors[ErrorReason.PERF_MAP_FULL] += 1
                logger.debug("perf map of pid %d: %d entries over budget", perf_map.pid, len(entries) - room)
                entries = entries[:room]
            if malformed:
                self._stats.errors[ErrorReason.PERF_MAP_MALFORMED] += malformed
            if chunk.data:
                self._stats.perf_map_reads += 1
            perf_map.table = merge_entries(base, entries)
            perf_map.identity, perf_map.seen = chunk.identity, chunk.seen
            perf_map.consumed = chunk.offset + len(chunk.data)
            if self._maps.get(perf_map.pid) is perf_map:
                self._total += len(perf_map.table) - len(old)
