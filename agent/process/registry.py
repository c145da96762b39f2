"""Process stage (stage-neutral): the thread-safe registry of process snapshots.

This module owns `ProcessRegistry` and its counters, `ProcessStats`: which pids have a `ProcessMaps`
snapshot, capturing one the first time a pid is seen (so a process that exits before the interval ends
can still be symbolized or unwound), retiring it on exec, and expiring snapshots of pids absent from
`ttl_intervals` consecutive intervals so memory stays bounded on a busy host. Each snapshot also keeps
the process's labels (container, pod, systemd unit) read through `agent.metadata.process.ProcessMetadata`
at the same moment, while the process is alive. The daemon makes one registry: the pipeline tells it
about new processes and execs, the unwind stage reads its snapshots once a process has gone, and the
symbolize stage names frames from them.

`on_exec` retires a snapshot rather than dropping it, with the time the exec ended its image: for at
most two ended intervals (and `_RETIRED_IMAGES` per pid) `retired_at` names the samples taken before
that time from it, the image they ran in, and until the next capture of the pid succeeds it stands in
for the process. A process whose capture fails (it
has gone) or finds it exiting (no mappings and no exe: its memory is already torn down) gets its
retired, or current, snapshot back, so the samples it left in the interval are still symbolized. This
matters because a multi-threaded process is announced again when its main thread exits before the
others, and that announcement retires the snapshot like an exec does.

`announced` runs on the perf-reader thread, as each process event is read: a process may live a few
milliseconds (a build's compiler, a shell's `sed`), and the pipeline thread can be busy for longer (the
first inspection of an interpreter reads its ELF symbols: ~50 ms), so waiting for it lost whole short
processes (seen: a 70 ms process's samples left with no mapping at all). `observe_process` runs on the
pipeline thread, the symbolizer's `observe`, `refresh` and
`end_interval` on the report thread, and `get` also on the perf-reader thread (the unwind stage, for
CPU and off-CPU stack copies) and on the pipeline thread (for allocation stack copies). The lock only guards
the dictionaries and the counters; /proc (maps and cgroup alike) is read outside it, so no thread waits
on another's I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.metadata.process import ProcessLabels, ProcessMetadata
from agent.process.maps import MapKind, ProcessMaps, map_files_path, read_process_maps
from agent.process.pinned import PINNED
from agent.process.templates import ProcessTemplates
from agent.types import ImageLayout

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProcessStats:
    """The registry's counters (only ever growing), read by the metrics collector at scrape time."""

    captured: int = 0  # /proc/PID snapshots taken, including refreshes
    vanished: int = 0  # pids gone before they could be captured
    refreshed: int = 0  # snapshots retaken because an address fell outside every mapping
    expired: int = 0  # snapshots dropped after `ttl_intervals` intervals unseen
    laid_out: int = 0  # processes gone unread, laid out from their executable's template
    unreadable: int = 0  # /proc/PID/maps exists but could not be read (permissions, I/O)


class Snapshot(NamedTuple):
    """What the registry holds about one process: its mappings and names, and its labels."""

    maps: ProcessMaps
    labels: ProcessLabels


@dataclass(slots=True)
class _Tracked:
    maps: ProcessMaps
    labels: ProcessLabels
    last_seen: int  # the registry generation (count of ended intervals) when the pid was last seen
    captured_ns: int  # CLOCK_MONOTONIC just before its /proc files were read


# A retired snapshot is kept through two ended intervals: the one being symbolized when it was retired,
# and the one holding the samples taken before the exec.
_RETIRED_INTERVALS = 2
_RETIRED_IMAGES = 8  # per pid: a process that execs every 25 ms goes through a few per interval


class _Retired(NamedTuple):
    tracked: _Tracked
    generation: int  # the registry generation it was retired in
    ended_ns: int  # CLOCK_MONOTONIC of the exec that ended the image; 0 when not known


def _exiting(maps: ProcessMaps) -> bool:
    """No executable mapping and no exe: a process whose memory is gone (exiting, or a zombie)."""
    return not maps.mappings and not maps.exe_path


# Intervals a snapshot outlives its last sample (the `symbolize.process_ttl_intervals` default).
DEFAULT_TTL_INTERVALS = 6


