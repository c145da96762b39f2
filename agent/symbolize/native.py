"""Symbolize stage: naming user-space (native) addresses of one process.

This module owns `NativeResolver`: given a process snapshot and runtime addresses it finds each
address's mapping, loads (or takes from the cache) the mapped file's symbol table, applies the load
bias and names the function. A binary without `.symtab` is completed from its debug files
(`agent.symbolize.debuginfo`), the vDSO is named from the agent's own copy (`agent.process.vdso`),
and an address in JIT code (an executable mapping with no file, or no mapping at all) is named from
the process's perf map (`agent.symbolize.perf_map`).

Memos keep the per-frame work to a dictionary lookup, and most of them outlive a `symbolize` call:
a steady workload's addresses are resolved once, not once per interval. Per process snapshot (the
`ProcessMaps` object itself: an exec or a refresh brings a new one, and with it an empty memo), each
mapping is prepared once, each address becomes one shared `Frame`, and the caller may keep results
per stack (`stack_memo`). What may change between calls is checked, or left out:

- a prepared mapping stays valid while the ELF cache still holds the very entry (table or error) it
  was prepared from; at the snapshot's first use in a call that is checked, and an evicted or
  replaced entry (a complete table of the same build id) drops the mapping's frames and the stacks;
- frames named from a perf map (which grows), outside every mapping, or in a file that could not be
  reached, last one call, and a stack holding one is never remembered;
- memos of pids the registry no longer tracks go (`retain`), and past `max_memo_entries` frames and
  stacks in all every memo is dropped at the next call.

(file, virtual address) names are shared by the processes of one image within a call.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.process.cache import ElfEntry, ElfTableCache
from agent.process.elf import (
    ElfErrorReason,
    ElfReadError,
    ElfSymbols,
    read_build_id,
    read_elf_bytes,
    read_elf_with_hints,
)
from agent.process.maps import (
    FileIdentity,
    MapEntry,
    MapKind,
    ProcessMaps,
    load_bias,
    printable,
    resolve_file,
)
from agent.process.vdso import VDSO_PATH, VdsoUnavailable, read_own_vdso
from agent.symbolize.debuginfo import DEFAULT_DEBUG_ROOTS, DebugInfoFinder
from agent.symbolize.perf_map import JIT_KINDS, PerfMapStore
from agent.symbolize.stats import ErrorReason, SymbolizerStats
from agent.symbolize.types import Frame, FrameKind, MappingInfo
from agent.types import Stack

logger = logging.getLogger(__name__)

_ELF_REASONS = {
    ElfErrorReason.UNREADABLE: ErrorReason.ELF_UNREADABLE,
    ElfErrorReason.NOT_ELF: ErrorReason.ELF_NOT_ELF,
    ElfErrorReason.MALFORMED: ErrorReason.ELF_MALFORMED,
}


# Frames and stacks remembered across calls, all snapshots together; past it every memo is dropped.
DEFAULT_MEMO_ENTRIES = 200_000


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One mapping of one snapshot, ready for lookups: its pprof mapping and, when usable, table and bias."""

    mapping: MappingInfo
    table: ElfSymbols | None  # None: the mapping's frames keep only mapping and address
    bias: int
    identity: FileIdentity | None
    jit: bool = False  # no file behind the code: named from the perf map
    # The ELF cache's entry (table or error) this was prepared from: valid while the cache still holds it.
    source: ElfEntry | None = None
    retry: bool = False  # its file could not be reached this call: prepared again in the next one


@dataclass(frozen=True, slots=True)
class StackFrames:
    """One stack's frames with how many of them got a name: what `stack_memo` keeps per stack."""

    frames: tuple[Frame, ...]
    named: int
    unnamed: int


@dataclass(slots=True, eq=False)
class _SnapshotMemo:
    """Work on one snapshot, kept across calls while the snapshot is the pid's and its ELF entries stay cached.

    `frames` holds the frames that only the snapshot and its files decide (by adjusted address);
    `volatile` those a perf map names, or whose file could not be reached, which last one call.
    `stacks` is the caller's per-stack results made of `frames` only.
    """

    maps: ProcessMaps
    prepared: list[_Prepared | None]  # parallel to maps.mappings
    call: int
    frames: dict[int, Frame] = field(default_factory=dict)
    volatile: dict[int, Frame] = field(default_factory=dict)
    stacks: dict[Stack, StackFrames] = field(default_factory=dict)


