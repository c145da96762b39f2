"""Flow: decode-to-aggregate routing, what the pipeline thread does with each event from the reader.

Stack events pass the sampling stage's keep decision and are summed into their profiler's interval
(aggregate). CPU and off-CPU events whose program copies the user stack arrive unwound already (the
reader's decoder runs the unwind stage inside the perf-buffer callback, see `agent.unwind.unwinder`);
allocation events that carry a copy are unwound here, after the keep decision; with `fp` the kernel's
frame-pointer stack is the user stack. The process registry (`agent.process.registry`) has captured
an announced process's mappings as the reader read the event; here a process event resets what the
selector, the unwinder and the interpreter stages knew of the pid; an `IntervalMark` hands
each profiler's finished interval to `deliver`. This module starts no threads:
`agent.daemon` runs `Pipeline.handle` on the thread it owns, and `Pipeline.poll` between batches (the
timed work of Python processes: the start-up scan and the retries of interpreters not ready yet).

Process filters: with a selector (`agent.metadata.selector.ProcessSelector`), stack events of
rejected processes are dropped before they are aggregated and counted in `filtered`, and rejected
processes are not inspected; their snapshots, taken at the announcement, expire unseen (after
`symbolize.process_ttl_intervals`). Every process event makes the selector forget its
decision about the pid, since a new process or an exec changes what the filters look at. Kernel
threads are decided by their name alone: with any include pattern they are dropped (see the selector).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from agent.aggregate.interval import IntervalAggregator
from agent.aggregate.types import IntervalProfile
from agent.flow.jvm import JavaFrames
from agent.flow.python import PythonFrames
from agent.probes.events import IntervalMark, ProcessEvent, ProcessEventKind, StackEvent
from agent.types import InterpreterStatus, ProfileSpec, Stack

logger = logging.getLogger(__name__)

_NO_PYTHON = InterpreterStatus.NONE


class KeepLike(Protocol):
    """The sampling stage's user-space keep decision (`agent.sampling.keep.KeepSampler`)."""

    @property
    def keeps_all(self) -> bool:
        """True while every event is kept as it is (`admit` need not be asked)."""

    def admit(self, event: StackEvent) -> StackEvent | None: ...


class UnwinderLike(Protocol):
    """The unwind stage (`agent.unwind.unwinder.Unwinder`): the user stack of an event that still carries
    its stack copy (a bursty profiler's, which the reader did not unwind), and the process events that
    make what it knows of a pid stale."""

    def unwind(self, event: StackEvent) -> Stack: ...

    def forget(self, pid: int) -> None: ...


class ProcessObserver(Protocol):
    """What the pipeline needs from the process registry (`agent.process.registry.ProcessRegistry`): a
    live process's mappings, captured now unless they were (a process whose announcement was lost)."""

    def observe_process(self, pid: int) -> None: ...


class ProcessSelectorLike(Protocol):
    """What the pipeline needs from the process filters (`agent.metadata.selector.ProcessSelector`)."""

    def admits(self, pid: int) -> bool: ...

    def admits_kernel_thread(self, comm: str) -> bool: ...

    def forget(self, pid: int) -> None: ...


