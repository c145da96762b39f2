"""Decode-to-aggregate routing: what the pipeline thread does with each event from the reader.

CPU events get their stack ids resolved (probes) and are summed into the interval (aggregate);
process events tell the symbolizer to capture a process's mappings while it is alive; an
`IntervalMark` rotates the stack maps and hands the finished interval to `deliver`. This module
starts no threads: `agent.daemon` runs `Pipeline.handle` on the thread it owns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from agent.aggregate.interval import IntervalAggregator
from agent.aggregate.types import IntervalProfile, ProfileSpec
from agent.probes.events import CpuEvent, IntervalMark, ProcessEvent, ProcessEventKind
from agent.probes.stacks import StackResolver

logger = logging.getLogger(__name__)


class ProcessObserver(Protocol):
    """What the pipeline needs from the symbolize stage: capture a live process's mappings."""

    def observe_process(self, pid: int) -> None: ...

    def on_exec(self, pid: int) -> None: ...


class Pipeline:
    def __init__(
        self,
        spec: ProfileSpec,
        stacks: StackResolver,
        processes: ProcessObserver,
        deliver: Callable[[IntervalProfile], None],
    ) -> None:
        self._spec = spec
        self._stacks = stacks
        self._processes = processes
        self._deliver = deliver
        self._aggregator = IntervalAggregator(spec)
        self._values = (1, spec.period)  # one sample stands for one period of CPU time
        self._seen_pids: set[int] = set()
        self.unknown_items = 0

    def handle(self, item: object) -> bool:
        """Process one queued item; True once the final interval has been delivered."""
        if isinstance(item, CpuEvent):
            self._on_cpu_event(item)
        elif isinstance(item, ProcessEvent):
            self._on_process_event(item)
        elif isinstance(item, IntervalMark):
            return self._on_mark(item)
        else:
            self.unknown_items += 1
            logger.debug("ignoring unexpected queue item %r", item)
        return False

    def _on_cpu_event(self, event: CpuEvent) -> None:
        if event.pid not in self._seen_pids and not event.kernel_thread:
            # Covers a process whose announcement was lost, and is cheap once captured.
            self._seen_pids.add(event.pid)
            self._processes.observe_process(event.pid)
        kernel = self._stacks.resolve(event.stack_gen, event.kernel_stack_id, kernel=True)
        user = self._stacks.resolve(
            event.stack_gen, event.user_stack_id, kernel=False, kernel_thread=event.kernel_thread
        )
        self._aggregator.add(
            pid=event.pid,
            tid=event.tid,
            cpu=event.cpu,
            kernel=kernel,
            user=user,
            thread_name=event.comm,
            values=self._values,
            timestamp_ns=event.timestamp_ns,
        )

    def _on_process_event(self, event: ProcessEvent) -> None:
        # NEW comes once per process image (first sample, or first after exec): always capture afresh,
        # since a reused pid or a finished exec makes an older snapshot wrong.
        self._processes.on_exec(event.pid)
        if event.kind is ProcessEventKind.NEW:
            self._processes.observe_process(event.pid)
            self._seen_pids.add(event.pid)
        else:
            self._seen_pids.discard(event.pid)

    def _on_mark(self, mark: IntervalMark) -> bool:
        interval = self._aggregator.finish(mark.end_mono_ns)
        self._stacks.rotate()
        self._seen_pids.clear()
        self._deliver(interval)
        return mark.final
