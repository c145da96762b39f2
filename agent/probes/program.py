"""Probes stage: the one BPF object every enabled profiler runs in, and the process events they share.

`bpf/agent.bpf.c` is compiled once with the union of the enabled profilers' cflags (`PROFILE_CPU=1`,
...): one `known_pids` map, so each process is announced once however many profilers sample it; one
exec/exit tracepoint pair; one `proc_events` buffer, opened here, whose events go first to the
`announced` hook (the process registry's capture), then to the probes' `note_process_event` hooks,
then downstream. Each probe attaches its own events and opens its own
buffer on the shared object; `readers()` and `drain()` cover every buffer, for one `PerfReader`.
Counts process events by kind (`process_events`) and logs each announcement at debug level.

Python frames (docs/python.md): with `python.enabled` and the kernel's TLS-base offset known (from BTF,
`agent.features`), every profiler is compiled with the walker (PYTHON_FRAMES = python.max_frames) and
the loaded program's `python_maps` (`PythonMaps`) is where the process stage enables Python processes.
`python_unavailable` says why it is off, for `check` and the logs.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from agent.errors import BpfLoadError
from agent.features import KernelFeatures, kernel_features
from agent.probes.bpf_probe import BpfProbe, Emit, ReaderStats, log_malformed, open_counted_buffer
from agent.probes.events import ProcessEvent, ProcessEventKind, decode_proc_event
from agent.probes.loader import dump_program, load_program
from agent.probes.python_maps import (
    PYTHON_CODES_SEEN_ENTRIES,
    PYTHON_PROCS_ENTRIES,
    PYTHON_THREADS_ENTRIES,
    PythonMaps,
)
from agent.probes.settings import ProfilingConfig, PythonSettings
from agent.types import ImageLayout

logger = logging.getLogger(__name__)

PROGRAM = "agent"  # bpf/agent.bpf.c
KNOWN_PIDS_ENTRIES = 65536
PROC_EVENT_PAGES = 8
PROCESS_EVENTS = "proc_events"

Announced = Callable[[int, int, bool, ImageLayout | None], None]  # (pid, timestamp_ns, exec_, layout)


class ProbeProgram:
    def __init__(
        self,
        config: ProfilingConfig,
        probes: Sequence[BpfProbe],
        emit: Emit,
        python: PythonSettings | None = None,
        features: KernelFeatures | None = None,
        announced: Announced | None = None,
    ) -> None:
        """`python`: the walker's settings (None: no Python frames); `features` default to this host's.
        `announced(pid, timestamp_ns, exec_, layout)` hears each exec and first record as it is read, before
        it is emitted (the process registry captures the process then, while it is surely alive)."""
        self._config = config
        self.probes = tuple(probes)
        self._emit = emit
        self._announced = announced
        self._python = python
        self._features = features
        self._bpf: Any = None
        self.python_maps: PythonMaps | None = None  # once loaded with the walker
        self.stats = ReaderStats()  # of the process-event buffer (PROCESS_EVENTS)
        self.process_events: Counter[str] = Counter({kind.name.lower(): 0 for kind in ProcessEventKind})

    @property
    def defines(self) -> dict[str, int | str]:
        defines: dict[str, int | str] = {
            "KNOWN_PIDS_ENTRIES": KNOWN_PIDS_ENTRIES,
            # With --pid the CPU and off-CPU programs read pid_filter (the allocation uprobes are
            # attached to those processes only, so the kernel filters them).
            "FILTER_PIDS": 1 if self._config.pids else 0,
            # The agent's own threads are never sampled: its perf-buffer reads, its sleeps and its
            # allocations would otherwise be a large part of what it reports (and of what it costs).
            "AGENT_PID": os.getpid(),
        }
        defines.update(self._python_defines())
        offsets = (self._features or kernel_features()).image_offsets
        defines.update({"IMAGE_LAYOUT": 1, **offsets} if offsets is not None else {"IMAGE_LAYOUT": 0})
        for probe in self.probes:
            for key, value in probe.defines.items():
                if defines.setdefault(key, value) != value:
                    raise BpfLoadError(f"{probe.name} sets -D{key}={value}, another part -D{key}={defines[key]}")
        return defines

    @property
    def python_unavailable(self) -> str:
        """Why the walker is not compiled in, or "" when it is."""
        if self._python is None or not self._python.enabled:
            return "python.enabled is off"
        if self._fsbase_offset() is None:
            return (self._features or kernel_features()).task_fsbase_unavailable
        return ""

    def _fsbase_offset(self) -> int | None:
        return (self._features or kernel_features()).task_fsbase_offset

    def _python_defines(self) -> dict[str, int | str]:
        if self._python is None or self.python_unavailable:
            return {"PYTHON_FRAMES": 0}
        return {
            "PYTHON_FRAMES": self._python.max_frames,
            "TASK_FSBASE_OFFSET": self._fsbase_offset() or 0,
            "PYTHON_PROCS_ENTRIES": PYTHON_PROCS_ENTRIES,
            "PYTHON_THREADS_ENTRIES": PYTHON_THREADS_ENTRIES,
            "PYTHON_CODES_SEEN_ENTRIES": PYTHON_CODES_SEEN_ENTRIES,
        }

    def dump(self) -> str:
        return dump_program(PROGRAM, self.defines)

    def load(self) -> None:
        self._bpf = load_program(PROGRAM, self.defines)
        if self._config.pids:
            pid_filter = self._bpf[b"pid_filter"]
            for pid in self._config.pids:
                pid_filter[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        if self.defines["PYTHON_FRAMES"]:
            self.python_maps = PythonMaps(self._bpf)
        for probe in self.probes:
            probe.loaded(self._bpf)

    def attach(self) -> None:
        """The process-event buffer first (a process's first record announces it), then each profiler."""
        # Process announcements are rare and urgent (the process may exit soon): wake on each.
        open_counted_buffer(
            self._bpf,
            PROCESS_EVENTS,
            decode_proc_event,
            self._on_process_event,
            self.stats,
            lambda error: log_malformed("process events", self.stats, error),
            PROC_EVENT_PAGES,
            1,
        )
        for probe in self.probes:
            probe.attach()

    def _on_process_event(self, event: object) -> None:
        assert isinstance(event, ProcessEvent)
        kind = event.kind.name.lower()
        self.process_events[kind] += 1
        if event.kind is ProcessEventKind.PYTHON_CODE:
            return  # counted for the reader's pace only: the code object comes with the stack events
        logger.debug("process %d announced (%s)", event.pid, kind)
        if self._announced is not None:
            self._announced(event.pid, event.timestamp_ns, event.kind is ProcessEventKind.EXEC, event.layout)
        for probe in self.probes:
            probe.note_process_event(event)
        self._emit(event)

    def readers(self) -> list[int]:
        """The perf readers of every open buffer, for one poll across all of them."""
        return list(self._bpf.perf_buffers.values()) if self._bpf is not None else []

    def announcement_readers(self) -> list[int]:
        """The perf readers of the process-event buffer (one per CPU)."""
        if self._bpf is None:
            return []
        table = self._bpf[PROCESS_EVENTS.encode()]  # BCC keys its readers by (id(table), cpu)
        return [reader for (owner, _cpu), reader in self._bpf.perf_buffers.items() if owner == id(table)]

    def read_kernel_counts(self) -> None:
        """After the buffers were drained (`agent.probes.reader`): the probes' in-kernel loss counters."""
        if self._bpf is None:
            return
        for probe in self.probes:
            probe.drain()

    def stop_sampling(self) -> None:
        for probe in self.probes:
            probe.stop_sampling()

    def close(self) -> None:
        if self._bpf is None:
            return
        self.stop_sampling()
        self._bpf.cleanup()
        self._bpf = None
        self.python_maps = None
        for probe in self.probes:
            probe.unloaded()
