"""Scenario 5, accuracy: the tests' workloads with a known truth, profiled by the agent, against that truth.

`tests/workloads/cpu_split.c` (CPU seconds in hot_a and hot_b, 3:1), `offcpu_split.c` (seconds
blocked in wait_a and wait_b, 2:1) and `alloc_sites.c sites` (bytes allocated from alloc_big and
alloc_small, 3:1) each measure and print what they really did. The three start gated, the agent starts
with every registered profiler and `--pid` for each of them (so other processes on this host stay
out), and once it is READY the gates open together. After they exit the agent is stopped (SIGINT
flushes the partial interval) and its pprof files are read back. The error of a share is in
percentage points of the two functions' total; the error of a total is relative to the truth. The
agent runs at 99 Hz here: at the default 19 Hz a 15 s run yields ~570 CPU samples, whose sampling error
alone (one standard error ~1.8 points on a 3:1 split) would swamp a ±2-point target.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from bench.agent import start_agent
from bench.context import Context
from bench.results import Check, ScenarioResult, Spread, Table
from tests.support.profiles import ReadSample, read_all, samples_of

SECONDS = 15
FREQUENCY_HZ = 99
ALLOC_MB = 4096
NUMBER = re.compile(r"(\w+)=([0-9.]+)")


@dataclass(frozen=True, slots=True)
class Case:
    profiler: str
    workload: str
    first: str  # the function whose share is checked
    second: str
    value_index: int  # which pprof value holds the measure
    truth_scale: float  # truth units -> the profile's (seconds -> ns, bytes -> bytes)
    share_target: float  # points
    unit: str


CASES = (
    Case("cpu", "cpu_split", "hot_a", "hot_b", 1, 1e9, 2.0, "CPU ns"),
    Case("offcpu", "offcpu_split", "wait_a", "wait_b", 1, 1e9, 2.0, "blocked ns"),
    Case("alloc", "alloc_sites", "alloc_big", "alloc_small", 1, 1.0, 3.0, "bytes"),
)
TOTAL_TARGET = 0.05


def gated_argv(ctx: Context, case: Case) -> list[str]:
    binary = str(ctx.binaries[case.workload])
    if case.workload == "cpu_split":  # no gate of its own: a shell waits, then execs it under the same pid
        return ["/bin/sh", "-c", f'read line; exec "{binary}" {SECONDS} 2']
    if case.workload == "offcpu_split":
        return [binary, str(SECONDS), "2", "4000", "gate"]
    return [binary, "sites", str(ALLOC_MB), "wait"]


def start_gated(ctx: Context, case: Case) -> subprocess.Popen[str]:
    process = subprocess.Popen(gated_argv(ctx, case), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if case.workload == "alloc_sites":
        assert process.stdout is not None
        process.stdout.readline()  # "ready"
    return process


def weight(samples: list[ReadSample], function: str, index: int) -> float:
    return float(sum(s.values[index] for s in samples if function in s.functions))


def compare(case: Case, samples: list[ReadSample], output: str) -> dict[str, Any]:
    truth = {name: float(value) for name, value in NUMBER.findall(output)}
    a, b = weight(samples, case.first, case.value_index), weight(samples, case.second, case.value_index)
    true_a, true_b = truth[case.first] * case.truth_scale, truth[case.second] * case.truth_scale
    measured = a / (a + b) if a + b else math.nan
    expected = true_a / (true_a + true_b)
    return {
        "profiler": case.profiler,
        "truth": truth,
        "measured": {case.first: a, case.second: b},
        "share_measured": measured,
        "share_truth": expected,
        "share_error_points": 100 * (measured - expected),
        "total_error": (a + b) / (true_a + true_b) - 1,
        "samples": len(samples),
        "events": sum(s.values[0] for s in samples),
    }


def one_run(ctx: Context, rep: int) -> list[dict[str, Any]]:
    cases = [case for case in CASES if case.profiler in ctx.profilers and case.workload in ctx.binaries]
    workloads = [start_gated(ctx, case) for case in cases]
    pids = [arg for process in workloads for arg in ("--pid", str(process.pid))]
    flags = ["--profilers", ",".join(c.profiler for c in cases), "--frequency", str(FREQUENCY_HZ), *pids]
    agent = start_agent(ctx.directory("accuracy", str(rep)), *flags)
    try:
        agent.wait_ready()
        for process in workloads:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=300)[0] for process in workloads]
        time.sleep(0.5)
    finally:
        for process in workloads:
            process.kill()
        agent.stop()
    problem = last_error(agent.log_text())
    return [
        compare(case, samples_of(read_all(agent.profiles, prefix=case.profiler), process.pid), output)
        | {"rep": rep, "agent_error": problem}
        for case, process, output in zip(cases, workloads, outputs, strict=True)
    ]


def last_error(log: str) -> str:
    """The last ERROR line of the agent's log with the exception that followed it, or ""."""
    lines = log.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if " ERROR " in lines[i]:
            exception = next((line for line in lines[i + 1 :] if line and not line.startswith(" ")), "")
            return f"{lines[i].split(' ERROR ', 1)[1]} {exception}".strip()
    return ""


def run(ctx: Context) -> ScenarioResult:
    runs = [r for rep in range(ctx.reps) for r in one_run(ctx, rep)]
    result = ScenarioResult("accuracy", "Accuracy against the workloads' own truth", __doc__ or "")
    rows = []
    for case in CASES:
        mine = [r for r in runs if r["profiler"] == case.profiler]
        if not mine:
            rows.append((case.profiler, case.workload, "not registered", "", "", "", ""))
            continue
        share = Spread.of(r["share_error_points"] for r in mine)
        total = Spread.of(100 * r["total_error"] for r in mine)
        truth = Spread.of(100 * r["share_truth"] for r in mine)
        measured = Spread.of(100 * r["share_measured"] for r in mine)
        worst = max(abs(r["share_error_points"]) for r in mine)
        problems = sorted({r["agent_error"] for r in mine if r["agent_error"] and not r["events"]})
        note = f"no samples; the agent logged: {problems[0]}" if problems else ""
        rows.append(
            (
                case.profiler,
                f"{case.workload}: {case.first} share",
                truth.show(1, "%"),
                measured.show(1, "%"),
                share.show(2),
                total.show(1, "%"),
                Spread.of(r["events"] for r in mine).show(0),
            )
        )
        result.checks.append(
            Check(
                f"{case.profiler} share within ±{case.share_target:g} points",
                f"{share.show(2)} points (worst {worst:.2f})",
                abs(share.median) <= case.share_target,
                note,
            )
        )
        result.checks.append(
            Check(
                f"{case.profiler} total within ±{100 * TOTAL_TARGET:g}%",
                f"{total.show(1, '%')}",
                abs(total.median) <= 100 * TOTAL_TARGET,
                note,
            )
        )
    columns = ("profiler", "measure", "truth", "profile", "share error, points", "total error", "events or allocations")
    result.tables.append(Table(columns, tuple(rows)))
    result.notes.append(
        f"{ctx.reps} runs; {SECONDS} s CPU and off-CPU workloads with 2 threads; {ALLOC_MB} MB allocated; "
        f"agent at {FREQUENCY_HZ} Hz with the default interval, sampling distance and off-CPU minimum."
    )
    result.raw = {"runs": runs}
    return result
