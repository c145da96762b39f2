"""Scenario: side by side with the OpenTelemetry eBPF profiler, on the same host, load and frequency.

The OTel eBPF profiler is the engine inside Parca Agent, Grafana Alloy and Datadog's host profiler.
Its standalone binary is built from the Go module proxy at a pinned version by
`bench/peers/build-otel-ebpf-profiler.sh` (into `build/`; its code is never committed). Both run with
CPU profiling only, at their defaults otherwise (theirs: every interpreter unwinder on; ours: Python
frames on, DWARF unwinding), and export OTLP over gRPC to a local receiver (`bench.receiver`, started
before each run: the peer dials it before it loads its BPF). Runs alternate, ours then theirs, then
theirs then ours, and so on, so that a drift of the host does not favour either. Hosts:
- `c`: every CPU busy with the C loop (`bench/workloads/busy.c`);
- `python`: every CPU busy with a Python process (`tests/workloads/python/steady.py` under
  `/usr/bin/python3.11`);
- `churn`: 500 idle processes (`sleep`) and 50 execs a second (`bench/workloads/exec_churn.py`).

Each run waits for the agent to be up (ours: `profiling started`; theirs: `Attached sched monitor`), a
settle period, then measures over a window:
- CPU: the process CPU-time clock (`clock_gettime` on the pid's clock: the scheduler's nanoseconds of
  every thread), in % of one core;
- RSS: the largest of psutil's readings every 0.5 s;
- kernel side: with `kernel.bpf_stats_enabled=1` (set for the scenario, restored after), each
  program's `run_time_ns` and `run_cnt` from /proc/PID/fdinfo: the perf-event programs' ns per run
  (per sample: a tail call runs inside its caller's run), and every program's time per second of
  window (exec and exit tracepoints too);
- samples delivered: the events the receiver got that are timestamped inside the window, per second
  (the run goes on for one reporting interval after the window, so that its last report arrives).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.agent import start_agent
from bench.bpfstats import bpf_stats, every_type, perf_events, prog_stats_by_type
from bench.build import PY_SPY, build_otel_profiler
from bench.context import Context
from bench.procs import MemorySampler, Timed, process_cpu_ns, thread_breakdown, thread_cpu_ns, wait_until
from bench.pyhost import PYTHON, STEADY
from bench.receiver import start_receiver, stop_receiver
from bench.results import Check, ScenarioResult, Spread, Table, thread_rows

logger = logging.getLogger(__name__)

# name -> (host, frequency). `--cases` picks some; the default is every one.
CASES = {
    "c-19": ("c", 19),
    "c-99": ("c", 99),
    "python-19": ("python", 19),
    "python-99": ("python", 99),
    "churn-19": ("churn", 19),
}
MIN_PAIRS = 5  # the ">= 5 alternating runs"
SETTLE_S = 15.0
WINDOW_S = 30.0
# One reporting interval and a second after the window, so that the window's events reach the
# receiver: ours reports every 10 s (interval_s), theirs every 5 s with up to 20% jitter.
FLUSH_S = {"ours": 11.0, "otel": 7.0}
AGENTS = ("ours", "otel")
OTEL_READY = "Attached sched monitor"
IDLE_PROCESSES = 500
EXECS_PER_S = 50.0
EXEC_CHURN = Path(__file__).resolve().parent / "workloads" / "exec_churn.py"
TARGET_RSS_MB = 80.0  # default profilers
TARGET_SPREAD_POINTS = 0.1
MB = 1e6


@dataclass(slots=True)
class Running:
    """An agent under measurement: its process (under `time -v`) and its log."""

    pid: int
    timed: Timed
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def host_load(ctx: Context, host: str) -> Iterator[None]:
    """The workload of one host, running for the duration."""
    processes: list[subprocess.Popen[Any]]
    if host == "c":
        processes = [subprocess.Popen([str(ctx.binaries["busy"]), "0", str(ctx.cpus)])]
    elif host == "python":
        if not os.access(PYTHON, os.X_OK):
            raise RuntimeError(f"{PYTHON} is not installed")
        processes = [
            subprocess.Popen([str(PYTHON), str(STEADY), "0", "-"], stdout=subprocess.DEVNULL) for _ in range(ctx.cpus)
        ]
    else:
        churn = subprocess.Popen(
            [sys.executable, str(EXEC_CHURN), str(IDLE_PROCESSES), str(EXECS_PER_S)], stdout=subprocess.PIPE, text=True
        )
        assert churn.stdout is not None
        if not churn.stdout.readline().startswith("ready"):
            raise RuntimeError("the churn workload did not start")
        processes = [churn]
    try:
        yield
    finally:
        for process in processes:
            if host == "churn":
                os.killpg(process.pid, signal.SIGKILL)  # the sleepers too (exec_churn.py's own group)
            else:
                process.kill()
            process.wait()


def start_ours(directory: Path, hz: int, endpoint: str) -> Running:
    flags = ("--profilers", "cpu", "--frequency", str(hz), "--otlp-endpoint", endpoint, "--otlp-insecure")
    agent = start_agent(directory, *flags)
    try:
        agent.wait_ready()
    except BaseException:
        agent.stop()
        raise
    return Running(agent.pid, agent.timed, agent.log)


def start_otel(directory: Path, hz: int, endpoint: str, binary: Path) -> Running:
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "otel.log"
    argv = [str(binary), "-collection-agent", endpoint, "-disable-tls", "-samples-per-second", str(hz)]
    with open(log, "wb") as out:
        timed = Timed(argv, directory / "otel.time", stdout=out, stderr=subprocess.STDOUT)
    running = Running(timed.pid, timed, log)

    def ready() -> bool:
        if not timed.alive():
            raise RuntimeError(f"the OTel eBPF profiler exited before it was up:\n{running.log_text()[-3000:]}")
        return OTEL_READY in running.log_text()

    try:
        wait_until(ready, 120, "OTel eBPF profiler start-up", interval=0.05)
    except BaseException:
        timed.stop()
        raise
    return running


def one_run(ctx: Context, case: str, agent: str, pair: int, binary: Path) -> dict[str, Any]:
    hz = CASES[case][1]
    directory = ctx.directory("versus", f"{case}-{pair}-{agent}")
    receiver, endpoint = start_receiver(directory / "receiver.log")
    try:
        running = (
            start_ours(directory, hz, endpoint) if agent == "ours" else start_otel(directory, hz, endpoint, binary)
        )
        try:
            time.sleep(SETTLE_S)
            begun, cpu, programs = time.time(), process_cpu_ns(running.pid), prog_stats_by_type(running.pid)
            threads = thread_cpu_ns(running.pid)
            with MemorySampler({"agent": running.pid}) as sampler:
                time.sleep(WINDOW_S)
            ended = time.time()
            cpu = process_cpu_ns(running.pid) - cpu
            threads_percent = thread_breakdown(running.pid, threads, ended - begun, PY_SPY)
            after = prog_stats_by_type(running.pid)
            kernel = perf_events(after) - perf_events(programs)
            every = every_type(after) - every_type(programs)
            time.sleep(FLUSH_S[agent])
        finally:
            running.timed.stop()
    finally:
        totals = stop_receiver(receiver)
    seconds = ended - begun
    # Whole seconds inside the window: the receiver counts events by the second of their timestamp.
    first, last = math.ceil(begun), math.floor(ended)
    events = sum(n for second, n in totals.get("events_by_second", {}).items() if first <= int(second) < last)
    delivered = events / (last - first) if last > first else math.nan
    return {
        "case": case,
        "agent": agent,
        "pair": pair,
        "window_s": seconds,
        "cpu_percent": 100 * cpu / 1e9 / seconds,
        "rss_max_mb": sampler.tracks["agent"].max_bytes / MB,
        "kernel_ns_per_sample": kernel.ns_per_run,
        "kernel_samples_per_s": kernel.runs / seconds,
        "kernel_all_ms_per_s": every.run_ns / 1e6 / seconds,
        "delivered_per_s": delivered,
        "user_us_per_delivered": 1e6 * cpu / 1e9 / (delivered * seconds) if delivered > 0 else math.nan,
        "requests": totals.get("requests", 0),
        "threads": threads_percent,
    }


def run_case(ctx: Context, case: str, binary: Path) -> list[dict[str, Any]]:
    host, _ = CASES[case]
    runs = []
    with host_load(ctx, host):
        for pair in range(max(MIN_PAIRS, ctx.reps)):
            for agent in AGENTS if pair % 2 == 0 else AGENTS[::-1]:
                logger.info("versus: %s, pair %d, %s", case, pair + 1, agent)
                runs.append(one_run(ctx, case, agent, pair, binary))
    return runs


METRICS = (
    ("CPU, % of one core (process clock)", "cpu_percent", 3),
    ("RSS in window, MB (max)", "rss_max_mb", 1),
    ("kernel: ns per sample (perf-event programs)", "kernel_ns_per_sample", 0),
    ("kernel: BPF ms per second, every program", "kernel_all_ms_per_s", 2),
    ("samples delivered per second", "delivered_per_s", 1),
    ("agent CPU per delivered sample, µs", "user_us_per_delivered", 1),
)


def spread(runs: list[dict[str, Any]], case: str, agent: str, key: str) -> Spread:
    return Spread.of(r[key] for r in runs if r["case"] == case and r["agent"] == agent)


def ratio(ours: Spread, theirs: Spread) -> str:
    if ours.runs == 0 or theirs.runs == 0 or theirs.median == 0:
        return "n/a"
    return f"{ours.median / theirs.median:.2f}x"


def case_table(runs: list[dict[str, Any]], case: str) -> Table:
    host, hz = CASES[case]
    rows = []
    for label, key, digits in METRICS:
        ours, theirs = spread(runs, case, "ours", key), spread(runs, case, "otel", key)
        rows.append((label, ours.show(digits), theirs.show(digits), ratio(ours, theirs)))
    title = f"{host} host, {hz} Hz"
    return Table((title, "this agent", "OTel eBPF profiler", "ours / theirs"), tuple(rows))


def thread_table(runs: list[dict[str, Any]], cases: list[str]) -> Table:
    """Our CPU by thread (medians per case): where the time goes. The OTel profiler's Go threads all
    carry its comm, so only its total is shown."""
    rows = thread_rows([[r["threads"] for r in runs if r["case"] == c and r["agent"] == "ours"] for c in cases])
    headers = tuple(f"{CASES[c][0]} host, {CASES[c][1]} Hz" for c in cases)
    return Table(("our thread, % of one core", *headers), rows)


def checks(ctx: Context, runs: list[dict[str, Any]], cases: list[str]) -> list[Check]:
    found = []
    for case in cases:
        host, hz = CASES[case]
        where = f"{host} host, {hz} Hz"
        if host != "churn":
            ours, theirs = spread(runs, case, "ours", "cpu_percent"), spread(runs, case, "otel", "cpu_percent")
            found.append(
                Check(
                    f"{where}: our median CPU <= the OTel profiler's",
                    f"{ours.show(3, '%')} vs {theirs.show(3, '%')} ({ratio(ours, theirs)})",
                    ours.median <= theirs.median,
                    f"{ours.runs} and {theirs.runs} alternating runs",
                )
            )
            width = ours.high - ours.low
            found.append(
                Check(
                    f"{where}: spread of our CPU over runs <= {TARGET_SPREAD_POINTS} points",
                    f"{width:.3f} points",
                    width <= TARGET_SPREAD_POINTS,
                )
            )
            ours, theirs = (
                spread(runs, case, "ours", "kernel_ns_per_sample"),
                spread(runs, case, "otel", "kernel_ns_per_sample"),
            )
            found.append(
                Check(
                    f"{where}: kernel time per sample <= the OTel profiler's",
                    f"{ours.show(0)} ns vs {theirs.show(0)} ns ({ratio(ours, theirs)})",
                    ours.median <= theirs.median,
                )
            )
    rss = Spread.of(r["rss_max_mb"] for r in runs if r["agent"] == "ours")
    theirs = Spread.of(r["rss_max_mb"] for r in runs if r["agent"] == "otel")
    found.append(
        Check(
            f"steady RSS <= {TARGET_RSS_MB:g} MB, default profilers (every host above)",
            f"{rss.show(1)} MB",
            rss.high <= TARGET_RSS_MB,
            f"the OTel profiler: {theirs.show(1)} MB",
        )
    )
    return found


def summarize(ctx: Context, runs: list[dict[str, Any]], cases: list[str], seconds: dict[str, float]) -> ScenarioResult:
    result = ScenarioResult("versus", "Side by side with the OpenTelemetry eBPF profiler", __doc__ or "")
    result.checks += checks(ctx, runs, cases)
    result.tables += [case_table(runs, case) for case in cases]
    result.tables.append(thread_table(runs, cases))
    pairs = max(MIN_PAIRS, ctx.reps)
    result.notes.append(
        f"{pairs} alternating pairs of runs per host and frequency; window {WINDOW_S:g} s starting {SETTLE_S:g} s "
        f"after each agent was up; medians (min-max); the ratio is of the medians. Cases run: "
        + ", ".join(f"{case} ({seconds[case]:.0f} s)" for case in cases)
        + ". Peer: go.opentelemetry.io/ebpf-profiler v0.0.202547, standalone, built by "
        "bench/peers/build-otel-ebpf-profiler.sh."
    )
    result.raw = {"runs": runs, "window_s": WINDOW_S, "settle_s": SETTLE_S, "cases": cases}
    return result


def run(ctx: Context) -> ScenarioResult:
    cases = [case for case in CASES if not ctx.cases or case in ctx.cases]
    binary = build_otel_profiler()
    runs: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    with bpf_stats():
        for case in cases:
            begun = time.monotonic()
            runs += run_case(ctx, case, binary)
            seconds[case] = time.monotonic() - begun
    return summarize(ctx, runs, cases, seconds)
