"""Sampling stage: the adaptive sampler that ties the controllers to the probes, once per window.

Every `sampling.adjust_interval_s` the daemon's main thread calls `tick()`: it measures each adaptive
stream's event rate off the perf buffers and the agent's own CPU (psutil), lets the CPU governor
scale the budgets, steers each stream's in-kernel parameter (`RateController`), and sets the
user-space keep probability to cover what the kernel step could not (a step is capped at x4). Changes
are logged once each; the current values are read by the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.sampling.controller import DEAD_BAND, CpuGovernor, RateController
from agent.sampling.keep import KeepSampler
from agent.sampling.settings import SamplingConfig

logger = logging.getLogger(__name__)

CEILING = 1 << 40


class ReceivedStats(Protocol):
    received: int
    lost: dict[str, int]  # records the kernel could not hand over, by perf buffer or in-kernel counter


class AdaptiveProbe(Protocol):
    """A probe whose in-kernel sampling parameter may be steered (see `agent.probes.bpf_probe`)."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> ReceivedStats: ...

    @property
    def adaptive(self) -> bool: ...

    def sampling_floor(self) -> int: ...

    def set_sampling(self, value: int) -> None: ...


def _offered(probe: AdaptiveProbe) -> int:
    """Events the probe's stream produced: received, plus lost (a full perf buffer, an off-CPU stack
    evicted from its map). The losses count as demand: at 2,000 threads blocked at once, 622,651
    blocks went only to `stacks_evicted` while the sampler, seeing few events arrive, stayed at 1-in-1;
    a coarser parameter is what keeps fewer stacks in the map and fewer records in the buffer."""
    stats = probe.stats
    return stats.received + sum(stats.lost.values())


def _process_cpu_seconds() -> float:
    # User + system time of every thread, as psutil's cpu_times() sums them, at 1 us instead of 60.
    return time.process_time()


class AdaptiveSampler:
    def __init__(
        self,
        config: SamplingConfig,
        probes: Sequence[AdaptiveProbe],
        keep: KeepSampler,
        cpu_seconds: Callable[[], float] = _process_cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = [probe for probe in probes if probe.adaptive]
        self._keep = keep
        self._cpu_seconds = cpu_seconds
        self._clock = clock
        self.governor = CpuGovernor(config.cpu_budget_percent / 100)
        self.controllers = {
            probe.name: RateController(
                probe.name, float(config.max_events_per_s), probe.sampling_floor(), CEILING, probe.sampling_floor()
            )
            for probe in self._probes
        }
        self._last_time = clock()
        self._last_cpu = cpu_seconds()
        self._last_received = {probe.name: _offered(probe) for probe in self._probes}
        for probe in self._probes:
            probe.set_sampling(probe.sampling_floor())

    def tick(self) -> None:
        now, cpu = self._clock(), self._cpu_seconds()
        elapsed = now - self._last_time
        if elapsed <= 0:
            return
        events = {}
        for probe in self._probes:
            offered = _offered(probe)
            events[probe.name] = offered - self._last_received[probe.name]
            self._last_received[probe.name] = offered
        scale = self.governor.update(cpu - self._last_cpu, elapsed, sum(events.values()) / elapsed)
        self._last_time, self._last_cpu = now, cpu
        for probe in self._probes:
            self._steer(probe, events[probe.name], elapsed, scale)

    def _steer(self, probe: AdaptiveProbe, events: int, elapsed: float, scale: float) -> None:
        controller = self.controllers[probe.name]
        before = controller.parameter
        after = controller.update(events, elapsed, scale)
        if after != before:
            probe.set_sampling(after)
            logger.info(
                "%s: sampling parameter %d -> %d (%.0f events/s, budget %.0f/s x CPU scale %.2f)",
                probe.name,
                before,
                after,
                events / elapsed,
                controller.budget_per_s,
                scale,
            )
        # What the new parameter should let through; the keep probability covers any excess.
        predicted = events / elapsed * before / after
        target = controller.budget_per_s * scale
        probability = 1.0 if predicted <= target * (1 + DEAD_BAND) else target / predicted
        if probability != self._keep.probability(probe.name):
            logger.info("%s: keeping %.3f of events in user space until the next adjustment", probe.name, probability)
        self._keep.set_probability(probe.name, probability)

    def parameters(self) -> dict[tuple[str, str], float]:
        """For the metrics: keep probabilities and the CPU scale."""
        values: dict[tuple[str, str], float] = {("agent", "cpu_scale"): self.governor.scale}
        for name in self.controllers:
            values[(name, "keep_probability")] = self._keep.probability(name)
        return values
