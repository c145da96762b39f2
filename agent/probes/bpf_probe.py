"""Probes stage: what every BPF profiler shares: loading, stack maps, process announcements, buffers.

A profiler's program (`bpf/<name>.bpf.c`) declares the same shared maps (`pid_filter`, `known_pids`,
`proc_events`) and sends `struct stack_event` records (see `bpf/common.h`); this base class loads it,
fills the pid filter, opens the process-event buffer, owns the profiler's `StackDecoder`, counts lost
and malformed records, and exposes its perf readers so one thread can poll every profiler at once.
Subclasses add their own buffer and attach their own events.
"""

from __future__ import annotations

import ctypes
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import ProfilingConfig
from agent.probes.events import MalformedRecord, UnwindCopy, decode_proc_event
from agent.probes.geometry import page_count, sized_for_records
from agent.probes.loader import dump_program, load_program
from agent.probes.records import PARAM_SAMPLING, USER_STACK_OFFSET
from agent.probes.stacks import StackDecoder
from agent.types import ProfileSpec

logger = logging.getLogger(__name__)

KNOWN_PIDS_ENTRIES = 65536
PROC_EVENT_PAGES = 8

Emit = Callable[[object], None]
Decoder = Callable[[int, int], object]


@dataclass(slots=True)
class ReaderStats:
    received: int = 0
    malformed: int = 0
    lost: dict[str, int] = field(default_factory=dict)  # by perf buffer


