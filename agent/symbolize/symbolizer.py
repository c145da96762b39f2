"""Symbolize stage entry point: `IntervalProfile` (raw addresses) in, `Profile` (named frames) out.

This module owns `Symbolizer`, the object the daemon keeps for the agent's lifetime. It ties together
the kernel symbol table, the native resolver with its ELF cache and debug-file lookup, the perf maps of
JIT runtimes, the Python frames merged over the eval loop's native frames (`agent.symbolize.python_merge`,
naming code objects through the process stage's cache), a JVM's interpreted Java frames in place of the
interpreter's (`agent.symbolize.java_merge`) and the marker frames, and converts monotonic
timestamps to Unix time. It reads the
processes' snapshots from the daemon's one `agent.process.registry.ProcessRegistry` (taken as soon as a
pid is seen), recapturing a process whose code was mapped since, and ends the registry's interval. Each
`Profile.processes` entry carries the labels (container, pod, systemd unit) the metadata stage read when
the process was captured, and a Python process its `process.runtime.*` labels.

Most of the work outlives one `symbolize` call: kernel stacks and frames are remembered while the
kallsyms table stays the same, and user stacks and frames per process snapshot as long as the native
resolver says they hold (see `agent.symbolize.native`), so a steady workload costs about one dictionary
lookup per stack and interval.

Threads: `symbolize` is called from the report thread; the registry calls the perf-map store's
`observe` from the pipeline thread (see `ProcessRegistry.add_observer`). Only the process registry and the
perf-map store are shared, and each carries its own lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from agent.aggregate.types import AggregatedSample, IntervalProfile
from agent.metadata.process import ProcessLabels
from agent.process.maps import ProcessMaps
from agent.process.registry import ProcessRegistry, Snapshot
from agent.symbolize.debuginfo import DEFAULT_DEBUG_ROOTS
from agent.symbolize.java_merge import JavaMerger, ReaderOf
from agent.symbolize.kallsyms import KallsymsCache, KernelSymbols
from agent.symbolize.markers import NO_STACK, pprof_addresses, status_marker
from agent.symbolize.native import NativeResolver, StackFrames
from agent.symbolize.perf_map import DEFAULT_MAX_ENTRIES, PerfMapStore
from agent.symbolize.python_merge import MergeCall, PythonCodes, PythonMerger
from agent.symbolize.settings import SymbolizeConfig
from agent.symbolize.stats import SymbolizerStats
from agent.symbolize.types import Frame, FrameKind, ProcessInfo, Profile, Sample
from agent.types import Stack, StackStatus

_FRAMES_BY_STATUS = (StackStatus.OK, StackStatus.TRUNCATED)


_NONE = StackFrames((), 0, 0)
# Kernel stacks and frames remembered across calls (while the kallsyms table stays the same); past it
# they are dropped.
_KERNEL_MEMO_ENTRIES = 100_000


@dataclass(slots=True)
class _CallState:
    """Memos of one `symbolize` call: identical stacks are symbolized once (see also the lasting memos)."""

    user: dict[tuple[int, int, Stack], StackFrames] = field(default_factory=dict)  # stacks not kept across calls
    maps: dict[int, ProcessMaps | None] = field(default_factory=dict)  # None: could not be captured
    refreshed: set[int] = field(default_factory=set)
    kernel_checked: bool = False  # whether the kallsyms table was checked for a reload in this call
    python: MergeCall = field(default_factory=MergeCall)
    retired: dict[int, ProcessInfo] = field(default_factory=dict)  # by id of a retired image's maps


_DEFAULTS = SymbolizeConfig()  # the declared defaults of the `symbolize` section


class Symbolizer:
    """Turns raw stacks into named frames; see the module docstring for the threading rules."""

    def __init__(
        self,
        processes: ProcessRegistry,
        elf_cache_size: int = _DEFAULTS.elf_cache_size,
        debug_roots: Sequence[Path] = DEFAULT_DEBUG_ROOTS,
        perf_map_max_entries: int = DEFAULT_MAX_ENTRIES,
        python: PythonCodes | None = None,
        java: ReaderOf | None = None,
    ) -> None:
        """`processes` is the daemon's registry; files and kallsyms are read under its `proc_root`.

        `debug_roots` are where separate debug files live (`.build-id/` and debug-link trees), each looked
        up through the process's root first; `perf_map_max_entries` bounds all perf maps together.
        `python` names Python frames (the process stage's code cache); without it they are counted only.
        `java` gives a JVM's method reader (the JVM flow's), which names its interpreted Java frames.
        """
        proc_root = processes.proc_root
        self.stats = SymbolizerStats()
        self.processes = processes
        self._kallsyms = KallsymsCache(proc_root / "kallsyms", self.stats)
        self._perf_maps = PerfMapStore(proc_root, self.stats, perf_map_max_entries)
        self._native = NativeResolver(proc_root, elf_cache_size, self.stats, debug_roots, self._perf_maps)
        self.python = PythonMerger(python)
        self.java = JavaMerger(java)
        self._kernel_table: KernelSymbols | None = None
        self._kernel_stacks: dict[Stack, StackFrames] = {}
        self._kernel_frames_memo: dict[int, Frame] = {}  # by adjusted address
        # A live process's perf map is caught up with when the pipeline first sees it (see
        # `agent.symbolize.perf_map`). On exec the map stays: a new image that writes one truncates or
        # replaces the file, which is then read afresh, and the old image's samples may still need it.
        processes.add_observer(self._perf_maps.observe)

    def take_unnamed_jit_pids(self) -> set[int]:
        """Processes whose JIT code went unnamed since the last call (safe from another thread)."""
        return self._perf_maps.take_unnamed()

    def cache_sizes(self) -> dict[str, int]:
        """Current entry counts of the caches, for the metrics stage."""
        return {
            **self._native.cache.sizes(),
            **self._perf_maps.sizes(),
            "kernel_symbols": self._kallsyms.size(),
            "symbol_memo": self._native.memo_entries() + self._kernel_memo_entries(),
        }

    def symbolize(self, interval: IntervalProfile) -> Profile:
        """Name every sample's frames (kernel then user, leaf first) and convert times to Unix nanoseconds.

        Per-pid, per-file and per-kernel-table failures are counted in `stats` and leave frames with
        their mapping and address; they never raise.
        """
        self._native.begin_call()
        state = _CallState()
        offset = interval.mono_to_unix_offset_ns
        samples = tuple(self._sample(agg, offset, state) for agg in interval.samples)
        pids = sorted({s.pid for s in samples})
        processes = self._process_infos(pids, interval.samples)
        self.processes.end_interval(pids)
        tracked = self.processes.pids()
        self._perf_maps.retain(tracked)
        self._native.retain(tracked)
        return Profile(
            spec=interval.spec,
            start_unix_ns=interval.start_mono_ns + offset,
            duration_ns=interval.end_mono_ns - interval.start_mono_ns,
            samples=samples,
            processes=MappingProxyType(processes),
        )

    def _sample(self, agg: AggregatedSample, offset: int, state: _CallState) -> Sample:
        key = agg.key
        kernel = self._kernel_frames(key.kernel, state)
        first = agg.timestamps_mono_ns[0] if agg.timestamps_mono_ns else 0
        # The image the sample ran in: one an exec has retired since, or the current one.
        retired = self.processes.retired_at(key.pid, first) if first else None
        user = self._user_frames(key.pid, key.user, state, first, retired)
        user_frames = user.frames
        if key.user.java:  # a JVM's interpreted frames, read as its stack was unwound
            user_frames = self.java.merge(key.pid, key.user, user_frames)
        if key.python.status:  # InterpreterStatus.NONE is 0: not a walked Python process
            user_frames = self.python.merge(key.pid, key.user, user.frames, key.python, state.python)
        frames = kernel.frames + user_frames or (NO_STACK,)
        self.stats.frames_symbolized += kernel.named + user.named
        self.stats.frames_unsymbolized += kernel.unnamed + user.unnamed
        return Sample(
            pid=key.pid,
            tid=key.tid,
            cpu=key.cpu,
            thread_name=agg.thread_name,
            frames=frames,
            values=agg.values,
            timestamps_unix_ns=tuple(t + offset for t in agg.timestamps_mono_ns),
            process=self._retired_info(key.pid, retired, state) if retired is not None else None,
        )

    def _retired_info(self, pid: int, retired: Snapshot, state: _CallState) -> ProcessInfo:
        """The ProcessInfo of a retired image: its own comm and exe, the labels read with it. No runtime:
        the Python walker's verdict is about the current image."""
        info = state.retired.get(id(retired.maps))
        if info is None:
            info = state.retired[id(retired.maps)] = _process_info(pid, retired.maps, retired.labels, ("", ""))
        return info

    def _kernel_frames(self, stack: Stack, state: _CallState) -> StackFrames:
        if stack.status not in _FRAMES_BY_STATUS or not stack.addresses:
            return _marker_only(stack, "kernel")
        table = self._kernel_symbols(state)
        result = self._kernel_stacks.get(stack)
        if result is None:
            frames = []
            for address in pprof_addresses(stack.addresses):
                frame = self._kernel_frames_memo.get(address)
                if frame is None:
                    frame = Frame(FrameKind.KERNEL, address, table.lookup(address), table.mapping)
                    self._kernel_frames_memo[address] = frame
                frames.append(frame)
            result = self._kernel_stacks[stack] = _finish(frames, stack, "kernel")
        return result

    def _kernel_symbols(self, state: _CallState) -> KernelSymbols:
        """The kallsyms table, checked for a reload once per call; the kernel memos hold for one table."""
        table = self._kernel_table
        if table is None or not state.kernel_checked:
            state.kernel_checked = True
            table = self._kallsyms.table()
            if table is not self._kernel_table or self._kernel_memo_entries() > _KERNEL_MEMO_ENTRIES:
                self._kernel_table = table
                self._kernel_stacks.clear()
                self._kernel_frames_memo.clear()
        return table

    def _kernel_memo_entries(self) -> int:
        return len(self._kernel_stacks) + len(self._kernel_frames_memo)

    def _user_frames(
        self, pid: int, stack: Stack, state: _CallState, when: int, retired: Snapshot | None
    ) -> StackFrames:
        """`when`: the sample's first event (CLOCK_MONOTONIC; 0: unknown); `retired`: the image an exec
        has retired since that the sample ran in, or None for the current one."""
        if stack.status not in _FRAMES_BY_STATUS or not stack.addresses:
            return _marker_only(stack, "user")
        if retired is not None:
            maps: ProcessMaps | None = retired.maps  # the process has another image now: never refreshed
        elif when and self.processes.forgotten(pid, when):
            maps = None  # too many execs since: unnamed rather than named from another image
        else:
            maps = self._maps(pid, state)
        image = id(retired.maps) if retired is not None else 0
        # A stack remembered for this very snapshot lies inside its mappings: it needs no refresh check.
        result = self._native.stack_memo(maps).get(stack) if maps is not None else None
        if result is None:
            result = state.user.get((pid, image, stack))
        if result is None:
            addresses = pprof_addresses(stack.addresses)
            stable = False
            if maps is None:
                frames = [Frame(FrameKind.NATIVE, address, "", None) for address in addresses]
            else:
                if retired is None:
                    maps = self._covering(pid, maps, addresses, state)
                frames, stable = self._native.frames(maps, addresses)
            result = _finish(frames, stack, "user")
            if maps is not None and stable:
                self._native.stack_memo(maps)[stack] = result
            else:
                state.user[(pid, image, stack)] = result
        return result

    def _maps(self, pid: int, state: _CallState) -> ProcessMaps | None:
        """The pid's snapshot, captured now if missing (the process may still be alive)."""
        if pid in state.maps:
            return state.maps[pid]
        maps = state.maps[pid] = self.processes.get(pid) or self.processes.observe(pid)
        return maps

    def _covering(self, pid: int, maps: ProcessMaps, addresses: Iterable[int], state: _CallState) -> ProcessMaps:
        """`maps`, or a new snapshot when an address is outside every mapping.

        That means the process mapped code after its snapshot (dlopen, JIT): the snapshot is retaken once
        per call, and kept as it was when the process has gone.
        """
        if pid in state.refreshed:
            return maps
        if any(maps.index_of(address) < 0 for address in addresses):
            state.refreshed.add(pid)
            refreshed = self.processes.refresh(pid)
            if refreshed is not None:
                maps = state.maps[pid] = refreshed
        return maps

    def _process_infos(self, pids: Iterable[int], samples: Iterable[AggregatedSample]) -> dict[int, ProcessInfo]:
        # Never-captured pids (pid 0, gone too soon) fall back to their main thread's name as comm.
        main_thread_names = {s.key.pid: s.thread_name for s in samples if s.key.tid == s.key.pid}
        infos: dict[int, ProcessInfo] = {}
        for pid in pids:
            snapshot = self.processes.snapshot(pid)
            runtime_name, runtime_version = self.python.runtime(pid) or ("", "")
            if snapshot is None:
                name = main_thread_names.get(pid, "")
                infos[pid] = ProcessInfo(pid, name, "", runtime_name=runtime_name, runtime_version=runtime_version)
                continue
            infos[pid] = _process_info(pid, snapshot.maps, snapshot.labels, (runtime_name, runtime_version))
        return infos


def _process_info(pid: int, maps: ProcessMaps, labels: ProcessLabels, runtime: tuple[str, str]) -> ProcessInfo:
    return ProcessInfo(
        pid, maps.comm, maps.exe_path, labels.container_id, labels.pod_uid, labels.systemd_unit, *runtime
    )


def _marker_only(stack: Stack, side: str) -> StackFrames:
    frame = status_marker(stack.status, side)
    return StackFrames((frame,), 0, 0) if frame is not None else _NONE


def _finish(frames: list[Frame], stack: Stack, side: str) -> StackFrames:
    """Count named frames and append the truncation marker at the root end of a TRUNCATED stack."""
    named = sum(1 for f in frames if f.function)
    unnamed = len(frames) - named
    if stack.status == StackStatus.TRUNCATED:
        frame = status_marker(stack.status, side)
        if frame is not None:
            frames.append(frame)
    return StackFrames(tuple(frames), named, unnamed)
