"""Flow: symbolize -> build -> export, what the report thread does with each finished interval.

Owns the hand-off of one `IntervalProfile` through the symbolizer, the pprof builder and every
enabled sink. A failing sink is counted and logged and never stops the others. This module starts
no threads: `agent.daemon` runs `Reporter.report` on the thread it owns.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from agent.aggregate.types import IntervalProfile
from agent.errors import ExportError
from agent.export.sink import Sink
from agent.pprof.builder import build_pprof
from agent.symbolize.types import Profile

logger = logging.getLogger(__name__)


class IntervalSymbolizer(Protocol):
    def symbolize(self, interval: IntervalProfile) -> Profile: ...


class Reporter:
    def __init__(self, symbolizer: IntervalSymbolizer, sinks: Sequence[Sink]) -> None:
        self._symbolizer = symbolizer
        self._sinks = sinks
        self.intervals = 0
        self.empty_intervals = 0
        self.exported: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._known(sinks)
        self.failing_since: dict[str, float] = {}  # sink -> monotonic time of its first failure in a row

    def set_sinks(self, sinks: Sequence[Sink]) -> None:
        """Swap the sinks (a config reload); takes effect from the next interval."""
        self._sinks = sinks
        self._known(sinks)

    def report(self, interval: IntervalProfile) -> None:
        self.intervals += 1
        if not interval.samples:
            self.empty_intervals += 1
            logger.debug("%s interval had no samples; nothing to export", interval.spec.name)
            return
        profile = self._symbolizer.symbolize(interval)
        # OTLP encodes from the profile itself; only files (and OTLP's include_pprof) need pprof bytes.
        pprof = build_pprof(profile) if any(sink.needs_pprof for sink in self._sinks) else b""
        for sink in self._sinks:
            try:
                sink.export(profile, pprof)
            except ExportError as e:
                self._failed(sink.name)
                logger.warning("%s sink could not export the %s profile: %s", sink.name, profile.spec.name, e)
            except Exception:
                self._failed(sink.name)
                logger.exception("%s sink failed unexpectedly", sink.name)
            else:
                self.exported[sink.name] += 1
                self.failing_since.pop(sink.name, None)

    def _known(self, sinks: Sequence[Sink]) -> None:
        """Each sink's outcomes are exported at 0 from the moment it is configured."""
        for sink in sinks:
            self.exported.setdefault(sink.name, 0)
            self.failed.setdefault(sink.name, 0)

    def _failed(self, sink: str) -> None:
        self.failed[sink] += 1
        self.failing_since.setdefault(sink, time.monotonic())
