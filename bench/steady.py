"""Scenario 1, steady-state cost: the agent's CPU and memory with every CPU busy, beside BCC's `profile`.

A C busy loop (`bench/workloads/busy.c`, no allocation) keeps every CPU busy. For each frequency
`profile-bpfcc -F <hz>` starts, then, once it is attached, the agent (every registered profiler,
exporting OTLP to `bench.receiver` on 127.0.0.1); from the agent's READY a settle period passes (its first
intervals, which load the tables of every library they meet, are shown on their own), then the CPU
seconds each used (utime + stime of all its threads, /proc/PID/stat) are read over the window and
divided by its length, and RSS is sampled every 0.5 s (psutil). Both run under `/usr/bin/time -v`.
Kernel-side cost (BPF programs run in the interrupted task's context) is not in these figures: it shows
up as target slowdown (scenario 3). The agent runs at its defaults, which unwind user stacks with DWARF
(`unwind.*=auto`: every event carries a copy of the user stack, unwound with the binaries' CFI). Then, in
each repetition, the frame-pointer condition for contrast: the agent alone (same busy load, no BCC beside
it) with `PROFILING_AGENT_UNWIND_{CPU,OFFCPU,ALLOC}=fp` (no stack copies, nothing to unwind).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench.agent import AgentRun, metric_sum, start_agent
from bench.build import BCC_PROFILE, PY_SPY
from bench.context import Context
from bench.procs import (
    MemorySampler,
    Timed,
    cpu_seconds,
    perf_event_fds,
    status_kib,
    thread_breakdown,
    thread_cpu_ns,
    wait_until,
)
from bench.receiver import start_receiver, stop_receiver
from bench.results import Check, ScenarioResult, Spread, Table, thread_rows

FREQUENCIES = (19, 99)
# The first intervals load the symbol and unwind tables of every library met (tens of ms each, some
# first met 20-30 s in): kept out of the window.
SETTLE_S = 30.0
WINDOW_S = 30.0
TARGET_CPU = {19: 0.5, 99: 1.0}  # percent of one core
TARGET_RSS_MB = 150.0
MB = 1e6
# The default unwinds with DWARF (unwind.*=auto); the fp condition, for contrast, copies no stacks.
CONDITIONS = ("default", "fp")
FP_ENV = {f"PROFILING_AGENT_UNWIND_{name.upper()}": "fp" for name in ("cpu", "offcpu", "alloc")}
UNWIND_SECONDS = "profiling_agent_unwind_seconds_total"


def start_bcc_profile(ctx: Context, hz: int, rep: int) -> Timed:
    directory = ctx.directory("steady", f"{hz}hz-{rep}")
    with open(directory / "profile-bpfcc.out", "w") as out:
        return Timed(
            [BCC_PROFILE, "-F", str(hz)],
            directory / "profile-bpfcc.time",
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED": "1"},
        )


def measure_window(pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """CPU % of one core and RSS of each process over WINDOW_S seconds, and the agent's CPU by thread."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    threads_before = thread_cpu_ns(pids["agent"])
    start = time.monotonic()
    with MemorySampler(pids) as sampler:
        time.sleep(WINDOW_S)
    seconds = time.monotonic() - start
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    threads = thread_breakdown(pids["agent"], threads_before, seconds, PY_SPY)
    return {"agent_threads": threads} | {
        name: {
            "cpu_s": after[name] - before[name],
            "window_s": seconds,
            "cpu_percent": 100 * (after[name] - before[name]) / seconds,
            "rss_max_mb": sampler.tracks[name].max_bytes / MB,
            "rss_last_mb": (sampler.tracks[name].samples or [0])[-1] / MB,
            "hwm_mb": status_kib(pid, "VmHWM") * 1024 / MB,
            "rss_anon_mb": status_kib(pid, "RssAnon") * 1024 / MB,
            "rss_file_mb": status_kib(pid, "RssFile") * 1024 / MB,
        }
        for name, pid in pids.items()
    }


def start_peer(ctx: Context, hz: int, rep: int) -> Timed:
    """BCC's tool, attached. It goes first: once it is attached its compiler has finished, so the agent
    does not spend its first interval symbolizing another process's LLVM (both still run side by side)."""
    bcc = start_bcc_profile(ctx, hz, rep)
    try:
        wait_until(lambda: perf_event_fds(bcc.pid) >= ctx.cpus, 120, "profile-bpfcc attaching")
    except BaseException:
        bcc.stop()
        raise
    return bcc


