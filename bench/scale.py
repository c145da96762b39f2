"""Scenario 6, scale with work: the cost of one interval (symbolize + build) as processes and stacks grow.

Synthetic aggregated intervals (`bench.synthetic`) over a fake /proc whose processes are clones of real
ones (the benchmark's Python and its C workloads), so the symbolizer reads real maps-shaped snapshots,
real ELF files and the host's kallsyms. Each point uses a fresh `Symbolizer`: the first interval is
cold (kallsyms parsed, ELF tables loaded, every process captured), a second interval over the same
processes with new stacks is warm (the steady state). Timed in process, single thread, in CPU seconds
of that thread (`time.thread_time`).
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from agent.aggregate.types import IntervalProfile
from agent.pprof.builder import build_pprof
from agent.probes.cpu import cpu_profile_spec
from agent.process.registry import ProcessRegistry
from agent.symbolize.symbolizer import Symbolizer
from bench.context import Context
from bench.results import ScenarioResult, Spread, Table
from bench.synthetic import FakeProc, StackFactory, capture_templates

STACK_AXIS = (1_000, 10_000, 100_000)  # at FIXED_PROCESSES
PROCESS_AXIS = (10, 100, 1_000)  # at FIXED_STACKS
FIXED_PROCESSES = 100
FIXED_STACKS = 10_000


def time_interval(symbolizer: Symbolizer, interval: IntervalProfile) -> dict[str, float]:
    begun = time.thread_time()
    profile = symbolizer.symbolize(interval)
    symbolized = time.thread_time()
    data = build_pprof(profile)
    built = time.thread_time()
    return {"symbolize_s": symbolized - begun, "build_s": built - symbolized, "pprof_bytes": len(data)}


def one_point(ctx: Context, templates: list[Any], processes: int, stacks: int, rep: int) -> dict[str, Any]:
    proc = FakeProc(ctx.directory("scale", f"p{processes}-s{stacks}-{rep}") / "proc", templates, processes)
    factory = StackFactory(proc, seed=rep)
    spec = cpu_profile_spec(19)
    cold_interval = factory.interval(spec, stacks, 1_000_000_000)
    warm_interval = factory.interval(spec, stacks, 11_000_000_000)
    rss_before = psutil.Process().memory_info().rss
    symbolizer = Symbolizer(ProcessRegistry(proc.root))
    cold = time_interval(symbolizer, cold_interval)
    warm = time_interval(symbolizer, warm_interval)
    return {
        "processes": processes,
        "stacks": stacks,
        "rep": rep,
        "cold": cold,
        "warm": warm,
        "rss_growth_mb": (psutil.Process().memory_info().rss - rss_before) / 1e6,
    }


def points() -> list[tuple[int, int]]:
    wanted = [(FIXED_PROCESSES, s) for s in STACK_AXIS] + [(p, FIXED_STACKS) for p in PROCESS_AXIS]
    return sorted(set(wanted), key=lambda point: (point[0] != FIXED_PROCESSES, point))


def row(runs: list[dict[str, Any]]) -> tuple[str, ...]:
    first = runs[0]
    cold = Spread.of(1e3 * (r["cold"]["symbolize_s"] + r["cold"]["build_s"]) for r in runs)
    warm_sym = Spread.of(1e3 * r["warm"]["symbolize_s"] for r in runs)
    warm_build = Spread.of(1e3 * r["warm"]["build_s"] for r in runs)
    warm = Spread.of(1e3 * (r["warm"]["symbolize_s"] + r["warm"]["build_s"]) for r in runs)
    per_stack = Spread.of(1e6 * (r["warm"]["symbolize_s"] + r["warm"]["build_s"]) / r["stacks"] for r in runs)
    size = Spread.of(r["warm"]["pprof_bytes"] / 1e6 for r in runs)
    return (
        f"{first['processes']:,}",
        f"{first['stacks']:,}",
        cold.show(0),
        warm_sym.show(0),
        warm_build.show(0),
        warm.show(0),
        per_stack.show(1),
        size.show(2),
    )


def run(ctx: Context) -> ScenarioResult:
    templates = capture_templates([ctx.binaries["malloc_heavy"], ctx.binaries["ctxswitch"]])
    reps = max(1, min(ctx.reps, 2))  # each point is already thousands of stacks; two runs show the spread
    runs = [one_point(ctx, templates, p, s, rep) for rep in range(reps) for p, s in points()]
    result = ScenarioResult("scale", "Scale with work: one interval's symbolize + build", __doc__ or "")
    rows = tuple(row([r for r in runs if (r["processes"], r["stacks"]) == point]) for point in points())
    columns = (
        "processes",
        "unique stacks",
        "cold interval, ms",
        "warm symbolize, ms",
        "warm build, ms",
        "warm total, ms",
        "warm, µs per stack",
        "pprof, MB",
    )
    result.tables.append(Table(columns, rows))
    result.notes.append(
        f"{reps} runs per point; {len(templates)} process templates; user stacks 4-30 frames, a quarter of the "
        "samples with 3-15 kernel frames; 'cold' includes parsing kallsyms and loading the ELF symbol tables."
    )
    result.raw = {"runs": runs}
    return result
