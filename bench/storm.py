"""Scenario: an exec storm. What 200 short processes a second cost the agent, and how many are named.

A CI runner, a build host or a shell-heavy cron box execs hundreds of processes a second. The workload
is `tests/workloads/exec_storm.c drive 200 SECONDS 5`: 200 execs a second, on a fixed schedule, of a
child that spends 5 ms of its own CPU in `storm_work` (its binary) calling libc's `rand_r`, then exits.
The agent profiles the whole host with `cpu,offcpu` at its defaults otherwise, writing files, at 19 Hz
(the default) and at 99 Hz. Per run, after READY and a settle period:
- idle: the agent's CPU over a window with no storm (the floor the storm adds to);
- storm: the agent's CPU over the storm (utime + stime of every thread, in % of one core), its RSS
  when the storm starts and when it ends, and the process events and snapshots it counted;
- naming: after the agent is stopped (which writes the last interval), the CPU samples of the
  storm's children are read back and told apart as `tests/support/storm.py` says: named, unnamed,
  and start-up (in the exec or the dynamic loader, before any frame of the child's code can be on
  the stack), reported beside both fractions.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from typing import Any

from bench.agent import metric_sum, start_agent
from bench.context import Context
from bench.procs import cpu_seconds, rss_bytes
from bench.results import Check, ScenarioResult, Spread, Table
from tests.support.profiles import read_all
from tests.support.storm import children_samples

logger = logging.getLogger(__name__)

FREQUENCIES = (19, 99)
RATE = 200  # execs a second
CHILD_MS = 5  # CPU each child spends in storm_work
STORM_S = 60.0
SETTLE_S = 5.0
IDLE_S = 20.0
TARGET_NAMED = 0.90
TARGET_CPU_PERCENT = 2.0
TARGET_RSS_MB = 5.0
MB = 1e6
NUMBER = re.compile(r"(\w+)=([0-9.]+)")


def one_run(ctx: Context, hz: int, rep: int) -> dict[str, Any]:
    directory = ctx.directory("storm", f"{hz}hz-{rep}")
    agent = start_agent(directory / "agent", "--profilers", "cpu,offcpu", "--frequency", str(hz))
    try:
        agent.wait_ready()
        time.sleep(SETTLE_S)
        idle_cpu, idle_begun = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(IDLE_S)
        idle = 100 * (cpu_seconds(agent.pid) - idle_cpu) / (time.monotonic() - idle_begun)
        before = agent.metrics()
        rss_start, cpu_start, begun = rss_bytes(agent.pid), cpu_seconds(agent.pid), time.monotonic()
        driver = subprocess.Popen(
            [str(ctx.binaries["exec_storm"]), "drive", str(RATE), str(STORM_S), str(CHILD_MS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        output, _ = driver.communicate(timeout=STORM_S + 60)
        seconds = time.monotonic() - begun
        cpu, rss_end = cpu_seconds(agent.pid) - cpu_start, rss_bytes(agent.pid)
        after = agent.metrics()
    finally:
        agent.stop()
    if driver.returncode != 0:
        raise RuntimeError(f"exec_storm drive exited {driver.returncode}: {output}")
    truth = {name: float(value) for name, value in NUMBER.findall(output)}
    counts = children_samples(read_all(agent.profiles, "cpu"), driver.pid)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    return {
        "hz": hz,
        "rep": rep,
        "storm_s": seconds,
        "idle_cpu_percent": idle,
        "cpu_percent": 100 * cpu / seconds,
        "rss_start_mb": rss_start / MB,
        "rss_end_mb": rss_end / MB,
        "truth": truth,
        "samples": counts,
        "exec_events": delta("profiling_agent_probe_process_events_total", kind="exec"),
        "new_events": delta("profiling_agent_probe_process_events_total", kind="new"),
        "captured": delta("profiling_agent_symbolize_processes_total", event="captured"),
        "vanished": delta("profiling_agent_symbolize_processes_total", event="vanished"),
    }


def named_fraction(run: dict[str, Any], with_startup: bool) -> float:
    counts = run["samples"]
    total = counts["named"] + counts["unnamed"] + (counts["startup"] if with_startup else 0)
    return counts["named"] / total if total else float("nan")


def summarize(ctx: Context, runs: list[dict[str, Any]]) -> ScenarioResult:
    result = ScenarioResult("storm", "Exec storm: 200 short processes a second", __doc__ or "")
    rows = []
    for hz in FREQUENCIES:
        mine = [r for r in runs if r["hz"] == hz]
        rows.append(
            (
                f"{hz} Hz",
                Spread.of(r["idle_cpu_percent"] for r in mine).show(2, "%"),
                Spread.of(r["cpu_percent"] for r in mine).show(2, "%"),
                Spread.of(r["rss_end_mb"] - r["rss_start_mb"] for r in mine).show(1),
                Spread.of(100 * named_fraction(r, False) for r in mine).show(1, "%"),
                Spread.of(100 * named_fraction(r, True) for r in mine).show(1, "%"),
                Spread.of(sum(r["samples"].values()) for r in mine).show(0),
                Spread.of(r["truth"].get("spawned", 0) / r["storm_s"] for r in mine).show(0),
                Spread.of(r["new_events"] for r in mine).show(0),
                Spread.of(r["vanished"] for r in mine).show(0),
            )
        )
        target = f"exec storm at {hz} Hz, cpu,offcpu"
        named = Spread.of(named_fraction(r, False) for r in mine)
        cpu = Spread.of(r["cpu_percent"] for r in mine)
        growth = Spread.of(abs(r["rss_end_mb"] - r["rss_start_mb"]) for r in mine)
        result.checks += [
            Check(f"{target}: >= {100 * TARGET_NAMED:g}% of the children's samples named (start-up apart)",
                  named.show(3), named.median >= TARGET_NAMED),
            Check(f"{target}: agent CPU <= {TARGET_CPU_PERCENT:g}% of one core", cpu.show(2, "%"),
                  cpu.median <= TARGET_CPU_PERCENT),
            Check(f"{target}: RSS within ±{TARGET_RSS_MB:g} MB over the storm", growth.show(1, " MB"),
                  growth.high <= TARGET_RSS_MB),
        ]  # fmt: skip
    columns = (
        "frequency",
        f"agent CPU idle ({IDLE_S:g} s)",
        f"agent CPU in the storm ({STORM_S:g} s)",
        "RSS end - start, MB",
        "children's samples named",
        "named, start-up samples included",
        "children's samples",
        "execs per second (measured)",
        "processes announced",
        "snapshots vanished",
    )
    result.tables.append(Table(columns, tuple(rows)))
    result.notes.append(
        f"{ctx.reps} runs per frequency; whole host, `--profilers cpu,offcpu`, files. Workload: "
        f"`exec_storm drive {RATE} {STORM_S:g} {CHILD_MS}` (tests/workloads/exec_storm.c). A process is announced "
        "by its first record (a sample or a block), so most children of a 19 Hz run are never announced."
    )
    result.raw = {"runs": runs}
    return result


def run(ctx: Context) -> ScenarioResult:
    runs = []
    for rep in range(ctx.reps):
        for hz in FREQUENCIES:
            logger.info("storm: %d Hz, run %d", hz, rep + 1)
            runs.append(one_run(ctx, hz, rep))
    return summarize(ctx, runs)
