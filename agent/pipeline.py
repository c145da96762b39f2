"""Decode-to-aggregate routing: what the pipeline thread does with each event from the reader.

Stack events get their stack ids resolved against their own profiler's stack maps (probes) and are
summed into that profiler's interval (aggregate); process events tell the symbolizer to capture a
process's mappings while it is alive; an `IntervalMark` rotates every profiler's stack maps and hands
each finished interval to `deliver`. This module starts no threads: `agent.daemon` runs
`Pipeline.handle` on the thread it owns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.aggregate.interval import IntervalAggregator
from agent.aggregate.types import IntervalProfile, ProfileSpec
from agent.probes.events import IntervalMark, ProcessEvent, ProcessEventKind, StackEvent
from agent.probes.stacks import StackResolver

logger = logging.getLogger(__name__)


class ProcessObserver(Protocol):
    """What the pipeline needs from the symbolize stage: capture a live process's mappings."""

    def observe_process(self, pid: int) -> None: ...

    def on_exec(self, pid: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Stream:
    """One profiler's event stream: what its values mean and where its stack ids resolve."""

    spec: ProfileSpec
    stacks: StackResolver


class Pipeline:
    def __init__(
        self,
        streams: Mapping[str, Stream],
        processes: ProcessObserver,
        deliver: Callable[[IntervalProfile], None],
    ) -> None:
        self._streams = dict(streams)
        self._aggregators = {name: IntervalAggregator(stream.spec) for name, stream in streams.items()}
        self._processes = processes
        self._deliver = deliver
        self._seen_pids: set[int] = set()
        self.unknown_items = 0

    def handle(self, item: object) -> bool:
        """Process one queued item; True once the final intervals have been delivered."""
        if isinstance(item, StackEvent):
            self._on_stack_event(item)
        elif isinstance(item, ProcessEvent):
            self._on_process_event(item)
        elif isinstance(item, IntervalMark):
            return self._on_mark(item)
        else:
            self.unknown_items += 1
            logger.debug("ignoring unexpected queue item %r", item)
        return False

    def _on_stack_event(self, event: StackEvent) -> None:
        stream = self._streams.get(event.profiler)
        if stream is None:
            self.unknown_items += 1
            return
        if event.pid not in self._seen_pids and not event.kernel_thread:
            # Covers a process whose announcement was lost, and is cheap once captured.
            self._seen_pids.add(event.pid)
            self._processes.observe_process(event.pid)
        kernel = stream.stacks.resolve(event.stack_gen, event.kernel_stack_id, kernel=True)
        user = stream.stacks.resolve(
            event.stack_gen, event.user_stack_id, kernel=False, kernel_thread=event.kernel_thread
        )
        self._aggregators[event.profiler].add(
            pid=event.pid,
            tid=event.tid,
            cpu=event.cpu,
            kernel=kernel,
            user=user,
            thread_name=event.comm,
            values=event.values,
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
        self._seen_pids.clear()
        for name, aggregator in self._aggregators.items():
            interval = aggregator.finish(mark.end_mono_ns)
            self._streams[name].stacks.rotate()
            self._deliver(interval)
        return mark.final
