"""Scenario 3, target slowdown: how much slower a workload runs while it is being profiled.

Two C workloads that print `ready`, wait for a line on stdin, then time their own loop with
CLOCK_MONOTONIC (so tool start-up is never counted): `malloc_heavy` (malloc/free of 16 B-64 KiB, one
allocation per iteration) and `ctxswitch` (two threads ping-ponging a byte through pipes: every round
trip blocks and wakes each thread once). Each runs with no profiler; with the kernel's floor, a BCC
program that only counts (`bench.floor`: uprobes on the allocator entry points the agent hooks, or the
`sched:sched_switch` tracepoint the off-CPU profiler uses on this kernel); with the agent
(`--profilers alloc --pid PID` or `--profilers offcpu --pid PID`); and with BCC's `memleak -p PID` or
`offcputime -p PID`. Every tool attaches to the waiting workload before it is released. The conditions
are interleaved run by run, and every figure is a median over the runs.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.agent import start_agent
from bench.build import BCC_MEMLEAK, BCC_OFFCPUTIME
from bench.context import Context
from bench.procs import Timed, perf_event_fds, wait_until
from bench.results import Check, ScenarioResult, Spread, Table

MALLOC_OPS = 1_000_000
SWITCH_ROUNDS = 200_000
TARGET_VS_FLOOR = 1.15
BCC_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED": "1"}
ELAPSED = re.compile(r"elapsed=([0-9.]+)")


class ToolFailed(RuntimeError):
    """The tool could not attach on this host; the message says why, in the tool's own words."""


class Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> object: ...


Starter = Callable[[Context, int, Path], Stoppable | None]


@dataclass(frozen=True, slots=True)
class Tool:
    key: str
    label: str
    start: Starter


def no_tool(ctx: Context, pid: int, directory: Path) -> None:
    return None


def _output_of(timed: Timed) -> str:
    return (timed.time_file.parent / f"{timed.time_file.stem}.out").read_text(errors="replace")


def _launch(argv: list[str], directory: Path, name: str) -> Timed:
    with open(directory / f"{name}.out", "w") as out:
        return Timed(argv, directory / f"{name}.time", stdout=out, stderr=subprocess.STDOUT, env=BCC_ENV)


def _fail(timed: Timed, name: str) -> ToolFailed:
    lines = [line for line in _output_of(timed).splitlines() if line.strip()]
    return ToolFailed(f"{name} exited with status {timed.popen.returncode}: {lines[-1] if lines else 'no output'}")


def floor(kind: str) -> Starter:
    def start(ctx: Context, pid: int, directory: Path) -> Timed:
        timed = _launch([sys.executable, "-m", "bench.floor", kind, "--pid", str(pid)], directory, f"floor-{kind}")
        wait_until(lambda: "ready" in _output_of(timed) or not timed.alive(), 120, "the floor probe attaching")
        if not timed.alive():
            raise _fail(timed, f"bench.floor {kind}")
        return timed

    return start


def agent(profiler: str) -> Starter:
    def start(ctx: Context, pid: int, directory: Path) -> Stoppable:
        run = start_agent(directory / f"agent-{profiler}", "--profilers", profiler, "--pid", str(pid))
        run.wait_ready()
        return run

    return start


def _stable_fds(timed: Timed, minimum: int) -> bool:
    """True once the tool holds at least `minimum` perf events and opened none for 0.5 s."""
    first = perf_event_fds(timed.pid)
    if first < minimum:
        return False
    time.sleep(0.5)
    return perf_event_fds(timed.pid) == first


def bcc_tool(path: str, minimum_probes: int) -> Starter:
    name = Path(path).name

    def start(ctx: Context, pid: int, directory: Path) -> Timed:
        timed = _launch([path, "-p", str(pid)], directory, name)
        wait_until(lambda: not timed.alive() or _stable_fds(timed, minimum_probes), 120, f"{name} attaching")
        if not timed.alive():
            raise _fail(timed, name)
        return timed

    return start


