"""Scenario 2, start-up: seconds and peak memory from launch to READY, on an otherwise idle host.

The agent is launched under `/usr/bin/time -v`; start-up ends when its log says `profiling started`
(the probes are attached and READY=1 has been sent). Peak RSS up to that moment is VmHWM from
/proc/PID/status, read as soon as the line appears; CPU seconds to READY come from /proc/PID/stat.
The phases come from the log's own timestamps: `until metrics server` covers interpreter start,
imports, preflight, config and sinks; `compile + load + attach` the BCC compilation of every
program, loading and attaching. Run with the defaults (the CPU profiler) and with every profiler.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

from bench.agent import start_agent
from bench.context import Context
from bench.procs import cpu_seconds
from bench.results import Check, ScenarioResult, Spread, Table

TARGET_READY_S = 5.0
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")


def log_phases(text: str, launched_unix: float) -> dict[str, float]:
    """Seconds from launch to the metrics server line and to READY, from the log's timestamps."""
    phases: dict[str, float] = {}
    for line in text.splitlines():
        match = LOG_TIME.match(line)
        if match is None:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = match.group(2)
        if message.startswith("metrics, /healthz") and "metrics" not in phases:
            phases["metrics"] = stamp - launched_unix
        elif message.startswith("profiling started"):
            phases["ready"] = stamp - launched_unix
    return phases


def one_run(ctx: Context, label: str, flags: list[str], rep: int) -> dict[str, Any]:
    launched_unix = time.time()
    agent = start_agent(ctx.directory("startup", f"{label}-{rep}"), *flags)
    try:
        ready_s = agent.wait_ready()
        cpu_s = cpu_seconds(agent.pid)
    finally:
        times = agent.stop()
    phases = log_phases(agent.log_text(), launched_unix)
    return {
        "label": label,
        "rep": rep,
        "ready_s": ready_s,
        "cpu_to_ready_s": cpu_s,
        "hwm_at_ready_mb": agent.hwm_at_ready_kib * 1024 / 1e6,
        "time_v_max_rss_mb": times.max_rss_kib * 1024 / 1e6,
        "until_metrics_s": phases.get("metrics", float("nan")),
        "compile_attach_s": phases.get("ready", float("nan")) - phases.get("metrics", float("nan")),
        "exit": times.exit_status,
    }


def run(ctx: Context) -> ScenarioResult:
    variants: list[tuple[str, list[str]]] = [("defaults (cpu)", [])]
    if ctx.profilers != ("cpu",):
        variants.append((",".join(ctx.profilers), ["--profilers", ",".join(ctx.profilers)]))
    runs = [one_run(ctx, label, flags, rep) for rep in range(ctx.reps) for label, flags in variants]
    result = ScenarioResult("startup", "Start-up to READY (idle host)", __doc__ or "")
    rows = []
    for label, _ in variants:
        mine = [r for r in runs if r["label"] == label]
        ready = Spread.of(r["ready_s"] for r in mine)
        rows.append(
            (
                label,
                ready.show(2),
                Spread.of(r["until_metrics_s"] for r in mine).show(2),
                Spread.of(r["compile_attach_s"] for r in mine).show(2),
                Spread.of(r["cpu_to_ready_s"] for r in mine).show(2),
                Spread.of(r["hwm_at_ready_mb"] for r in mine).show(1),
            )
        )
        target = f"start-up to READY <= {TARGET_READY_S:g} s ({label})"
        result.checks.append(Check(target, f"{ready.show(2)} s", ready.median <= TARGET_READY_S))
    columns = (
        "profilers",
        "launch to READY, s",
        "until metrics server, s",
        "compile + load + attach, s",
        "CPU to READY, s",
        "peak RSS to READY, MB",
    )
    result.tables.append(Table(columns, tuple(rows)))
    result.notes.append(f"{ctx.reps} runs each; the host otherwise idle (no busy loop).")
    result.raw = {"runs": runs}
    return result