class BpfProbe(ABC):
    name: str  # the profiler: "cpu", ...
    program: str  # bpf/<program>.bpf.c
    # Whether its stack copies are unwound inside the callback. A profiler whose records come in bursts
    # says no: there the reader must only copy records out (the pipeline unwinds behind the queue), or
    # the ~10 KiB records overflow the perf buffers while it unwinds.
    unwinds_in_reader: bool = True

    def __init__(self, config: ProfilingConfig, emit: Emit) -> None:
        self._config = config
        self._emit = emit
        self._bpf: Any = None
        self.attach_method = ""  # what the events were attached with, for check/metrics/logs
        self.stats = ReaderStats()
        self.stacks = StackDecoder()  # used only by the reader thread, inside the callbacks
        # Bytes of user stack each record carries for DWARF unwinding (USER_STACK_BYTES); 0: frame
        # pointers only. Set before `load` (agent.probes.registry does, from the unwind config).
        self.user_stack_bytes = 0
        # The unwind stage, for records with a stack copy: their decoder calls it inside the callback.
        # Set before `attach` (the daemon does, where `unwinds_in_reader`); without it the events keep
        # the copy and the pipeline thread unwinds them.
        self.unwind_copy: UnwindCopy | None = None

    @property
    @abstractmethod
    def spec(self) -> ProfileSpec: ...

    def extra_defines(self) -> dict[str, int | str]:
        return {}

    def parameters(self) -> dict[str, float]:
        """Current sampling parameters, by name, for logs and metrics."""
        return {}

    # Probes whose in-kernel sampling the adaptive sampler may steer set this and override
    # `sampling_floor` (the configured value: the sampler only ever samples coarser than that).
    adaptive = False

    def refresh(self) -> None:  # noqa: B027 - an optional hook: most probes need no upkeep
        """Periodic upkeep on the main thread (e.g. attach to new libraries); nothing by default."""

    def sampling_floor(self) -> int:
        return 1

    def set_sampling(self, value: int) -> None:
        """Set the in-kernel sampling parameter (PARAM_SAMPLING); called by the adaptive sampler."""
        self.write_param(PARAM_SAMPLING, value)

    def write_param(self, index: int, value: int) -> None:
        """Set `params[index]` of the loaded program (see PARAM_* in bpf/common.h)."""
        self._bpf[b"params"][ctypes.c_int(index)] = ctypes.c_uint64(value)

    @property
    def defines(self) -> dict[str, int | str]:
        return {
            "KNOWN_PIDS_ENTRIES": KNOWN_PIDS_ENTRIES,
            "FILTER_PIDS": 1 if self._config.pids else 0,
            # The agent's own threads are never sampled: its perf-buffer reads, its sleeps and its
            # allocations would otherwise be a large part of what it reports (and of what it costs).
            "AGENT_PID": os.getpid(),
            "USER_STACK_BYTES": self.user_stack_bytes,
            **self.extra_defines(),
        }

    def dump(self) -> str:
        return dump_program(self.program, self.defines)

    def load(self) -> None:
        self._bpf = load_program(self.program, self.defines)
        if self._config.pids:
            pid_filter = self._bpf[b"pid_filter"]
            for pid in self._config.pids:
                pid_filter[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def attach(self) -> None:
        """Open the perf buffers first, so no early record finds no reader; then start the events."""
        # Process announcements are rare and urgent (the process may exit soon): wake on each.
        self.open_buffer("proc_events", decode_proc_event, PROC_EVENT_PAGES, wakeup_events=1)
        self.open_event_buffers()
        self.attach_events()
        logger.info("%s profiler attached with %s", self.name, self.attach_method)

    @abstractmethod
    def open_event_buffers(self) -> None: ...

    @abstractmethod
    def attach_events(self) -> None: ...

    @abstractmethod
    def detach_events(self) -> None: ...

    def open_buffer(
        self, table: str, decode: Decoder, pages: int, wakeup_events: int, *, stack_records: bool = False
    ) -> None:
        """`stack_records`: the buffer carries `struct stack_event`s, which grow by the user stack copy."""
        if stack_records and self.user_stack_bytes:
            record_bytes = USER_STACK_OFFSET + self.user_stack_bytes
            pages, wakeup_events = sized_for_records(pages, wakeup_events, record_bytes, os.cpu_count() or 1)
        stats, emit = self.stats, self._emit  # runs once per record: no lookups through self

        def on_record(cpu: int, data: int, size: int) -> None:
            try:
                event = decode(data, size)
            except MalformedRecord as e:
                self._malformed(e)
                return
            except Exception as e:
                # A bug in decoding or unwinding. Raised into the ctypes callback it would only be
                # printed to stderr, and the record lost uncounted: count it, log it, go on.
                self._malformed(e)
                return
            stats.received += 1
            emit(event)

        def on_lost(count: int) -> None:
            self.stats.lost[table] = self.stats.lost.get(table, 0) + count

        self._bpf[table.encode()].open_perf_buffer(
            on_record, page_cnt=page_count(pages), lost_cb=on_lost, wakeup_events=wakeup_events
        )

    def _malformed(self, error: Exception) -> None:
        """Count a record that could not be decoded; log the 1st, 2nd, 4th, 8th, ... (a bug, not a
        MalformedRecord, at warning with its traceback)."""
        self.stats.malformed += 1
        if self.stats.malformed & (self.stats.malformed - 1) == 0:
            if isinstance(error, MalformedRecord):
                logger.debug("%s: malformed record (%d so far): %s", self.name, self.stats.malformed, error)
            else:
                logger.error(
                    "%s: decoding a record failed (%d so far)", self.name, self.stats.malformed, exc_info=error
                )

    def readers(self) -> list[int]:
        """The perf readers of every open buffer, for a poll across all profilers."""
        return list(self._bpf.perf_buffers.values()) if self._bpf is not None else []

    def drain(self) -> None:
        """Read whatever sits in the buffers below the wakeup threshold."""
        if self._bpf is not None:
            self._bpf.perf_buffer_consume()

    def stop_sampling(self) -> None:
        if self._bpf is None:
            return
        try:
            self.detach_events()
        except Exception as e:  # bcc raises bare Exception; detaching at shutdown must not stop the flush
            logger.warning("%s: could not detach its events: %s", self.name, e)

    def close(self) -> None:
        if self._bpf is not None:
            self.stop_sampling()
            self._bpf.cleanup()
            self._bpf = None
