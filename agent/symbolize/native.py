"""Symbolize stage: naming user-space (native) addresses of one process.

This module owns `NativeResolver`: given a process snapshot and runtime addresses it finds each
address's mapping, loads (or takes from the cache) the mapped file's symbol table, applies the load
bias and names the function. A binary without `.symtab` is completed from its debug files
(`agent.symbolize.debuginfo`), and an address in JIT code (an executable mapping with no file, or no
mapping at all) is named from the process's perf map (`agent.symbolize.perf_map`).

Per-`symbolize`-call memos keep the per-frame work to a dictionary lookup: each mapping of a snapshot
is prepared once per call, each (file, virtual address) is named once per call, and each
(pid, address) becomes one shared `Frame`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.symbolize.cache import ElfTableCache
from agent.symbolize.debuginfo import DEFAULT_DEBUG_ROOTS, DebugInfoFinder
from agent.symbolize.elf_symbols import ElfErrorReason, ElfReadError, ElfSymbols, read_build_id, read_elf_with_hints
from agent.symbolize.perf_map import JIT_KINDS, PerfMapStore
from agent.symbolize.proc_maps import (
    FileIdentity,
    MapEntry,
    MapKind,
    ProcessMaps,
    load_bias,
    printable,
    resolve_file,
)
from agent.symbolize.stats import ErrorReason, SymbolizerStats
from agent.symbolize.types import Frame, FrameKind, MappingInfo

logger = logging.getLogger(__name__)

_ELF_REASONS = {
    ElfErrorReason.UNREADABLE: ErrorReason.ELF_UNREADABLE,
    ElfErrorReason.NOT_ELF: ErrorReason.ELF_NOT_ELF,
    ElfErrorReason.MALFORMED: ErrorReason.ELF_MALFORMED,
}


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One mapping of one snapshot, ready for lookups: its pprof mapping and, when usable, table and bias."""

    mapping: MappingInfo
    table: ElfSymbols | None
    bias: int
    identity: FileIdentity | None
    jit: bool = False  # no file behind the code: named from the perf map


@dataclass(slots=True)
class _SnapshotMemo:
    """Per-call work on one snapshot; replaced when the pid's snapshot object changes (a refresh)."""

    maps: ProcessMaps
    prepared: list[_Prepared | None]  # parallel to maps.mappings
    frames: dict[int, Frame] = field(default_factory=dict)  # by (adjusted) address


class NativeResolver:
    def __init__(
        self,
        proc_root: Path,
        elf_cache_size: int,
        stats: SymbolizerStats,
        debug_roots: Sequence[Path] = DEFAULT_DEBUG_ROOTS,
        perf_maps: PerfMapStore | None = None,
    ) -> None:
        self._proc_root = proc_root
        self._stats = stats
        self.cache = ElfTableCache(elf_cache_size)
        self.perf_maps = perf_maps if perf_maps is not None else PerfMapStore(proc_root, stats)
        self._debug = DebugInfoFinder(proc_root, debug_roots, stats)
        self._memos: dict[int, _SnapshotMemo] = {}
        self._names: dict[tuple[FileIdentity, int], str] = {}
        self._unreachable: set[FileIdentity] = set()

    def begin_call(self) -> None:
        """Drop the per-call memos: snapshots and files may have changed since the last call."""
        self._memos.clear()
        self._names.clear()
        self._unreachable.clear()
        self.perf_maps.begin_call()

    def frames(self, maps: ProcessMaps, addresses: Sequence[int]) -> list[Frame]:
        """Frames for `addresses` (already adjusted for callers) of the process `maps` describes."""
        memo = self._memos.get(maps.pid)
        if memo is None or memo.maps is not maps:
            memo = _SnapshotMemo(maps, [None] * len(maps.mappings))
            self._memos[maps.pid] = memo
        result = []
        for address in addresses:
            frame = memo.frames.get(address)
            if frame is None:
                frame = self._frame(memo, address)
                memo.frames[address] = frame
            result.append(frame)
        return result

    def _frame(self, memo: _SnapshotMemo, address: int) -> Frame:
        index = memo.maps.index_of(address)
        if index < 0:
            # Still outside every mapping after the snapshot's refresh: JIT code of a process gone or
            # unmapped since, which only a perf map can name.
            return Frame(FrameKind.NATIVE, address, self.perf_maps.lookup(memo.maps.pid, address), None)
        prepared = memo.prepared[index]
        if prepared is None:
            prepared = self._prepare(memo.maps.pid, memo.maps.mappings[index])
            memo.prepared[index] = prepared
        if prepared.jit:
            return Frame(FrameKind.NATIVE, address, self.perf_maps.lookup(memo.maps.pid, address), prepared.mapping)
        if prepared.table is None or prepared.identity is None:
            return Frame(FrameKind.NATIVE, address, "", prepared.mapping)
        vaddr = address - prepared.bias
        key = (prepared.identity, vaddr)
        name = self._names.get(key)
        if name is None:
            name = prepared.table.lookup(vaddr)
            self._names[key] = name
        return Frame(FrameKind.NATIVE, address, name, prepared.mapping)

    def _prepare(self, pid: int, entry: MapEntry) -> _Prepared:
        table = self._table(pid, entry) if entry.kind is MapKind.FILE else None
        build_id = table.build_id if table is not None else ""
        mapping = MappingInfo(printable(entry.path), entry.start, entry.end, entry.offset, build_id)
        if table is None:
            return _Prepared(mapping, None, 0, None, jit=entry.kind in JIT_KINDS)
        segment = table.segment_for_offset(entry.offset)
        if segment is None:
            self._stats.errors[ErrorReason.ELF_NO_SEGMENT] += 1
            logger.debug("%s: offset %#x of pid %d's mapping is in no PT_LOAD", entry.path, entry.offset, pid)
            return _Prepared(mapping, None, 0, None)
        return _Prepared(mapping, table, load_bias(entry, segment), entry.identity)

    def _table(self, pid: int, entry: MapEntry) -> ElfSymbols | None:
        identity = entry.identity
        if identity is None:
            self._stats.errors[ErrorReason.ELF_NO_IDENTITY] += 1
            return None
        cached = self.cache.get(identity)
        if cached is not None:
            self._stats.elf_cache_hits += 1
            return cached if isinstance(cached, ElfSymbols) else None
        self._stats.elf_cache_misses += 1
        if identity in self._unreachable:
            return None
        path = resolve_file(self._proc_root, pid, entry)
        if path is None:
            # Not cached across calls: another process of the same image may still make it reachable.
            self._unreachable.add(identity)
            self._stats.errors[ErrorReason.ELF_UNREACHABLE] += 1
            logger.debug("%s of pid %d is no longer reachable with the identity it was mapped with", entry.path, pid)
            return None
        try:
            # The build id is cheap to read; a binary already parsed under another identity is reused,
            # unless that copy was stripped and this one may name more (its own .symtab, MiniDebugInfo).
            table = self.cache.get_by_build_id(read_build_id(path, entry.path))
            if table is None or not table.complete:
                table, hints = read_elf_with_hints(path, entry.path)
                table = self._debug.complete(pid, entry.path, table, hints)
                self._stats.elf_tables_loaded += 1
        except ElfReadError as e:
            self._stats.errors[_ELF_REASONS[e.reason]] += 1
            logger.debug("cannot symbolize with %s: %s", entry.path, e)
            self.cache.put(identity, e)
            return None
        self.cache.put(identity, table)
        return table
