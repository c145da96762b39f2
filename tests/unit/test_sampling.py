"""The adaptive sampler: convergence to the budget, clamping, CPU governance, unbiased weights."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from agent.probes.events import StackEvent
from agent.sampling.adaptive import AdaptiveSampler
from agent.sampling.controller import MAX_STEP, CpuGovernor, RateController
from agent.sampling.keep import KeepSampler
from agent.sampling.settings import SamplingConfig
from agent.types import EMPTY_STACK


def simulate(controller: RateController, raw_rate: float, windows: int) -> list[float]:
    """Rates seen after each window when the stream's unsampled rate is `raw_rate` events/s."""
    rates = []
    for _ in range(windows):
        rate = raw_rate / controller.parameter  # events are rarer in proportion to the parameter
        rates.append(rate)
        controller.update(round(rate), 1.0)
    return rates


def test_converges_to_the_budget_after_a_step_up_of_the_input() -> None:
    controller = RateController("alloc", 2000, floor=1, ceiling=1 << 40, parameter=1)
    assert simulate(controller, 1000, 3)[-1] == 1000  # under budget: left at the floor
    rates = simulate(controller, 1_000_000, 12)  # a storm: 500x the budget
    assert rates[0] == 1_000_000
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    assert abs(rates[-1] - 2000) / 2000 < 0.2, rates


def test_relaxes_to_the_floor_after_a_step_down() -> None:
    controller = RateController("offcpu", 2000, floor=1, ceiling=1 << 40, parameter=1)
    simulate(controller, 200_000, 10)
    assert controller.parameter > 50
    rates = simulate(controller, 500, 10)
    assert controller.parameter == 1
    assert rates[-1] == 500


def test_steps_are_damped() -> None:
    controller = RateController("s", 100, floor=1, ceiling=1 << 40, parameter=10)
    controller.update(1_000_000, 1.0)
    assert controller.parameter == 10 * MAX_STEP
    controller.update(0, 1.0)
    assert controller.parameter == 10


def test_dead_band_leaves_the_parameter_alone() -> None:
    controller = RateController("s", 1000, floor=1, ceiling=1 << 40, parameter=64)
    for events in (900, 1000, 1140):
        assert controller.update(events, 1.0) == 64


@pytest.mark.parametrize(("floor", "ceiling", "events", "expected"), [(512, 1 << 20, 0, 512), (1, 100, 10**9, 100)])
def test_clamped_to_floor_and_ceiling(floor: int, ceiling: int, events: int, expected: int) -> None:
    controller = RateController("s", 1000, floor=floor, ceiling=ceiling, parameter=max(floor, 90))
    for _ in range(20):
        controller.update(events, 1.0)
    assert controller.parameter == expected


def test_cpu_governor_scales_down_over_budget_and_recovers() -> None:
    governor = CpuGovernor(0.01)
    assert governor.update(0.04, 1.0) == pytest.approx(0.25)  # 4% of a core against a 1% budget
    assert governor.update(0.005, 1.0) == pytest.approx(0.25 * 1.25)
    for _ in range(20):
        governor.update(0.0, 1.0)
    assert governor.scale == 1.0


def event(values: tuple[float, ...], profiler: str = "alloc") -> StackEvent:
    return StackEvent(profiler, 1, 10, 10, 0, False, "w", EMPTY_STACK, EMPTY_STACK, values)


def test_keep_sampler_is_unbiased() -> None:
    keep = KeepSampler(random.Random(7))
    keep.set_probability("alloc", 0.1)
    totals = [0.0, 0.0]
    n = 200_000
    for i in range(n):
        kept = keep.admit(event((1.0, float(i % 100))))
        if kept is not None:
            totals[0] += kept.values[0]
            totals[1] += kept.values[1]
    assert abs(totals[0] - n) / n < 0.02
    true_bytes = sum(i % 100 for i in range(n))
    assert abs(totals[1] - true_bytes) / true_bytes < 0.02
    assert keep.dropped["alloc"] == pytest.approx(0.9 * n, rel=0.02)


def test_keep_sampler_passes_everything_at_probability_one() -> None:
    keep = KeepSampler(random.Random(1))
    original = event((3.0, 4.0), "cpu")
    assert keep.admit(original) is original
    keep.set_probability("cpu", 5.0)  # clamped to 1
    assert keep.probability("cpu") == 1.0


def keeps_all(keep: KeepSampler) -> bool:
    """The flag, read afresh: mypy would keep `keep.keeps_all` narrowed across `set_probability` calls."""
    return keep.keeps_all


def test_keeps_all_while_every_probability_is_one() -> None:
    keep = KeepSampler(random.Random(1))
    assert keeps_all(keep)  # the pipeline then skips `admit`
    keep.set_probability("cpu", 1.0)
    assert keeps_all(keep)
    keep.set_probability("alloc", 0.5)
    assert not keeps_all(keep)
    keep.set_probability("cpu", 0.9)
    keep.set_probability("alloc", 1.0)
    assert not keeps_all(keep)
    keep.set_probability("cpu", 1.0)
    assert keeps_all(keep)