class ProcessRegistry:
    """Process snapshots by pid; see the module docstring for their lifecycle and the threading rules."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        ttl_intervals: int = DEFAULT_TTL_INTERVALS,
        metadata: ProcessMetadata | None = None,
    ) -> None:
        """`metadata` reads the process labels (default: a private `ProcessMetadata(proc_root)`); pass the
        daemon's shared one so the process filters and the labels read each /proc/PID/cgroup once."""
        if ttl_intervals < 1:
            raise ValueError(f"process_ttl_intervals must be at least 1, got {ttl_intervals}")
        self.proc_root = proc_root
        self.stats = ProcessStats()
        self._metadata = metadata if metadata is not None else ProcessMetadata(proc_root)
        self._ttl = ttl_intervals
        self._lock = threading.Lock()
        self._tracked: dict[int, _Tracked] = {}
        # Retired images per pid, oldest first: each with the generation it was retired in and the
        # CLOCK_MONOTONIC time its image ended (the exec), so that samples from before an exec are named
        # from the image they ran in (`maps_at`).
        self._retired: dict[int, list[_Retired]] = {}
        self._forgotten: dict[int, int] = {}  # pid -> end of the newest image dropped past _RETIRED_IMAGES
        self._generation = 0
        self._observers: list[Callable[[int], None]] = []
        self._templates = ProcessTemplates()

    def add_observer(self, observer: Callable[[int], None]) -> None:
        """Call `observer(pid)` after each `observe_process` that finds or takes a snapshot, on that thread
        (the symbolizer's perf-map store catches up with a live JIT process's map then)."""
        self._observers.append(observer)

    def observe_process(self, pid: int) -> None:
        """A live process was seen (announced, or its first sample): capture it now unless already
        captured, then tell the observers; failures are counted."""
        if self.observe(pid) is not None:
            for observer in self._observers:
                observer(pid)

    def announced(self, pid: int, timestamp_ns: int, exec_: bool, layout: ImageLayout | None = None) -> None:
        """A process event, at once as it is read (see the module docstring): an exec (`exec_`) retires
        the pid's image; a process's first record (or its first after an exec, or under a reused pid)
        retires any older snapshot and captures the image it runs now. With `layout` (where BPF saw the
        image lie), a capture teaches its executable's template, and a process already gone is laid
        out from that template (`agent.process.templates`)."""
        self.on_exec(pid, timestamp_ns)
        if exec_:
            return
        maps = self.capture(pid, restore=layout is None)
        if layout is None:
            return
        if maps is not None:  # without `restore`, an exiting process's empty maps come back as None
            with self._lock:
                self._templates.learn(layout, maps)
            return
        with self._lock:
            laid_out = self._templates.lay_out(pid, layout)
            if laid_out is not None:
                # Read from nothing of this process: no labels (another container may run the same file).
                self._tracked[pid] = _Tracked(laid_out, ProcessLabels(pid, comm=layout.comm), self._generation, 0)
                self.stats.laid_out += 1
            else:
                self._restore(pid)

    def on_exec(self, pid: int, ended_ns: int = 0) -> None:
        """Retire the pid's snapshot: exec replaced its image (at `ended_ns`, CLOCK_MONOTONIC, when
        known), the next observation recaptures it (see the module docstring for why it is retired
        rather than dropped). A snapshot read after `ended_ns` already shows the new image and stays:
        events from different CPUs' buffers arrive out of order, the exec after a first record."""
        with self._lock:
            current = self._tracked.get(pid)
            if current is not None and ended_ns and current.captured_ns > ended_ns:
                return
            tracked = self._tracked.pop(pid, None)
            if tracked is not None:
                images = self._retired.setdefault(pid, [])
                images.append(_Retired(tracked, self._generation, ended_ns))
                for dropped in images[:-_RETIRED_IMAGES]:  # samples from before it have no image now
                    self._forgotten[pid] = max(self._forgotten.get(pid, 0), dropped.ended_ns)
                del images[:-_RETIRED_IMAGES]

    def retired_at(self, pid: int, mono_ns: int) -> Snapshot | None:
        """The snapshot of a retired image the pid was running at `mono_ns` (an exec ended it after that
        time), with its comm and exe; None when it ran the current image then. Seen without this: the
        samples a process took before an exec named after the new image's functions, or not at all, and
        labelled with the new image's comm."""
        with self._lock:
            for image in self._retired.get(pid, ()):
                if image.ended_ns and mono_ns < image.ended_ns:
                    return Snapshot(image.tracked.maps, image.tracked.labels)
            return None

    def forgotten(self, pid: int, mono_ns: int) -> bool:
        """The pid's image at `mono_ns` was dropped (past _RETIRED_IMAGES execs since): unknown."""
        with self._lock:
            return mono_ns < self._forgotten.get(pid, 0)

    def observe(self, pid: int) -> ProcessMaps | None:
        """The pid's snapshot, captured now if there is none (a retired one if it cannot); None if neither."""
        with self._lock:
            tracked = self._tracked.get(pid)
            if tracked is not None:
                tracked.last_seen = self._generation
                return tracked.maps
        captured = self.capture(pid)
        return captured if captured is not None else self.get(pid)

    def capture(self, pid: int, restore: bool = True) -> ProcessMaps | None:
        """Take a fresh snapshot, replacing any older one; on failure keep (or, with `restore`, bring
        back) the older one and return None."""
        if pid <= 0:
            return None  # pid 0 is the idle task: no /proc entry, no user space
        started_ns = time.monotonic_ns()  # the kernel's events are stamped with this clock
        try:
            maps = read_process_maps(self.proc_root, pid)
        except (FileNotFoundError, ProcessLookupError):
            self._vanished(pid, restore)
            return None
        except OSError as e:
            with self._lock:
                self.stats.unreadable += 1
                if restore:
                    self._restore(pid)
            logger.debug("cannot read mappings of pid %d: %s", pid, e)
            return None
        if _exiting(maps) and (not restore or self._has_mappings(pid)):
            self._vanished(pid, restore)  # an exiting process's empty maps never replace what it had mapped
            return None
        for entry in maps.mappings:  # reachable only through this process's link: hold it while it lasts
            if entry.kind is MapKind.DELETED and entry.identity is not None:
                PINNED.pin(entry.identity, map_files_path(self.proc_root, pid, entry))
        # Best effort and never raises: a process gone by now keeps its snapshot with empty labels.
        labels = self._metadata.read(pid)
        with self._lock:
            self._tracked[pid] = _Tracked(maps, labels, self._generation, started_ns)
            # Retired images stay for the samples from before their exec; one whose end is unknown
            # names nothing the new snapshot does not.
            images = self._retired.get(pid)
            if images is not None:
                images[:] = [image for image in images if image.ended_ns]
                if not images:
                    del self._retired[pid]
            self.stats.captured += 1
        return maps

    def refresh(self, pid: int) -> ProcessMaps | None:
        """`capture` again because an address fell outside every mapping (code mapped since: dlopen, JIT);
        None, with the older snapshot kept, when the process has gone."""
        maps = self.capture(pid)
        if maps is not None:
            with self._lock:
                self.stats.refreshed += 1
        return maps

    def _vanished(self, pid: int, restore: bool = True) -> None:
        with self._lock:
            self.stats.vanished += 1
            if restore:
                self._restore(pid)
        logger.debug("pid %d vanished before its mappings could be read", pid)

    def _restore(self, pid: int) -> None:
        """Bring back the pid's retired snapshot when it has no current one (the lock is held)."""
        images = self._retired.get(pid)
        if images and pid not in self._tracked:
            self._tracked[pid] = images.pop().tracked
            if not images:
                del self._retired[pid]

    def _has_mappings(self, pid: int) -> bool:
        with self._lock:
            images = self._retired.get(pid)
            tracked = self._tracked.get(pid) or (images[-1].tracked if images else None)
            return tracked is not None and bool(tracked.maps.mappings)

    def get(self, pid: int) -> ProcessMaps | None:
        with self._lock:
            tracked = self._tracked.get(pid)
            return tracked.maps if tracked is not None else None

    def snapshot(self, pid: int) -> Snapshot | None:
        """The pid's current snapshot with the labels read when it was taken; None if untracked."""
        with self._lock:
            tracked = self._tracked.get(pid)
        return Snapshot(tracked.maps, tracked.labels) if tracked is not None else None

    def pids(self) -> frozenset[int]:
        """The pids that have a snapshot, current or retired."""
        with self._lock:
            return frozenset(self._tracked) | frozenset(self._retired)

    def end_interval(self, seen_pids: Iterable[int]) -> None:
        """Mark `seen_pids` as seen in the interval that just ended, then expire the long-unseen ones."""
        with self._lock:
            self._generation += 1
            for pid in seen_pids:
                tracked = self._tracked.get(pid)
                if tracked is not None:
                    tracked.last_seen = self._generation
            expired = [pid for pid, t in self._tracked.items() if self._generation - t.last_seen >= self._ttl]
            for pid in expired:
                del self._tracked[pid]
            self.stats.expired += len(expired)
            for pid, images in list(self._retired.items()):
                images[:] = [i for i in images if self._generation - i.generation < _RETIRED_INTERVALS]
                if not images:
                    del self._retired[pid]
                    self._forgotten.pop(pid, None)

    def sizes(self) -> dict[str, int]:
        """Current entry counts (snapshots, and the label cache they read through), for the metrics stage."""
        with self._lock:
            templates = len(self._templates)
        return {"processes": len(self), "process_labels": len(self._metadata), "process_templates": templates}

    def __len__(self) -> int:
        with self._lock:
            return len(self._tracked)
