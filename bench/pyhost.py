"""Scenario: a Python host. What naming Python frames costs, per sample and in the steady state.

Every CPU is kept busy by a Python process (`tests/workloads/python/steady.py` under Debian's
`/usr/bin/python3.11`, the distribution's statically linked interpreter). For each frequency (19 and
99 Hz) the agent runs the CPU profiler on those processes (`--pid`), first at its defaults (Python
frames on: the BPF program walks each sample's frame chain, user space names the code objects) and
then with `PROFILING_AGENT_PYTHON_ENABLED=false` (native frames only), for contrast. After a settle
period, over a window:
- kernel side: with `kernel.bpf_stats_enabled=1` (set for the scenario, restored after), the kernel
  counts each BPF program's runs and the time spent in them; the agent's perf-event programs'
  `run_time_ns` / `run_cnt` (from /proc/AGENT/fdinfo) over the window give the ns per sample, which
  includes the frame walk;
- user side: the agent's CPU seconds (utime + stime, every thread) over the window, divided by the CPU
  samples it received (`profiling_agent_probe_events_received_total{profiler="cpu"}`) in it;
- the steady CPU: the agent's CPU over the window, in % of one core.
Both conditions unwind native stacks with DWARF (the default), so the difference is the Python part.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.agent import start_agent
from bench.bpfstats import bpf_stats, prog_stats
from bench.build import REPO
from bench.context import Context
from bench.procs import cpu_seconds
from bench.results import Check, ScenarioResult, Spread, Table
from bench.steady import TARGET_CPU

logger = logging.getLogger(__name__)

FREQUENCIES = (19, 99)
SETTLE_S = 10.0
WINDOW_S = 20.0
PYTHON = Path("/usr/bin/python3.11")
STEADY = REPO / "tests" / "workloads" / "python" / "steady.py"
CONDITIONS = {"python": {}, "native-only": {"PROFILING_AGENT_PYTHON_ENABLED": "false"}}
RECEIVED = "profiling_agent_probe_events_received_total"


def one_run(ctx: Context, pids: list[int], hz: int, condition: str, rep: int) -> dict[str, Any]:
    directory = ctx.directory("python", f"{hz}hz-{condition}-{rep}")
    flags = ["--profilers", "cpu", "--frequency", str(hz), *(a for pid in pids for a in ("--pid", str(pid)))]
    agent = start_agent(directory / "agent", *flags, env=CONDITIONS[condition])
    try:
        agent.wait_ready()
        time.sleep(SETTLE_S)
        metrics = agent.metrics()
        cpu, kernel, received = cpu_seconds(agent.pid), prog_stats(agent.pid), metrics_sum(metrics)
        begun = time.monotonic()
        time.sleep(WINDOW_S)
        seconds = time.monotonic() - begun
        after = agent.metrics()
        cpu_after, kernel = cpu_seconds(agent.pid), prog_stats(agent.pid) - kernel
        received_after = metrics_sum(after)
    finally:
        agent.stop()
    samples = received_after - received
    return {
        "hz": hz,
        "condition": condition,
        "rep": rep,
        "window_s": seconds,
        "cpu_percent": 100 * (cpu_after - cpu) / seconds,
        "user_us_per_sample": 1e6 * (cpu_after - cpu) / samples if samples else float("nan"),
        "kernel_ns_per_run": kernel.ns_per_run,
        "bpf_runs": kernel.runs,
        "samples": samples,
        "python_metrics": {k: v for k, v in after.items() if "python" in k},
    }


def metrics_sum(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(RECEIVED + "{") and "profiler=cpu" in k)


def summarize(ctx: Context, runs: list[dict[str, Any]]) -> ScenarioResult:
    result = ScenarioResult("python", "Python host: cost per Python sample and steady CPU", __doc__ or "")
    rows = []
    for hz in FREQUENCIES:
        for condition in CONDITIONS:
            mine = [r for r in runs if r["hz"] == hz and r["condition"] == condition]
            rows.append(
                (
                    f"{hz} Hz",
                    condition,
                    Spread.of(r["kernel_ns_per_run"] for r in mine).show(0),
                    Spread.of(r["user_us_per_sample"] for r in mine).show(1),
                    Spread.of(r["cpu_percent"] for r in mine).show(3, "%"),
                    Spread.of(r["samples"] / r["window_s"] for r in mine).show(0),
                )
            )
        python = Spread.of(r["cpu_percent"] for r in runs if r["hz"] == hz and r["condition"] == "python")
        target = f"Python host, steady state at {hz} Hz, cpu profiler, {ctx.cpus} busy Python processes"
        result.checks.append(Check(f"{target}: <= {TARGET_CPU[hz]}% of one core", python.show(3, "%"),
                                   python.median <= TARGET_CPU[hz]))  # fmt: skip
    columns = (
        "frequency",
        "frames",
        "kernel: ns per sample (BPF program run)",
        "user: agent CPU per sample, µs",
        f"agent CPU, % of one core ({WINDOW_S:g} s window)",
        "CPU samples per second",
    )
    result.tables.append(Table(columns, tuple(rows)))
    result.notes.append(
        f"{ctx.reps} runs per frequency and condition; window {WINDOW_S:g} s starting {SETTLE_S:g} s after READY; "
        f"workload: {ctx.cpus} x `{PYTHON} tests/workloads/python/steady.py 0 -` (Steady.step, pure Python). "
        "The per-sample figures divide all of the agent's CPU in the window (reading, unwinding, naming, "
        "aggregating, the report thread) by the samples received in it. `native-only` sets python.enabled=false."
    )
    result.raw = {"runs": runs, "window_s": WINDOW_S, "settle_s": SETTLE_S}
    return result


def run(ctx: Context) -> ScenarioResult:
    if not os.access(PYTHON, os.X_OK):
        raise RuntimeError(f"{PYTHON} is not installed")
    busy = [subprocess.Popen([str(PYTHON), str(STEADY), "0", "-"], stdout=subprocess.DEVNULL) for _ in range(ctx.cpus)]
    runs = []
    try:
        with bpf_stats():
            for rep in range(ctx.reps):
                for hz in FREQUENCIES:
                    for condition in CONDITIONS:
                        logger.info("python: %d Hz, %s, run %d", hz, condition, rep + 1)
                        runs.append(one_run(ctx, [p.pid for p in busy], hz, condition, rep))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    return summarize(ctx, runs)