def one_run(ctx: Context, hz: int, rep: int, endpoint: str, condition: str = "default") -> dict[str, Any]:
    """One agent run; the default condition beside BCC's profile, the fp one alone (its peer is the
    default condition's agent, under the same busy load)."""
    directory = ctx.directory("steady", f"{hz}hz-{rep}" + ("" if condition == "default" else f"-{condition}"))
    flags = ["--profilers", ",".join(ctx.profilers), "--frequency", str(hz)]
    bcc = start_peer(ctx, hz, rep) if condition == "default" else None
    env = FP_ENV if condition == "fp" else None
    agent = start_agent(directory / "agent", *flags, "--otlp-endpoint", endpoint, "--otlp-insecure", env=env)
    try:
        agent.wait_ready()
        ready_cpu = cpu_seconds(agent.pid)
        time.sleep(max(0.0, SETTLE_S - (time.monotonic() - agent.timed.launched - agent.ready_s)))
        warmup = warmup_cost(agent, ready_cpu)
        unwind_before = metric_sum(agent.metrics(), UNWIND_SECONDS) if condition == "default" else 0.0
        window = measure_window({"agent": agent.pid} | ({"bcc": bcc.pid} if bcc is not None else {}))
        metrics = agent.metrics()
        bcc_before_exit = cpu_seconds(bcc.pid) if bcc is not None else 0.0
    finally:
        agent_time = agent.stop()
        bcc_time = bcc.stop() if bcc is not None else None
    record: dict[str, Any] = {
        "hz": hz,
        "rep": rep,
        "condition": condition,
        "agent": window["agent"] | {"time_v_max_rss_mb": agent_time.max_rss_kib * 1024 / MB} | warmup,
        "agent_threads": window["agent_threads"],
        "agent_ready_s": agent.ready_s,
        "agent_exit": agent_time.exit_status,
    }
    if condition == "default":
        unwind_s = metric_sum(metrics, UNWIND_SECONDS) - unwind_before
        record["unwind_cpu_percent"] = 100 * unwind_s / window["agent"]["window_s"]
        record["unwind_stacks"] = {
            outcome: metric_sum(metrics, "profiling_agent_unwind_stacks_total", outcome=outcome)
            for outcome in ("complete", "truncated", "no_mappings")
        }
    if bcc_time is not None:
        record["bcc"] = window["bcc"] | {
            "time_v_max_rss_mb": bcc_time.max_rss_kib * 1024 / MB,
            "exit_cpu_s": bcc_time.user_s + bcc_time.system_s - bcc_before_exit,
        }
    return record | agent_counters(ctx, metrics)


def agent_counters(ctx: Context, metrics: dict[str, float]) -> dict[str, Any]:
    return {
        "events_received": {
            name: metric_sum(metrics, "profiling_agent_probe_events_received_total", profiler=name)
            for name in ctx.profilers
        },
        "events_lost": metric_sum(metrics, "profiling_agent_probe_events_lost_total"),
        "otlp_requests_ok": metric_sum(metrics, "profiling_agent_export_otlp_requests_total", outcome="success"),
        "otlp_requests": metric_sum(metrics, "profiling_agent_export_otlp_requests_total"),
        "elf_cache_misses": metric_sum(metrics, "profiling_agent_symbolize_cache_misses_total"),
        "processes_captured": metric_sum(metrics, "profiling_agent_symbolize_processes_total", event="captured"),
    }


def warmup_cost(agent: AgentRun, ready_cpu: float) -> dict[str, float]:
    """CPU % of one core from READY to now: the first interval, with the caches cold."""
    seconds = time.monotonic() - agent.timed.launched - agent.ready_s
    return {"warmup_s": seconds, "warmup_cpu_percent": 100 * (cpu_seconds(agent.pid) - ready_cpu) / seconds}