def run_once(ctx: Context, argv: list[str], tool: Tool, directory: Path) -> dict[str, Any]:
    """The workload released once `tool` is attached to it; its own timing, or why the tool failed."""
    directory.mkdir(parents=True, exist_ok=True)
    workload = Timed(argv, directory / "workload.time", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert workload.popen.stdin is not None and workload.popen.stdout is not None
    if workload.popen.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{argv[0]} did not start")
    try:
        handle = tool.start(ctx, workload.pid, directory)
    except ToolFailed as e:
        workload.send(signal.SIGKILL)
        workload.popen.wait()
        return {"tool": tool.key, "failed": str(e)}
    try:
        workload.popen.stdin.write("go\n")
        workload.popen.stdin.flush()
        line = workload.popen.stdout.readline()
        times = workload.wait(600)
    finally:
        if handle is not None:
            handle.stop()
    match = ELAPSED.search(line)
    if match is None:
        raise RuntimeError(f"{argv[0]} printed no timing: {line!r}")
    return {"tool": tool.key, "elapsed_s": float(match.group(1)), "user_s": times.user_s, "system_s": times.system_s}


@dataclass(frozen=True, slots=True)
class Workload:
    key: str
    label: str
    argv: list[str]
    operations: int
    unit: str
    tools: tuple[Tool, ...]


def workloads(ctx: Context) -> list[Workload]:
    none = Tool("none", "no profiler", no_tool)
    malloc_tools = [none, Tool("floor", "bare uprobes, count only (bench.floor)", floor("uprobe"))]
    if "alloc" in ctx.profilers:
        malloc_tools.append(Tool("agent", "agent --profilers alloc --pid", agent("alloc")))
    malloc_tools.append(Tool("bcc", "BCC memleak-bpfcc -p", bcc_tool(BCC_MEMLEAK, 16)))
    switch_tools = [none, Tool("floor", "bare sched_switch tracepoint, count only", floor("tracepoint"))]
    if "offcpu" in ctx.profilers:
        switch_tools.append(Tool("agent", "agent --profilers offcpu --pid", agent("offcpu")))
    switch_tools.append(Tool("bcc", "BCC offcputime-bpfcc -p", bcc_tool(BCC_OFFCPUTIME, 1)))
    return [
        Workload(
            "malloc",
            f"malloc_heavy, {MALLOC_OPS:,} allocations",
            [str(ctx.binaries["malloc_heavy"]), str(MALLOC_OPS)],
            MALLOC_OPS,
            "allocation",
            tuple(malloc_tools),
        ),
        Workload(
            "switch",
            f"ctxswitch, {SWITCH_ROUNDS:,} pipe round trips",
            [str(ctx.binaries["ctxswitch"]), str(SWITCH_ROUNDS)],
            SWITCH_ROUNDS,
            "round trip",
            tuple(switch_tools),
        ),
    ]


def measure(ctx: Context, work: list[Workload]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    failed: set[tuple[str, str]] = set()
    for rep in range(ctx.reps):
        for workload in work:
            for tool in workload.tools:
                if (workload.key, tool.key) in failed:
                    continue
                directory = ctx.directory("slowdown", f"{workload.key}-{tool.key}-{rep}")
                run = run_once(ctx, workload.argv, tool, directory) | {"workload": workload.key, "rep": rep}
                if "failed" in run:
                    failed.add((workload.key, tool.key))
                runs.append(run)
    return runs


def _of(runs: list[dict[str, Any]], workload: str, tool: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["workload"] == workload and r["tool"] == tool]


def _elapsed(runs: list[dict[str, Any]], workload: str, tool: str) -> Spread:
    return Spread.of(r["elapsed_s"] for r in _of(runs, workload, tool) if "elapsed_s" in r)


def table(workload: Workload, runs: list[dict[str, Any]]) -> Table:
    base = _elapsed(runs, workload.key, "none").median
    floor_time = _elapsed(runs, workload.key, "floor").median
    rows = []
    for tool in workload.tools:
        failure = next((r["failed"] for r in _of(runs, workload.key, tool.key) if "failed" in r), "")
        if failure:
            rows.append((tool.label, "does not run here", "", "", "", failure))
            continue
        elapsed = _elapsed(runs, workload.key, tool.key)
        added = 1e6 * (elapsed.median - base) / workload.operations
        rows.append(
            (
                tool.label,
                elapsed.show(3),
                f"{elapsed.median / base:.2f}x",
                f"{elapsed.median / floor_time:.2f}x",
                f"{added:.2f}",
                "",
            )
        )
    columns = ("condition", "time, s", "vs no profiler", "vs floor", f"µs added per {workload.unit}", "note")
    return Table(columns, tuple(rows))


def checks(runs: list[dict[str, Any]]) -> list[Check]:
    floor_time = _elapsed(runs, "malloc", "floor")
    mine = _elapsed(runs, "malloc", "agent")
    memleak = _elapsed(runs, "malloc", "bcc")
    ratio = mine.median / floor_time.median if mine.runs and floor_time.runs else float("nan")
    found = [
        Check(
            f"malloc-heavy with alloc profiling <= {TARGET_VS_FLOOR}x the bare-uprobe floor",
            f"{ratio:.3f}x ({mine.show(3)} s vs {floor_time.show(3)} s)",
            ratio <= TARGET_VS_FLOOR if mine.runs else None,
        ),
        Check(
            "malloc-heavy with alloc profiling faster than BCC memleak",
            f"{mine.show(3)} s vs {memleak.show(3)} s",
            mine.median < memleak.median if mine.runs and memleak.runs else None,
        ),
    ]
    return found


def run(ctx: Context) -> ScenarioResult:
    work = workloads(ctx)
    runs = measure(ctx, work)
    result = ScenarioResult("slowdown", "Target slowdown", __doc__ or "")
    result.tables.extend(table(workload, runs) for workload in work)
    result.checks.extend(checks(runs))
    result.notes.append(
        f"{ctx.reps} runs per condition, interleaved; first table {work[0].label}, second {work[1].label}."
    )
    result.raw = {"runs": runs, "malloc_ops": MALLOC_OPS, "switch_rounds": SWITCH_ROUNDS}
    return result