@dataclass
class Stats:
    received: int = 0
    lost: dict[str, int] = field(default_factory=dict)


@dataclass
class FakeProbe:
    name: str
    floor: int
    raw_rate: float  # unsampled events per second
    adaptive: bool = True
    stats: Stats = field(default_factory=Stats)
    settings: list[int] = field(default_factory=list)

    def sampling_floor(self) -> int:
        return self.floor

    def set_sampling(self, value: int) -> None:
        self.settings.append(value)

    def run(self, seconds: float) -> None:
        self.stats.received += round(self.raw_rate * seconds / self.settings[-1])


def test_adaptive_sampler_steers_probes_and_sets_keep_probabilities() -> None:
    clock, cpu = [0.0], [0.0]
    probe = FakeProbe("offcpu", floor=1, raw_rate=64_000)
    static = FakeProbe("cpu", floor=1, raw_rate=1e6, adaptive=False)
    keep = KeepSampler(random.Random(3))
    config = SamplingConfig(max_events_per_s=2000, cpu_budget_percent=1.0, adjust_interval_s=1.0)
    sampler = AdaptiveSampler(config, [probe, static], keep, cpu_seconds=lambda: cpu[0], clock=lambda: clock[0])
    assert probe.settings == [1] and static.settings == []
    keep_probabilities = []
    for _ in range(8):
        probe.run(1.0)
        clock[0] += 1.0
        cpu[0] += 0.002  # 0.2% of a core: under budget
        sampler.tick()
        keep_probabilities.append(sampler.parameters()[("offcpu", "keep_probability")])
    assert probe.settings[-1] == 32  # 64,000/s down to the 2,000/s budget
    # The first window was 32x over and a kernel step is capped at x4: user space keeps 1 in 8 meanwhile.
    assert keep_probabilities[0] == pytest.approx(1 / 8)
    assert keep_probabilities[-1] == 1.0
    assert "cpu" not in sampler.controllers


def test_losses_count_as_demand() -> None:
    """2,000 threads blocked at once: most blocks lose their stacks in the kernel (evicted from the map)
    and few arrive. Seen: the sampler stayed at 1-in-1. Received plus lost is the stream's real rate."""
    clock = [0.0]
    probe = FakeProbe("offcpu", floor=1, raw_rate=40_000)
    keep = KeepSampler(random.Random(3))
    config = SamplingConfig(max_events_per_s=2000, cpu_budget_percent=1.0, adjust_interval_s=1.0)
    sampler = AdaptiveSampler(config, [probe], keep, cpu_seconds=lambda: 0.0, clock=lambda: clock[0])
    for _ in range(4):
        sampled = round(probe.raw_rate / probe.settings[-1])
        room = 1500  # what the map lets through per second; the rest is evicted
        probe.stats.received += min(sampled, room)
        probe.stats.lost["stacks_evicted"] = probe.stats.lost.get("stacks_evicted", 0) + max(0, sampled - room)
        clock[0] += 1.0
        sampler.tick()
    assert probe.settings[-1] == 20  # 40,000/s down to the 2,000/s budget, although only 1,500/s arrived at first


def test_adaptive_sampler_lowers_budgets_when_the_agent_uses_too_much_cpu() -> None:
    clock, cpu = [0.0], [0.0]
    probe = FakeProbe("alloc", floor=512 * 1024, raw_rate=2000 * 512 * 1024)
    keep = KeepSampler(random.Random(3))
    config = SamplingConfig(max_events_per_s=2000, cpu_budget_percent=1.0, adjust_interval_s=1.0)
    sampler = AdaptiveSampler(config, [probe], keep, cpu_seconds=lambda: cpu[0], clock=lambda: clock[0])
    probe.run(1.0)
    clock[0] += 1.0
    cpu[0] += 0.04  # 4% of a core: four times the budget
    sampler.tick()
    assert sampler.governor.scale == pytest.approx(0.25)
    assert probe.settings[-1] == 4 * 512 * 1024
    assert sampler.parameters()[("agent", "cpu_scale")] == pytest.approx(0.25)


def test_cpu_governor_leaves_budgets_alone_when_adaptive_streams_are_quiet() -> None:
    governor = CpuGovernor(0.01)
    # 3% of a core, but the adaptive streams delivered 20 events/s: the cost is fixed, not theirs.
    assert governor.update(0.03, 1.0, events_per_s=20) == 1.0
    assert governor.update(0.03, 1.0, events_per_s=5000) == pytest.approx(1 / 3)
    for _ in range(5):
        governor.update(10.0, 1.0, events_per_s=5000)
    assert governor.scale == pytest.approx(0.05)  # never below the floor
