"""Sampling stage: the user-space keep-probability, the last line of defence between adjustments.

The in-kernel parameter is steered once per window; a burst inside a window still reaches the
pipeline. Each stream has a keep probability p (1 in steady state), set from the last window's
overshoot; an event is kept with probability p and then stands for 1/p events, so every kept value
is scaled by 1/p and estimated totals stay unbiased whatever p is. Runs on the pipeline thread.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

from agent.probes.events import StackEvent


class KeepSampler:
    def __init__(self, rng: random.Random | None = None, profilers: Iterable[str] = ()) -> None:
        """`profilers`: the streams, whose drop counts are then exported at 0 from the start."""
        self._rng = rng or random.Random()
        self._keep: dict[str, float] = {}
        self.dropped: Counter[str] = Counter(dict.fromkeys(profilers, 0))  # by profiler
        # Every probability is 1, so `admit` would return every event as it is: the pipeline reads
        # this flag instead of asking about each event.
        self.keeps_all = True

    def set_probability(self, profiler: str, probability: float) -> None:
        self._keep[profiler] = min(1.0, max(probability, 1e-6))
        self.keeps_all = all(p >= 1.0 for p in self._keep.values())

    def probability(self, profiler: str) -> float:
        return self._keep.get(profiler, 1.0)

    def admit(self, event: StackEvent) -> StackEvent | None:
        p = self._keep.get(event.profiler, 1.0)
        if p >= 1.0:
            return event
        if self._rng.random() >= p:
            self.dropped[event.profiler] += 1
            return None
        scale = 1.0 / p
        return event._replace(values=tuple(value * scale for value in event.values))
