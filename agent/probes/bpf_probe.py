"""Probes stage: what every profiler shares: its part of the one BPF object, its buffers, its counts.

Every enabled profiler's programs live in one BPF object (`bpf/agent.bpf.c`, loaded by
`agent.probes.program.ProbeProgram`), each in its own `PROFILE_<NAME>` section with maps named after
it (`<name>_samples`, `<name>_params`, ...). A `BpfProbe` contributes its section's cflags, is handed
the loaded object, attaches its own events, opens its own perf buffer of `struct stack_event` records
(see `bpf/common.h`), owns its `StackDecoder`, and counts its lost and malformed records. It is built
with its `StackCopyPlan` (how many bytes of user stack its records carry, and the unwind stage to run
on them in the reader's callback), decided once by `agent.probes.registry`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.probes.events import MalformedRecord, ProcessEvent, UnwindCopy
from agent.probes.geometry import page_count, sized_for_records
from agent.probes.records import PARAM_SAMPLING, STACK_EVENT_SIZE
from agent.probes.settings import ProfilingConfig
from agent.probes.stacks import StackDecoder
from agent.types import ProfileSpec

logger = logging.getLogger(__name__)

Emit = Callable[[object], None]
Decoder = Callable[[int, int], object]


@dataclass(slots=True)
class ReaderStats:
    received: int = 0
    malformed: int = 0
    lost: dict[str, int] = field(default_factory=dict)  # by perf buffer


@dataclass(frozen=True, slots=True)
class StackCopyPlan:
    """How a profiler's records carry user stacks: decided once, before the probe is built."""

    stack_bytes: int = 0  # user stack copied per record for DWARF unwinding (<NAME>_STACK_BYTES); 0: none
    # The unwind stage, run on each record's copy inside the perf-buffer callback. None: the events keep
    # their copies and the pipeline thread unwinds them (or there is nothing to unwind).
    unwind: UnwindCopy | None = None


FRAME_POINTERS = StackCopyPlan()


class BpfProbe(ABC):
    name: str  # the profiler: "cpu", ...; its section is PROFILE_<NAME>, its maps <name>_*
    # Whether its stack copies are unwound inside the callback. A profiler whose records come in bursts
    # says no: there the reader must only copy records out (the pipeline unwinds behind the queue), or
    # the ~10 KiB records overflow the perf buffers while it unwinds.
    unwinds_in_reader: bool = True

    def __init__(self, config: ProfilingConfig, emit: Emit, stacks: StackCopyPlan = FRAME_POINTERS) -> None:
        self._config = config
        self._emit = emit
        self._bpf: Any = None  # the shared bcc.BPF object, once loaded
        self.attach_method = ""  # what the events were attached with, for check/metrics/logs
        self._stack_copy = stacks
        self.stats = ReaderStats()
        self.stacks = StackDecoder()  # used only by the reader thread, inside the callbacks

    @property
    def user_stack_bytes(self) -> int:
        """Bytes of user stack each record carries for DWARF unwinding; 0: frame pointers only."""
        return self._stack_copy.stack_bytes

    @property
    def unwind_copy(self) -> UnwindCopy | None:
        return self._stack_copy.unwind

    @property
    def samples_buffer(self) -> str:
        return f"{self.name}_samples"

    def loss_labels(self) -> tuple[str, ...]:
        """The `buffer` labels of every loss this probe can report (its perf buffer, and any in-kernel
        loss counters a subclass adds), known before any happens: the metrics export them at 0."""
        return (self.samples_buffer,)

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

    def note_process_event(self, event: ProcessEvent) -> None:  # noqa: B027 - an optional hook
        """A process announcement or exec from the shared buffer, before it goes downstream."""

    def sampling_floor(self) -> int:
        return 1

    def set_sampling(self, value: int) -> None:
        """Set the in-kernel sampling parameter (PARAM_SAMPLING); called by the adaptive sampler."""
        self.write_param(PARAM_SAMPLING, value)

    def write_param(self, index: int, value: int) -> None:
        """Set `<name>_params[index]` of the loaded object (see PARAM_* in bpf/common.h)."""
        self._bpf[f"{self.name}_params".encode()][ctypes.c_int(index)] = ctypes.c_uint64(value)

    @property
    def defines(self) -> dict[str, int | str]:
        """This profiler's cflags: its section, its stack copy, and its own parameters."""
        upper = self.name.upper()
        return {f"PROFILE_{upper}": 1, f"{upper}_STACK_BYTES": self.user_stack_bytes, **self.extra_defines()}

    def loaded(self, bpf: Any) -> None:
        """The object holding this profiler's programs was loaded: subclasses write their parameters."""
        self._bpf = bpf

    def unloaded(self) -> None:
        self._bpf = None

    def attach(self) -> None:
        """Open the perf buffers first, so no early record finds no reader; then start the events."""
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
            record_bytes = STACK_EVENT_SIZE + self.user_stack_bytes  # the largest: every slot filled
            pages, wakeup_events = sized_for_records(pages, wakeup_events, record_bytes, os.cpu_count() or 1)
        open_counted_buffer(self._bpf, table, decode, self._emit, self.stats, self._malformed, pages, wakeup_events)

    def _malformed(self, error: Exception) -> None:
        log_malformed(self.name, self.stats, error)

    def drain(self) -> None:  # noqa: B027 - an optional hook: most probes keep no in-kernel counts
        """After the object's buffers were drained: read any in-kernel loss counters."""

    def stop_sampling(self) -> None:
        if self._bpf is None:
            return
        try:
            self.detach_events()
        except Exception as e:  # bcc raises bare Exception; detaching at shutdown must not stop the flush
            logger.warning("%s: could not detach its events: %s", self.name, e)


def open_counted_buffer(
    bpf: Any,
    table: str,
    decode: Decoder,
    emit: Emit,
    stats: ReaderStats,
    malformed: Callable[[Exception], None],
    pages: int,
    wakeup_events: int,
) -> None:
    """Open perf buffer `table`: each record is decoded, counted and emitted; losses are counted by buffer."""

    def on_record(cpu: int, data: int, size: int) -> None:
        try:
            event = decode(data, size)
        except Exception as e:
            # A MalformedRecord, or a bug in decoding or unwinding. Raised into the ctypes callback it
            # would only be printed to stderr, and the record lost uncounted: count it, log it, go on.
            malformed(e)
            return
        stats.received += 1
        emit(event)

    def on_lost(count: int) -> None:
        stats.lost[table] = stats.lost.get(table, 0) + count

    bpf[table.encode()].open_perf_buffer(
        on_record, page_cnt=page_count(pages), lost_cb=on_lost, wakeup_events=wakeup_events
    )


def log_malformed(name: str, stats: ReaderStats, error: Exception) -> None:
    """Count a record that could not be decoded; log the 1st, 2nd, 4th, 8th, ... (a bug, not a
    MalformedRecord, at error with its traceback)."""
    stats.malformed += 1
    if stats.malformed & (stats.malformed - 1) == 0:
        if isinstance(error, MalformedRecord):
            logger.debug("%s: malformed record (%d so far): %s", name, stats.malformed, error)
        else:
            logger.error("%s: decoding a record failed (%d so far)", name, stats.malformed, exc_info=error)