def cost_rows(ctx: Context, runs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    agent = f"agent ({','.join(ctx.profilers)}), OTLP"
    tools = (
        ("default", "agent", agent),
        ("default", "bcc", "BCC profile-bpfcc"),
        ("fp", "agent", f"{agent}, unwind=fp (frame pointers only)"),
    )
    rows: list[tuple[str, ...]] = []
    for hz in FREQUENCIES:
        for condition, tool, label in tools:
            mine = [r for r in runs if r["hz"] == hz and r["condition"] == condition and tool in r]
            if not mine:
                continue
            warmup = Spread.of(r[tool].get("warmup_cpu_percent", float("nan")) for r in mine)
            rows.append(
                (
                    f"{hz} Hz",
                    label,
                    Spread.of(r[tool]["cpu_percent"] for r in mine).show(3, "%"),
                    warmup.show(2, "%") if warmup.runs else "",
                    Spread.of(r[tool]["rss_max_mb"] for r in mine).show(1),
                    Spread.of(r[tool]["rss_anon_mb"] for r in mine).show(1),
                    Spread.of(r[tool]["rss_file_mb"] for r in mine).show(1),
                    Spread.of(r[tool]["time_v_max_rss_mb"] for r in mine).show(1),
                )
            )
    return rows


def thread_table(runs: list[dict[str, Any]]) -> Table:
    """% of one core per agent thread, a column per frequency and condition."""
    keys = [
        (c, hz) for c in CONDITIONS for hz in FREQUENCIES if any((r["condition"], r["hz"]) == (c, hz) for r in runs)
    ]
    columns = [f"% of one core at {hz} Hz" + ("" if c == "default" else f", unwind={c}") for c, hz in keys]
    rows = thread_rows([[r["agent_threads"] for r in runs if (r["condition"], r["hz"]) == key] for key in keys])
    return Table(("agent thread", *columns), rows)


def event_rates(ctx: Context, runs: list[dict[str, Any]]) -> str:
    parts = []
    for hz in FREQUENCIES:
        mine = [r for r in runs if r["hz"] == hz]
        rates = []
        for name in ctx.profilers:
            seconds = [r["agent"]["window_s"] + r["agent"]["warmup_s"] for r in mine]
            rate = Spread.of(r["events_received"][name] / s for r, s in zip(mine, seconds, strict=True))
            rates.append(f"{name} {rate.median:.0f}")
        parts.append(f"{hz} Hz: " + ", ".join(rates))
    return "; ".join(parts)


def target_checks(ctx: Context, runs: list[dict[str, Any]], condition: str) -> list[Check]:
    """The issue's CPU and memory targets, for the agent's runs in one condition."""
    mine = [r for r in runs if r["condition"] == condition]
    if not mine:
        return []
    prefix = "" if condition == "default" else "frame pointers only (unwind.cpu/offcpu/alloc=fp): "
    checks = []
    for hz in FREQUENCIES:
        cpu = Spread.of(r["agent"]["cpu_percent"] for r in mine if r["hz"] == hz)
        target = f"steady state at {hz} Hz, all profilers, {ctx.cpus} busy CPUs: <= {TARGET_CPU[hz]}% of one core"
        checks.append(Check(prefix + target, cpu.show(3, "%"), cpu.median <= TARGET_CPU[hz]))
    rss = Spread.of(r["agent"]["rss_max_mb"] for r in mine)
    peak = Spread.of(r["agent"]["time_v_max_rss_mb"] for r in mine)
    checks.append(
        Check(
            f"{prefix}resident memory <= {TARGET_RSS_MB:g} MB (steady state)",
            f"{rss.show(1)} MB",
            rss.high <= TARGET_RSS_MB,
            f"peak over the whole run, start-up included (time -v): {peak.show(1)} MB",
        )
    )
    return checks


def unwind_note(ctx: Context, runs: list[dict[str, Any]]) -> str:
    mine = [r for r in runs if r["condition"] == "default"]
    shares = []
    for hz in FREQUENCIES:
        unwind = Spread.of(r["unwind_cpu_percent"] for r in mine if r["hz"] == hz)
        stacks = [r["unwind_stacks"] for r in mine if r["hz"] == hz]
        complete = Spread.of(100 * s["complete"] / max(1.0, sum(s.values())) for s in stacks)
        shares.append(f"{hz} Hz: {unwind.show(3, '%')} of one core, {complete.show(1, '%')} of stacks complete")
    settings = ", ".join(f"`{name}={value}`" for name, value in FP_ENV.items())
    fp = [r for r in runs if r["condition"] == "fp"]
    return (
        f"At the defaults every event carries a stack copy and is unwound. The unwind stage itself "
        f"(profiling_agent_unwind_seconds_total over the window; complete: ended at the outermost frame, "
        f"counted since start, over every process on the host): {'; '.join(shares)}. The frame-pointer "
        f"condition runs the agent alone (no BCC beside it; same busy load) with {settings}; events received "
        f"per second since READY there: {event_rates(ctx, fp)}."
    )


def _median(runs: list[dict[str, Any]], hz: int, condition: str, thread: str | None = None) -> float:
    """The median agent CPU (or one thread's) of one frequency and condition, % of one core."""
    mine = [r for r in runs if r["hz"] == hz and r["condition"] == condition]
    values = (r["agent_threads"].get(thread, 0.0) if thread else r["agent"]["cpu_percent"] for r in mine)
    return Spread.of(values).median


def remaining_note(runs: list[dict[str, Any]]) -> str:
    """What DWARF unwinding adds over frame pointers, by thread: where a missed target's gap comes from."""
    parts = []
    for hz in FREQUENCIES:
        extra = {t: _median(runs, hz, "default", t) - _median(runs, hz, "fp", t) for t in ("perf-reader", "pipeline")}
        detail = ", ".join(f"{thread} {value:+.3f}" for thread, value in extra.items())
        total = _median(runs, hz, "default") - _median(runs, hz, "fp")
        parts.append(f"{hz} Hz: {total:+.3f} points ({detail})")
    return (
        "What unwinding costs over frame pointers (medians, default minus unwind=fp, % of one core): "
        + "; ".join(parts)
        + ". Both are on the reader: it unwinds each stack copy as it decodes the record, in place in the "
        "ring (see the unwind scenario for the cost per sample); the pipeline's share is what is left "
        "of handling an event."
    )


def summarize(ctx: Context, runs: list[dict[str, Any]], receiver: dict[str, Any]) -> ScenarioResult:
    result = ScenarioResult("steady", "Steady-state agent cost (all CPUs busy)", __doc__ or "")
    result.checks += target_checks(ctx, runs, "default")
    columns = (
        "frequency",
        "tool",
        f"CPU, % of one core ({WINDOW_S:g} s window)",
        f"first {SETTLE_S:g} s after READY",
        "RSS in window, MB (max)",
        "of which anonymous, MB",
        "of which file-backed, MB",
        "peak RSS, MB (time -v)",
    )
    result.tables.append(Table(columns, tuple(cost_rows(ctx, runs))))
    result.tables.append(thread_table(runs))
    default = [r for r in runs if r["condition"] == "default"]
    result.notes.append(
        f"{ctx.reps} runs per frequency; window {WINDOW_S:g} s starting {SETTLE_S:g} s after READY; events the "
        f"agent received per second since READY: {event_rates(ctx, default)}; the local receiver accepted "
        f"{receiver.get('requests', 0)} OTLP requests in all. The busy loop alone puts the load average near "
        f"{ctx.cpus}."
    )
    if len(default) < len(runs):
        result.notes.append(unwind_note(ctx, runs))
        result.notes.append(remaining_note(runs))
    exit_cpu = Spread.of(r["bcc"]["exit_cpu_s"] for r in default)
    result.notes.append(
        "profile-bpfcc counts stacks in a kernel map and does no user-space work until it is stopped; reading, "
        f"symbolizing and printing them at exit then took {exit_cpu.show(2)} s of CPU (not in the window)."
    )
    result.raw = {"runs": runs, "receiver": receiver, "window_s": WINDOW_S, "settle_s": SETTLE_S}
    return result


def run(ctx: Context) -> ScenarioResult:
    busy = subprocess.Popen([str(ctx.binaries["busy"]), "0", str(ctx.cpus)])
    receiver, endpoint = start_receiver(ctx.directory("steady") / "receiver.log")
    runs = []
    try:
        for rep in range(ctx.reps):
            for condition in CONDITIONS:
                for hz in FREQUENCIES:
                    runs.append(one_run(ctx, hz, rep, endpoint, condition))
    finally:
        busy.kill()
        busy.wait()
        stats = stop_receiver(receiver)
    return summarize(ctx, runs, stats)
