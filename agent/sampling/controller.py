"""Sampling stage: the per-stream controller that steers an in-kernel sampling parameter to a budget.

Owns the arithmetic only (no BPF, no threads): given how many events a stream produced over the last
window and its budget, pick the next parameter. Both parameters the agent adapts make events rarer as
they grow (off-CPU keeps 1 in N blocks; allocations are sampled every R bytes on average), so the
expected rate is inversely proportional to the parameter and one multiplicative step lands near the
budget. Steps are damped (at most x4 or /4 per window) and a dead band stops flapping. The configured
value is the floor: the sampler only ever coarsens sampling to stay within budget, never goes finer
than the operator asked.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_STEP = 4.0  # one window changes the parameter by at most this factor
DEAD_BAND = 0.15  # rates within +-15% of the target leave the parameter alone
CPU_RELAX = 1.25  # how fast the CPU scale recovers once the agent is back under its CPU budget
MIN_CPU_SCALE = 0.05
# Below this many adaptive events per second the agent's CPU is its fixed cost (timers, the CPU
# profiler, symbolization), which no sampling parameter can lower: squeezing budgets would only
# throw data away.
MIN_EVENTS_FOR_CPU_SCALING = 100.0


@dataclass(slots=True)
class RateController:
    name: str
    budget_per_s: float
    floor: int  # the configured parameter: never sample finer than this
    ceiling: int
    parameter: int

    def update(self, events: int, elapsed_s: float, cpu_scale: float = 1.0) -> int:
        """The parameter for the next window (unchanged inside the dead band)."""
        if elapsed_s <= 0:
            return self.parameter
        rate = events / elapsed_s
        target = self.budget_per_s * cpu_scale
        if target <= 0:
            return self.parameter
        ratio = rate / target  # > 1: too many events, sample coarser
        if abs(ratio - 1) <= DEAD_BAND or (ratio < 1 and self.parameter <= self.floor):
            return self.parameter
        factor = min(max(ratio, 1 / MAX_STEP), MAX_STEP)
        if ratio < 1 and rate == 0:
            factor = 1 / MAX_STEP  # nothing came: relax towards the floor
        proposed = round(self.parameter * factor)
        self.parameter = min(max(proposed, self.floor), self.ceiling)
        return self.parameter


@dataclass(slots=True)
class CpuGovernor:
    """Scales every stream's budget down while the agent uses more CPU than it may, and back up after."""

    budget_fraction: float  # of one core, e.g. 0.01
    scale: float = 1.0

    def update(self, cpu_seconds: float, elapsed_s: float, events_per_s: float = float("inf")) -> float:
        """`events_per_s`: what the adaptive streams delivered; only they can be scaled down."""
        if elapsed_s <= 0:
            return self.scale
        usage = cpu_seconds / elapsed_s
        if usage > self.budget_fraction and events_per_s >= MIN_EVENTS_FOR_CPU_SCALING:
            self.scale = max(MIN_CPU_SCALE, self.scale * self.budget_fraction / usage)
        else:
            self.scale = min(1.0, self.scale * CPU_RELAX)
        return self.scale
