"""Metadata stage: the labels of one process, read from /proc/PID and cached.

This module owns `ProcessLabels` (what the pprof labels and the OTLP resource attributes say about a
process), `MetadataStats` and `ProcessMetadata`, the reader. A process that vanished or a file that
cannot be read is counted and logged at debug level, and leaves its fields empty: one pid never stops
the agent. Results are cached in a bounded LRU keyed by (pid, start time), so a recycled pid is read
afresh rather than given its predecessor's labels.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from agent.metadata.cgroup import CgroupInfo, parse_cgroup

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 4096
# Command lines can be megabytes (generated JVM class paths); labels only need the start of one.
DEFAULT_MAX_CMDLINE_BYTES = 4096
# /proc/PID/stat field 22 is the start time (clock ticks since boot); fields 3.. follow the ")" of comm.
_STAT_STARTTIME_INDEX = 22 - 3


@dataclass(frozen=True, slots=True)
class ProcessLabels:
    """What the profiles say about one process; "" / () when unknown (kernel threads, vanished pids)."""

    pid: int
    comm: str = ""
    exe_path: str = ""
    cmdline: tuple[str, ...] = ()
    container_id: str = ""
    pod_uid: str = ""
    systemd_unit: str = ""
    cgroup_path: str = ""  # for the process filters; not exported as a label


@dataclass(slots=True)
class MetadataStats:
    """Counters for the metrics stage to read at scrape time; they only grow."""

    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    vanished: int = 0  # pids gone before (or while) their files were read
    unreadable: Counter[str] = field(default_factory=Counter)  # by /proc/PID file name: exe, cmdline, ...


class _Vanished(Exception):
    """The process exited while it was being read."""


class ProcessMetadata:
    """Reads `ProcessLabels` from `proc_root`; safe to call from several threads."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_cmdline_bytes: int = DEFAULT_MAX_CMDLINE_BYTES,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._proc_root = proc_root
        self._cache_size = cache_size
        self._max_cmdline = max_cmdline_bytes
        self.stats = MetadataStats()
        # The lock guards the cache and the counters only; /proc is read outside it.
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], ProcessLabels] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def forget(self, pid: int) -> None:
        """Drop `pid`'s cached labels: exec keeps the pid and start time but replaces exe and comm."""
        with self._lock:
            for key in [key for key in self._cache if key[0] == pid]:
                del self._cache[key]

    def read(self, pid: int) -> ProcessLabels:
        """The labels of `pid`, from the cache when the same process (same start time) was read before."""
        if pid <= 0:
            return ProcessLabels(pid)  # the idle task: no /proc entry
        try:
            start_time = self._start_time(pid)
        except _Vanished:
            return ProcessLabels(pid)
        key = (pid, start_time)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return cached
            self.stats.cache_misses += 1
        try:
            labels = self._read_labels(pid)
        except _Vanished:
            return ProcessLabels(pid)
        # The pid may have been reused while its files were read: cache only what one process said. One
        # that exited meanwhile keeps its labels for this call; caching a dead pid would serve no one.
        try:
            same_process = self._start_time(pid) == start_time
        except _Vanished:
            return labels
        if same_process:
            self._remember(key, labels)
        return labels

    def _remember(self, key: tuple[int, int], labels: ProcessLabels) -> None:
        with self._lock:
            self._cache[key] = labels
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
                self.stats.cache_evictions += 1

    def _read_labels(self, pid: int) -> ProcessLabels:
        cgroup_text = self._read_text(pid, "cgroup")
        cgroup = parse_cgroup(cgroup_text) if cgroup_text else CgroupInfo()
        return ProcessLabels(
            pid=pid,
            comm=self._read_text(pid, "comm").rstrip("\n"),
            exe_path=self._read_exe(pid),
            cmdline=self._read_cmdline(pid),
            container_id=cgroup.container_id,
            pod_uid=cgroup.pod_uid,
            systemd_unit=cgroup.systemd_unit,
            cgroup_path=cgroup.path,
        )

    def _start_time(self, pid: int) -> int:
        text = self._read_text(pid, "stat")
        # comm (field 2) may hold spaces and parentheses: the fields that follow start after the last ")".
        fields = text.rpartition(")")[2].split()
        try:
            return int(fields[_STAT_STARTTIME_INDEX])
        except (IndexError, ValueError):
            # Cannot happen with a real kernel; key on 0 so the pid still gets labels, just no reuse check.
            self._count_unreadable(pid, "stat", "malformed")
            return 0

    def _read_text(self, pid: int, name: str) -> str:
        try:
            return (self._proc_root / str(pid) / name).read_text(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            self._vanished(pid, name)
        except OSError as e:
            self._count_unreadable(pid, name, e)
        return ""

    def _read_exe(self, pid: int) -> str:
        try:
            return os.readlink(self._proc_root / str(pid) / "exe")
        except FileNotFoundError:
            # Kernel threads have no executable; a vanished process is noticed by the other reads.
            return ""
        except OSError as e:
            self._count_unreadable(pid, "exe", e)
            return ""

    def _read_cmdline(self, pid: int) -> tuple[str, ...]:
        try:
            with (self._proc_root / str(pid) / "cmdline").open("rb") as f:
                raw = f.read(self._max_cmdline)
        except (FileNotFoundError, ProcessLookupError):
            self._vanished(pid, "cmdline")
        except OSError as e:
            self._count_unreadable(pid, "cmdline", e)
            return ()
        # Arguments are NUL-terminated; the last one may be cut at the byte cap and is kept as a prefix.
        return tuple(arg.decode(errors="replace") for arg in raw.rstrip(b"\0").split(b"\0")) if raw else ()

    def _vanished(self, pid: int, name: str) -> NoReturn:
        with self._lock:
            self.stats.vanished += 1
        logger.debug("pid %d vanished before /proc/%d/%s could be read", pid, pid, name)
        raise _Vanished

    def _count_unreadable(self, pid: int, name: str, reason: object) -> None:
        with self._lock:
            self.stats.unreadable[name] += 1
        logger.debug("cannot read /proc/%d/%s: %s", pid, name, reason)
