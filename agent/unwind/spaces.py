"""Unwind stage: which unwind rule applies at a runtime address of a process.

An `AddressSpace` is one process's executable mappings (`/proc/PID/maps`, re-read when an address
falls outside them, at most once a second, for libraries loaded later) with a memo from runtime
address to rule. `UnwindTables` holds the tables of the binaries themselves, shared between
processes and keyed by file identity (device, inode, mtime), bounded by an LRU, and built once: a
binary whose CFI cannot be read is remembered as such. The vDSO has no file: its table is built
from the agent's own copy (`agent.process.vdso`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.process.cache import LruCache
from agent.process.elf import segment_for_offset
from agent.process.maps import (
    FileIdentity,
    MapEntry,
    MapKind,
    ProcessMaps,
    load_bias,
    read_process_maps,
    resolve_file,
)
from agent.process.vdso import VDSO_PATH, VdsoUnavailable, read_own_vdso
from agent.unwind.cfi import (
    CFA_UNSUPPORTED,
    LOST,
    RSP,
    CfiError,
    Rule,
    UnwindTable,
    read_unwind_table,
    read_unwind_table_bytes,
)

logger = logging.getLogger(__name__)

MAPS_REFRESH_S = 1.0
MEMO_LIMIT = 1 << 16


# What one unwinding step does at an address, precomputed from its rule: (kind, CFA offset, offset of
# the return address from the CFA, offset of the saved rbp from the CFA or KEEP_RBP/LOST). A plain tuple:
# the unwinder unpacks one per frame, and attribute access would cost more than the step itself.
Step = tuple[int, int, int, int]
UNMAPPED, FRAME_POINTER, CFA_RSP, CFA_RBP, OUTERMOST, RA_LOST = range(6)
KEEP_RBP = -(1 << 62)  # the caller's rbp is this frame's
UNMAPPED_STEP: Step = (UNMAPPED, 0, 0, 0)
FRAME_POINTER_STEP: Step = (FRAME_POINTER, 0, 0, 0)  # no CFI here (JIT code, an unreadable binary)


def step_of(rule: Rule | None) -> Step:
    if rule is None or rule.cfa_reg == CFA_UNSUPPORTED:
        return FRAME_POINTER_STEP
    if rule.ra is None:
        return (OUTERMOST, 0, 0, 0)
    if rule.ra == LOST:
        return (RA_LOST, 0, 0, 0)
    rbp = KEEP_RBP if rule.rbp is None else rule.rbp
    return (CFA_RSP if rule.cfa_reg == RSP else CFA_RBP, rule.cfa_offset, rule.ra, rbp)


@dataclass(slots=True)
class TableStats:
    loaded: int = 0
    failed: int = 0
    load_seconds: float = 0.0


class UnwindTables:
    def __init__(self, proc_root: Path, capacity: int = 256) -> None:
        self._proc_root = proc_root
        self._cache: LruCache[FileIdentity | str, UnwindTable | None] = LruCache(capacity)
        self.stats = TableStats()

    def for_mapping(self, pid: int, entry: MapEntry) -> tuple[UnwindTable, int] | None:
        """The table covering `entry` and the load bias to subtract from its runtime addresses."""
        if entry.kind is MapKind.VDSO:
            table = self._load(VDSO_PATH, VDSO_PATH, _vdso_table)
        elif entry.kind in (MapKind.FILE, MapKind.DELETED) and entry.identity is not None:
            table = self._load(entry.identity, entry.path, lambda: _file_table(self._proc_root, pid, entry))
        else:
            return None  # JIT code, anonymous memory: no CFI; the frame pointer is all there is
        if table is None:
            return None
        segment = segment_for_offset(table.segments, entry.offset)
        return (table, load_bias(entry, segment)) if segment is not None else None

    def _load(self, key: FileIdentity | str, path: str, build: Callable[[], UnwindTable]) -> UnwindTable | None:
        if key in self._cache:
            return self._cache.get(key)
        begun = time.thread_time()  # CPU time, as the unwinder counts its own
        try:
            loaded: UnwindTable | None = build()
            self.stats.loaded += 1
        except CfiError as e:
            loaded = None
            self.stats.failed += 1
            logger.debug("no unwind table for %s: %s", path, e)
        self.stats.load_seconds += time.thread_time() - begun
        self._cache.put(key, loaded)
        return loaded

    def __len__(self) -> int:
        return len(self._cache)


def _file_table(proc_root: Path, pid: int, entry: MapEntry) -> UnwindTable:
    path = resolve_file(proc_root, pid, entry)
    if path is None:
        raise CfiError(f"{entry.path} of pid {pid} is no longer reachable")
    return read_unwind_table(path)


def _vdso_table() -> UnwindTable:
    try:
        image = read_own_vdso()
    except VdsoUnavailable as e:
        raise CfiError(str(e)) from e
    return read_unwind_table_bytes(image, VDSO_PATH)


@dataclass(slots=True)
class AddressSpace:
    """One process: its executable mappings and the rules found at addresses seen so far."""

    pid: int
    maps: ProcessMaps | None
    read_at: float
    memo: dict[int, Step] = field(default_factory=dict)
    tables: dict[int, tuple[UnwindTable, int] | None] = field(default_factory=dict)  # by mapping index

    def step(self, address: int, tables: UnwindTables, proc_root: Path) -> Step:
        """The step at `address` (memoized; the unwinder reads `memo` itself first)."""
        found = self.memo.get(address)
        if found is not None:
            return found
        found = self._find(address, tables, proc_root)
        if found is UNMAPPED_STEP:
            return found  # not remembered: a library loaded later may map it (maps are re-read then)
        if len(self.memo) >= MEMO_LIMIT:
            self.memo.clear()
        self.memo[address] = found
        return found

    def _find(self, address: int, tables: UnwindTables, proc_root: Path) -> Step:
        index = self.maps.index_of(address) if self.maps is not None else -1
        if index < 0 and time.monotonic() - self.read_at >= MAPS_REFRESH_S:
            self.refresh(proc_root)  # a library loaded since the snapshot
            index = self.maps.index_of(address) if self.maps is not None else -1
        if index < 0 or self.maps is None:
            return UNMAPPED_STEP
        if index not in self.tables:
            self.tables[index] = tables.for_mapping(self.pid, self.maps.mappings[index])
        located = self.tables[index]
        if located is None:
            return FRAME_POINTER_STEP
        table, bias = located
        return step_of(table.lookup(address - bias))

    def refresh(self, proc_root: Path) -> None:
        self.read_at = time.monotonic()
        try:
            maps = read_process_maps(proc_root, self.pid)
        except OSError as e:
            logger.debug("cannot read the mappings of pid %d: %s", self.pid, e)
            return  # keep the older snapshot: the process may have exited with its samples in flight
        if not maps.mappings and not maps.exe_path and self.maps is not None:
            return  # the same for an exited process not yet reaped: its memory is gone, not changed
        self.maps = maps
        self.memo.clear()
        self.tables.clear()
