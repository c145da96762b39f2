"""Sampling stage: its configuration section, `sampling`.

The adaptive sampler keeps each event stream and the agent's own CPU within budget; these are the
budgets and its pace. Declared once per field (see `agent.settings`); `agent.config` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.settings import ranged_float, ranged_int, setting


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    SECTION: ClassVar[str] = "sampling"

    max_events_per_s: int = setting(
        2000,
        ranged_int(10, 10_000_000),
        "Budget of events per second per profiler (off-CPU, allocations) coming off the perf buffers.",
    )
    cpu_budget_percent: float = setting(
        1.0,
        ranged_float(0.05, 100.0),
        "Budget of the agent's own CPU, in percent of one core; event rates are lowered to stay under it.",
    )
    adjust_interval_s: float = setting(
        1.0,
        ranged_float(0.1, 60.0),
        "How often the sampler measures rates and adjusts the in-kernel sampling parameters.",
    )
