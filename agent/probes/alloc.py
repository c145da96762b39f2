"""Probes stage: the allocation profiler (`bpf/agent.bpf.c`, section PROFILE_ALLOC).

Attaches uprobes to malloc, calloc, realloc, posix_memalign and aligned_alloc in every C library file
the profiled processes map (found by `agent.probes.libc_tracker`): once per file for the whole host,
or once per file and process with `--pid`, so other processes do not take the uprobe trap. `refresh()`
(called periodically by the daemon) attaches to libraries that appeared and detaches from those no
process maps any more; exec'd processes reported by the shared exec tracepoint are read again.

The kernel samples by bytes (see the program's header): each record is one allocation of `value`
bytes kept with probability 1 - exp(-value/R), R being the mean sampling distance in force
(`sampling`). Weighting it by the inverse makes the totals unbiased (the Go/tcmalloc estimator): the
values are (weight, weight * size) for `alloc_objects/count` and `alloc_space/bytes`.

Stacks: with `unwind.alloc = fp` (the default) the kernel walks frame pointers and splices in the
immediate caller; with `auto|dwarf` the records carry a user stack copy, which the reader only copies
out (`unwinds_in_reader` is False: allocations come in bursts) and the pipeline thread unwinds after
the keep decision.

A library's file is opened once and the uprobes are attached through `/proc/self/fd/N`: the file the
uprobes land on is the one identified, even if the process that showed it has exited, and the
descriptor (closed at detach) keeps BCC's event names unique per file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import BpfAttachError
from agent.probes.bpf_probe import FRAME_POINTERS, BpfProbe, Emit, StackCopyPlan
from agent.probes.events import MalformedRecord, ProcessEvent, ProcessEventKind, RecordHeader, StackEventDecoder
from agent.probes.libc_tracker import ALL_PROCESSES, LibcTracker, Source, Target
from agent.probes.records import PARAM_SAMPLING
from agent.probes.settings import MAX_SAMPLE_BYTES, AllocConfig, ProfilingConfig
from agent.types import ProfileSpec, ValueType

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_BYTES: int = AllocConfig().sample_bytes
THREAD_ENTRIES = 65536  # per-thread countdowns; an evicted thread just draws a new threshold
# Records are a few per second per busy process at the default R: wake the reader every few.
WAKEUP_EVENTS = 8
# C function -> BPF program, in priority order when two names share an address.
ALLOCATORS = (
    ("malloc", "on_malloc"),
    ("calloc", "on_calloc"),
    ("realloc", "on_realloc"),
    ("posix_memalign", "on_posix_memalign"),
    ("aligned_alloc", "on_aligned_alloc"),
)
_ALLOCATOR_SYMBOLS = ("^(" + "|".join(name for name, _ in ALLOCATORS) + ")$").encode()  # bcc wants bytes


def alloc_profile_spec(sample_bytes: int) -> ProfileSpec:
    return ProfileSpec(
        name="alloc",
        sample_types=(ValueType("alloc_objects", "count"), ValueType("alloc_space", "bytes")),
        period_type=ValueType("space", "bytes"),
        period=sample_bytes,
    )


def alloc_weight(size: int, mean: int) -> float:
    """How many allocations of `size` bytes one sample stands for when each is kept with probability
    1 - exp(-size/mean)."""
    return 1.0 / -math.expm1(-size / mean)


def alloc_values(record: RecordHeader) -> tuple[float, float]:
    """(alloc_objects, alloc_space) estimated from one record."""
    size, mean = record.value, record.sampling
    if size == 0 or mean == 0:
        raise MalformedRecord(f"alloc record: size {size}, sampling {mean}")
    weight = alloc_weight(size, mean)
    return (weight, weight * size)


@dataclass(slots=True)
class _Attachment:
    fd: int  # the library file, open while attached
    events: tuple[bytes, ...]  # BCC's names of the uprobes, for detaching
    source: Source


class AllocProbe(BpfProbe):
    name = "alloc"
    adaptive = True  # the sampler may raise R above the configured value to hold the event budget
    # Allocation samples come in bursts (4 GiB in 0.1 s is thousands of records) faster than the
    # sampler reacts: with unwind.alloc = auto the pipeline unwinds them, behind the queue.
    unwinds_in_reader = False

    def __init__(
        self,
        config: ProfilingConfig,
        emit: Emit,
        alloc: AllocConfig | None = None,
        stacks: StackCopyPlan = FRAME_POINTERS,
        *,
        proc_root: Path = Path("/proc"),
    ) -> None:
        super().__init__(config, emit, stacks)
        self._sample_bytes = alloc.sample_bytes if alloc is not None else DEFAULT_SAMPLE_BYTES
        self._spec = alloc_profile_spec(self._sample_bytes)
        self.tracker = LibcTracker(proc_root, config.pids)
        self._attached: dict[Target, _Attachment] = {}
        self._failed: set[Target] = set()  # logged once each, retried at every refresh
        self._lock = threading.Lock()  # refresh (main thread) against stop_sampling (reader thread)
        self._stopped = False
        self.attach_failures = 0

    @property
    def spec(self) -> ProfileSpec:
        return self._spec

    def extra_defines(self) -> dict[str, int | str]:
        # No pid filter: with --pid the uprobes are attached to those processes only (the kernel filters
        # uprobe events by address space), so a pid-filter lookup would only add ~30 ns to every call.
        return {"THREAD_ENTRIES": THREAD_ENTRIES}

    def parameters(self) -> dict[str, float]:
        return {"sample_bytes": self._sample_bytes}

    def sampling_floor(self) -> int:
        """The configured R: the adaptive sampler only ever samples coarser."""
        return self._spec.period

    def set_sampling(self, value: int) -> None:
        self.set_sample_bytes(value)

    def set_sample_bytes(self, sample_bytes: int) -> None:
        """Change R, the mean bytes between samples; every thread draws its next threshold with it."""
        if not 1 <= sample_bytes <= MAX_SAMPLE_BYTES:
            raise ValueError(f"sample_bytes must be within 1..{MAX_SAMPLE_BYTES}, got {sample_bytes}")
        self._sample_bytes = sample_bytes
        if self._bpf is not None:
            self.write_param(PARAM_SAMPLING, sample_bytes)

    def note_pids(self, pids: Iterable[int]) -> None:
        """New or exec'd processes: read their mappings at the next refresh."""
        self.tracker.note_pids(pids)

    def note_process_event(self, event: ProcessEvent) -> None:
        if event.kind is ProcessEventKind.EXEC:  # it may map another C library now
            self.tracker.note_pids((event.pid,))

    def loaded(self, bpf: object) -> None:
        super().loaded(bpf)
        self.write_param(PARAM_SAMPLING, self._sample_bytes)

    def open_event_buffers(self) -> None:
        decode = StackEventDecoder(self.name, self.stacks, alloc_values).decode
        self.open_buffer(self.samples_buffer, decode, self._config.perf_buffer_pages, WAKEUP_EVENTS, stack_records=True)

    def attach_events(self) -> None:
        with self._lock:
            self._stopped = False
            self._update()
            if not self._attached and self._failed:
                raise BpfAttachError(
                    f"could not attach the allocation uprobes to any of {len(self._failed)} C libraries"
                )
        if not self._attached:
            scope = "the processes given with --pid" if self.tracker.restricted else "any process"
            logger.warning("alloc: no C library found in %s yet; looking again at each refresh", scope)

    def refresh(self) -> None:
        """Attach to C libraries that appeared, detach from those no profiled process maps any more."""
        with self._lock:
            if self._bpf is None or self._stopped:
                return
            self._update()

    def detach_events(self) -> None:
        with self._lock:
            self._stopped = True
            for target in list(self._attached):
                self._detach(target, quietly=True)

    def _update(self) -> None:
        wanted = self.tracker.scan()
        for target in self._attached.keys() - wanted.keys():
            self._detach(target)
        for target in wanted.keys() - self._attached.keys():
            self._attach(target, wanted[target])
        self._failed &= wanted.keys()
        self.attach_method = self._describe()

    def _describe(self) -> str:
        libraries = {target.library for target in self._attached}
        text = f"uprobes on {len(libraries)} C librar{'y' if len(libraries) == 1 else 'ies'}"
        if self.tracker.restricted:
            processes = {target.pid for target in self._attached}
            text += f" in {len(processes)} process{'' if len(processes) == 1 else 'es'}"
        return text

    def _attach(self, target: Target, source: Source) -> None:
        try:
            fd = os.open(source.open_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:  # the process exited since the scan: the next scan finds another or none
            logger.debug("alloc: cannot open %s: %s", source.open_path, e)
            return
        try:
            events = self._attach_file(fd, target)
        except (BpfAttachError, OSError) as e:
            os.close(fd)
            self.attach_failures += 1
            if target not in self._failed:
                self._failed.add(target)
                logger.warning("alloc: cannot attach to %s of pid %d: %s", source.path, source.pid, e)
            return
        self._attached[target] = _Attachment(fd, events, source)
        self._failed.discard(target)
        where = "every process" if target.pid == ALL_PROCESSES else f"pid {target.pid}"
        logger.info("alloc: attached to %s (found in pid %d) for %s", source.path, source.pid, where)

    def _attach_file(self, fd: int, target: Target) -> tuple[bytes, ...]:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != target.library:
            raise BpfAttachError("the file changed since it was found")
        from bcc import BPF

        path = f"/proc/self/fd/{fd}".encode()
        try:
            functions = BPF.get_user_functions_and_addresses(path, _ALLOCATOR_SYMBOLS)
        except Exception as e:  # bcc raises bare Exception
            raise BpfAttachError(f"cannot read its symbols: {e}") from e
        by_name: dict[str, int] = {}
        for name, address in functions:
            by_name.setdefault(name.decode(), address)
        if "malloc" not in by_name:
            raise BpfAttachError("it has no malloc symbol")
        events: list[bytes] = []
        attached_addresses: set[int] = set()
        try:
            for name, program in ALLOCATORS:
                address = by_name.get(name)
                if address is None or address in attached_addresses:
                    continue  # a C library without it, or an alias of one already probed
                before = set(self._bpf.uprobe_fds)
                self._bpf.attach_uprobe(name=path, addr=address, fn_name=program.encode(), pid=target.pid)
                events += set(self._bpf.uprobe_fds) - before
                attached_addresses.add(address)
        except Exception as e:  # bcc raises bare Exception; undo the part that worked
            for event in events:
                self._bpf.detach_uprobe_event(event)
            raise BpfAttachError(str(e)) from e
        return tuple(events)

    def _detach(self, target: Target, quietly: bool = False) -> None:
        attachment = self._attached.pop(target)
        try:
            for event in attachment.events:
                self._bpf.detach_uprobe_event(event)
        except Exception as e:  # bcc raises bare Exception; the descriptor must be closed anyway
            logger.warning("alloc: detaching from %s failed: %s", attachment.source.path, e)
        finally:
            os.close(attachment.fd)
        where = "every process" if target.pid == ALL_PROCESSES else f"pid {target.pid}"
        logger.log(
            logging.DEBUG if quietly else logging.INFO, "alloc: detached from %s for %s", attachment.source.path, where
        )