class NativeResolver:
    def __init__(
        self,
        proc_root: Path,
        elf_cache_size: int,
        stats: SymbolizerStats,
        debug_roots: Sequence[Path] = DEFAULT_DEBUG_ROOTS,
        perf_maps: PerfMapStore | None = None,
        max_memo_entries: int = DEFAULT_MEMO_ENTRIES,
    ) -> None:
        self._proc_root = proc_root
        self._stats = stats
        self.cache = ElfTableCache(elf_cache_size)
        self.perf_maps = perf_maps if perf_maps is not None else PerfMapStore(proc_root, stats)
        self._debug = DebugInfoFinder(proc_root, debug_roots, stats)
        self._max_memo_entries = max_memo_entries
        self._memos: dict[int, _SnapshotMemo] = {}
        self._call = 0
        self._names: dict[tuple[FileIdentity, int], str] = {}
        self._unreachable: set[FileIdentity] = set()
        self._vdso: ElfEntry | None = None
        self._vdso_size = 0

    def begin_call(self) -> None:
        """Start a `symbolize` call: the per-call memos go, the snapshot memos are checked again at first use."""
        self._call += 1
        self._names.clear()
        self._unreachable.clear()
        self.perf_maps.begin_call()
        if self.memo_entries() > self._max_memo_entries:
            logger.debug(
                "dropping the symbol memos of %d snapshots: over %d entries", len(self._memos), self._max_memo_entries
            )
            self._memos.clear()

    def retain(self, pids: Collection[int]) -> None:
        """Drop the memos of processes no longer tracked."""
        for pid in [pid for pid in self._memos if pid not in pids]:
            del self._memos[pid]

    def memo_entries(self) -> int:
        """Frames and stacks remembered across calls."""
        return sum(len(memo.frames) + len(memo.stacks) for memo in self._memos.values())

    def stack_memo(self, maps: ProcessMaps) -> dict[Stack, StackFrames]:
        """Where the caller may keep a result per stack of `maps`'s process, if every frame of it was stable
        (see `frames`); it is emptied whenever a remembered frame of the snapshot could change."""
        return self._memo(maps).stacks

    def frames(self, maps: ProcessMaps, addresses: Sequence[int]) -> tuple[list[Frame], bool]:
        """Frames for `addresses` (already adjusted for callers) of the process `maps` describes, and whether
        all of them are stable: none named from a perf map, outside every mapping or in an unreachable file."""
        memo = self._memo(maps)
        stable_frames = memo.frames
        result = []
        stable = True
        for address in addresses:
            frame = stable_frames.get(address)
            if frame is None:
                frame = memo.volatile.get(address)
                if frame is None:
                    frame = self._frame(memo, address)
                stable = stable and address in stable_frames
            result.append(frame)
        return result, stable

    def _memo(self, maps: ProcessMaps) -> _SnapshotMemo:
        memo = self._memos.get(maps.pid)
        if memo is None or memo.maps is not maps:
            # First sight of this snapshot (a new process, an exec, a refresh): nothing carries over.
            memo = self._memos[maps.pid] = _SnapshotMemo(maps, [None] * len(maps.mappings), self._call)
        elif memo.call != self._call:
            self._revalidate(memo)
        return memo

    def _revalidate(self, memo: _SnapshotMemo) -> None:
        """At a snapshot's first use in a call: drop what a changed ELF cache entry or a retry invalidates."""
        memo.call = self._call
        memo.volatile.clear()
        for index, prepared in enumerate(memo.prepared):
            if prepared is None:
                continue
            if prepared.retry:
                memo.prepared[index] = None  # its frames were volatile
            elif prepared.source is not None and prepared.identity is not None:
                if self.cache.get(prepared.identity) is prepared.source:
                    self._stats.elf_cache_hits += 1
                else:  # evicted, or replaced by a complete table of the same build id
                    self._forget_mapping(memo, index)

    def _forget_mapping(self, memo: _SnapshotMemo, index: int) -> None:
        entry = memo.maps.mappings[index]
        memo.prepared[index] = None
        memo.frames = {a: f for a, f in memo.frames.items() if not entry.start <= a < entry.end}
        memo.stacks.clear()

    def _frame(self, memo: _SnapshotMemo, address: int) -> Frame:
        """Name `address` and remember the frame in `memo.frames` or, when it may change, `memo.volatile`."""
        index = memo.maps.index_of(address)
        if index < 0:
            # Still outside every mapping after the snapshot's refresh: JIT code of a process gone or
            # unmapped since, which only a perf map can name.
            frame = Frame(FrameKind.NATIVE, address, self.perf_maps.lookup(memo.maps.pid, address), None)
            memo.volatile[address] = frame
            return frame
        prepared = memo.prepared[index]
        if prepared is None:
            prepared = memo.prepared[index] = self._prepare(memo.maps.pid, memo.maps.mappings[index])
        if prepared.jit:
            jit_name = self.perf_maps.lookup(memo.maps.pid, address)
            frame = memo.volatile[address] = Frame(FrameKind.NATIVE, address, jit_name, prepared.mapping)
            return frame
        if prepared.table is None:
            frame = Frame(FrameKind.NATIVE, address, "", prepared.mapping)
        else:
            vaddr = address - prepared.bias
            if prepared.identity is None:  # the vDSO: a handful of symbols, one image for every process
                name = prepared.table.lookup(vaddr)
            else:
                key = (prepared.identity, vaddr)
                known = self._names.get(key)
                name = known if known is not None else self._names.setdefault(key, prepared.table.lookup(vaddr))
            frame = Frame(FrameKind.NATIVE, address, name, prepared.mapping)
        (memo.volatile if prepared.retry else memo.frames)[address] = frame
        return frame

    def _prepare(self, pid: int, entry: MapEntry) -> _Prepared:
        if entry.kind in (MapKind.FILE, MapKind.DELETED):
            source = self._table(pid, entry)
        elif entry.kind is MapKind.VDSO:
            source = self._vdso_symbols(entry)
        else:
            source = None
        table = source if isinstance(source, ElfSymbols) else None
        mapping = MappingInfo(
            printable(entry.path), entry.start, entry.end, entry.offset, table.build_id if table else ""
        )
        if table is None:
            # A file with an identity that left nothing in the cache could not be reached: try again later.
            retry = entry.kind in (MapKind.FILE, MapKind.DELETED) and entry.identity is not None and source is None
            jit = entry.kind in JIT_KINDS
            return _Prepared(mapping, None, 0, entry.identity, jit=jit, source=source, retry=retry)
        segment = table.segment_for_offset(entry.offset)
        if segment is None:
            self._stats.errors[ErrorReason.ELF_NO_SEGMENT] += 1
            logger.debug("%s: offset %#x of pid %d's mapping is in no PT_LOAD", entry.path, entry.offset, pid)
            return _Prepared(mapping, None, 0, entry.identity, source=table)
        return _Prepared(mapping, table, load_bias(entry, segment), entry.identity, source=table)

    def _vdso_symbols(self, entry: MapEntry) -> ElfEntry | None:
        """The vDSO's symbols, read from the agent's own copy once (an error is counted once and kept); None
        for a vDSO of another size, which is another image (a 32-bit process's) that they would misname."""
        if self._vdso is None:
            try:
                image = read_own_vdso()
                self._vdso_size = len(image)
                self._vdso = read_elf_bytes(image, VDSO_PATH)
            except VdsoUnavailable as e:
                self._vdso = ElfReadError(ElfErrorReason.UNREADABLE, VDSO_PATH, str(e))
            except ElfReadError as e:
                self._vdso = e
            if isinstance(self._vdso, ElfReadError):
                self._stats.errors[_ELF_REASONS[self._vdso.reason]] += 1
                logger.warning("vDSO frames stay unnamed: %s", self._vdso)
        return self._vdso if entry.end - entry.start == self._vdso_size else None

    def _table(self, pid: int, entry: MapEntry) -> ElfEntry | None:
        """The ELF cache's entry for the mapped file (loading it on a miss); None when it has no identity or
        cannot be reached now."""
        identity = entry.identity
        if identity is None:
            self._stats.errors[ErrorReason.ELF_NO_IDENTITY] += 1
            return None
        cached = self.cache.get(identity)
        if cached is not None:
            self._stats.elf_cache_hits += 1
            return cached
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
            return e
        self.cache.put(identity, table)
        return table