class Pipeline:
    def __init__(
        self,
        specs: Mapping[str, ProfileSpec],
        processes: ProcessObserver,
        deliver: Callable[[IntervalProfile], None],
        selector: ProcessSelectorLike | None = None,
        keep: KeepLike | None = None,
        unwinder: UnwinderLike | None = None,
        python: PythonFrames | None = None,
        java: JavaFrames | None = None,
    ) -> None:
        self._keep = keep
        self._python = python
        self._java = java
        self._unwinder = unwinder
        self._aggregators = {name: IntervalAggregator(spec) for name, spec in specs.items()}
        self._processes = processes
        self._deliver = deliver
        self._selector = selector
        self._seen_pids: set[int] = set()
        self._received = dict.fromkeys(specs, 0)  # stack events per profiler in the current interval
        self.unknown_items = 0
        self.filtered = 0  # stack events dropped by the process filters
        self.last_rates: dict[str, float] = {}  # stack events per second over the last interval

    def handle(self, item: object) -> bool:
        """Process one queued item; True once the final intervals have been delivered."""
        if not isinstance(item, StackEvent):
            return self._handle_other(item)
        # Stack events, inline: this runs for every event, and a call costs as much as a step here.
        event = item
        aggregator = self._aggregators.get(event.profiler)
        if aggregator is None:
            self.unknown_items += 1
            return False
        self._received[event.profiler] += 1
        if self._selector is not None and not self._admits(event):
            self.filtered += 1
            return False
        keep = self._keep
        if keep is not None and not keep.keeps_all:  # the sampling stage: may drop the event, or weight it up
            kept = keep.admit(event)
            if kept is None:
                return False
            event = kept
        if event.pid not in self._seen_pids and not event.kernel_thread:
            # Covers a process whose announcement was lost, and is cheap once captured.
            self._seen_pids.add(event.pid)
            self._processes.observe_process(event.pid)
            if self._python is not None:
                self._python.observe(event.pid, announced=False)
            if self._java is not None:
                self._java.observe(event.pid)
        if self._python is not None and event.python.status is not _NO_PYTHON:
            self._python.on_event(event)  # names the code objects while the process is alive
        if event.user_copy is None or self._unwinder is None:
            user = event.user
            aggregator.add_event(event, user, event.identity)
        else:  # after the keep decision: unwinding costs more than anything else done per event
            user = self._unwinder.unwind(event)
            aggregator.add_event(event, user)
        if user.java and self._java is not None:
            self._java.on_stack(event.pid, user)  # reads the Java methods while the JVM is alive
        return False

    def poll(self, limit_s: float) -> float:
        """Between batches: the timed work (the Python processes' scan and retries); how long the pipeline
        thread may wait for the next batch, at most `limit_s`."""
        if self._java is not None:
            limit_s = self._java.poll(limit_s)
        return limit_s if self._python is None else self._python.poll(limit_s)

    def scan_python(self, pids: Iterable[int]) -> None:
        """Processes running before the agent, to be inspected before their first sample (see `poll`);
        those the process filters reject are left to be decided as any other."""
        if self._python is not None:
            self._python.scan(pid for pid in pids if self._selector is None or self._selector.admits(pid))

    def _handle_other(self, item: object) -> bool:
        if isinstance(item, ProcessEvent):
            self._on_process_event(item)
        elif isinstance(item, IntervalMark):
            return self._on_mark(item)
        else:
            self.unknown_items += 1
            logger.debug("ignoring unexpected queue item %r", item)
        return False

    def _admits(self, event: StackEvent) -> bool:
        assert self._selector is not None
        if event.kernel_thread:
            return self._selector.admits_kernel_thread(event.comm)
        return self._selector.admits(event.pid)

    def _on_process_event(self, event: ProcessEvent) -> None:
        # NEW comes once per process image (first sample, or first after exec): a reused pid or a
        # finished exec makes what was known of the pid wrong. The filters' decision too is taken
        # again now, while the process is alive.
        if self._selector is not None:
            self._selector.forget(event.pid)
        if self._unwinder is not None:
            self._unwinder.forget(event.pid)
        # The registry has retired the older image (with this time: its samples, which may still be on
        # their way, are named from it) and captured the new one as the event was read.
        if self._python is not None:
            self._python.on_exec(event.pid, exec_=event.kind is ProcessEventKind.EXEC)
        if self._java is not None:
            self._java.on_exec(event.pid)
        if event.kind is ProcessEventKind.NEW and (self._selector is None or self._selector.admits(event.pid)):
            self._processes.observe_process(event.pid)
            self._seen_pids.add(event.pid)
            if self._python is not None:
                self._python.observe(event.pid, announced=True)
            if self._java is not None:
                self._java.observe(event.pid)
        else:
            self._seen_pids.discard(event.pid)

    def _on_mark(self, mark: IntervalMark) -> bool:
        self._seen_pids.clear()
        if self._python is not None:
            self._python.end_interval()
        if self._java is not None:
            self._java.end_interval()
        rates: dict[str, float] = {}
        for name, aggregator in self._aggregators.items():
            interval = aggregator.finish(mark.end_mono_ns)
            seconds = (interval.end_mono_ns - interval.start_mono_ns) / 1e9
            rates[name] = self._received[name] / seconds if seconds > 0 else 0.0
            self._received[name] = 0
            self._deliver(interval)
        self.last_rates = rates
        return mark.final
