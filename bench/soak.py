"""`make soak` (`python -m bench.soak`): the agent for ten minutes with every profiler, on a mixed load,
shipping OTLP to the real OpenTelemetry Collector with files on; writes docs/soak.md.

The load: a C burner on one core (`busy`), a Python process that allocates, computes and sleeps
(`bench/workloads/soak_python.py`), and a slow churn of short execs beside a few idle processes
(`exec_churn.py`). The agent runs as a user runs it, with `include_pprof` on so that each OTLP profile
carries the very pprof bytes the file sink wrote: an interval counts as delivered when the collector's
output holds its bytes, so written and delivered are compared exactly, not by count.

What it reports: the agent's RSS sampled every few seconds (start, middle, end, the slope of a least
squares line after the warm-up, and the largest step between two samples), its CPU over the run, and the
written profiles against the delivered ones. Not in CI: ten minutes is the point.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.agent import AgentRun, metric_sum, start_agent
from bench.build import REPO, build_workloads
from bench.procs import cpu_seconds, rss_bytes
from tests.support.otelcol import Collector, start_collector, stop_collector
from tests.support.otelcol import build as build_collector

PROFILERS = "cpu,offcpu,alloc"
WORKLOADS = REPO / "bench" / "workloads"
PYTHON = "/usr/bin/python3"
SAMPLE_EVERY_S = 5.0
WARM_UP_S = 120.0  # caches fill during the first intervals: the slope is fitted after this
SLOPE_BOUND_MB = 1.0  # per 10 minutes (#16)
MB = 1 << 20


@dataclass(frozen=True, slots=True)
class Soak:
    seconds: float
    rss: list[tuple[float, int]]  # (seconds since ready, bytes)
    cpu_s: float
    written: Counter[str]  # sha256 of each pprof the file sink wrote -> how many files had it
    delivered: Counter[str]  # sha256 of each pprof the collector received -> how many times
    metrics: dict[str, float]
    log_warnings: int


def start_load(binaries: dict[str, Path], directory: Path) -> list[subprocess.Popen[bytes]]:
    """The mixed load, each in its own process group so that stopping it stops its children too (the
    churn makes its own group: a session leader could not)."""
    directory.mkdir(parents=True, exist_ok=True)
    commands = [
        ([str(binaries["busy"]), "0", "1"], True),
        ([PYTHON, str(WORKLOADS / "soak_python.py")], True),
        ([PYTHON, str(WORKLOADS / "exec_churn.py"), "10", "2"], False),  # 10 idle processes, 2 execs a second
    ]
    load = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=session, cwd=directory)
        for command, session in commands
    ]
    time.sleep(1)
    for process in load:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited at once ({process.returncode})")
    return load


def stop_load(load: list[subprocess.Popen[bytes]]) -> None:
    for process in load:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def fingerprints_written(profiles: Path) -> Counter[str]:
    return Counter(hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() for path in profiles.glob("*.pb.gz"))


def fingerprints_delivered(collector: Collector) -> Counter[str]:
    """The pprof bytes carried as original_payload by every profile the collector wrote out."""
    found: Counter[str] = Counter()
    for document in collector.exported():
        for resource in document.get("resourceProfiles", []):
            for scope in resource.get("scopeProfiles", []):
                for profile in scope.get("profiles", []):
                    payload = profile.get("originalPayload")
                    if payload:
                        found[hashlib.sha256(base64.b64decode(payload)).hexdigest()] += 1
    return found


def run(seconds: float, interval_s: int, work: Path) -> Soak:
    shutil.rmtree(work, ignore_errors=True)  # a previous run's profiles would count as written
    binaries = build_workloads()
    collector = start_collector(build_collector(), work / "collector", debug=False)
    load = start_load(binaries, work / "load")
    agent: AgentRun | None = None
    try:
        agent = start_agent(
            work / "agent",
            "--profilers",
            PROFILERS,
            "--interval",
            str(interval_s),
            "--otlp-endpoint",
            collector.endpoint,
            "--otlp-insecure",
            env={"PROFILING_AGENT_EXPORT_OTLP_INCLUDE_PPROF": "true", "PROFILING_AGENT_EXPORT_FILES_ENABLED": "true"},
        )
        agent.wait_ready()
        ready = time.monotonic()
        cpu_start = cpu_seconds(agent.pid)
        rss: list[tuple[float, int]] = []
        while (elapsed := time.monotonic() - ready) < seconds:
            if not agent.timed.alive():
                raise RuntimeError(f"the agent exited during the soak:\n{agent.log_text()[-3000:]}")
            rss.append((elapsed, rss_bytes(agent.pid)))
            print(f"soak: {elapsed:5.0f} s  agent RSS {rss[-1][1] / MB:6.1f} MB", file=sys.stderr, flush=True)
            time.sleep(SAMPLE_EVERY_S)
        cpu_s = cpu_seconds(agent.pid) - cpu_start
        metrics = agent.metrics()
        stop_load(load)
        agent.timed.stop(60, signal.SIGTERM)  # the last, partial interval is written and sent
        written = fingerprints_written(agent.profiles)
        # The file exporter flushes every 100 ms; give it a few seconds to write the last requests.
        deadline = time.monotonic() + 30
        while not set(written) <= set(delivered := fingerprints_delivered(collector)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        warnings = sum(1 for line in agent.log_text().splitlines() if " WARNING " in line or " ERROR " in line)
        return Soak(time.monotonic() - ready, rss, cpu_s, written, delivered, metrics, warnings)
    finally:
        stop_load(load)
        if agent is not None and agent.timed.alive():
            agent.stop(timeout=30)
        stop_collector(collector)


def slope_mb_per_10_min(rss: list[tuple[float, int]]) -> float:
    """Least-squares slope of the samples after the warm-up, in MB per 10 minutes."""
    points = [(t, b / MB) for t, b in rss if t >= WARM_UP_S]
    if len(points) < 2:
        return float("nan")
    mean_t = sum(t for t, _ in points) / len(points)
    mean_m = sum(m for _, m in points) / len(points)
    num = sum((t - mean_t) * (m - mean_m) for t, m in points)
    den = sum((t - mean_t) ** 2 for t, _ in points)
    return num / den * 600 if den else float("nan")


def report(soak: Soak, interval_s: int, command: str) -> str:
    rss = soak.rss
    start, middle, end = rss[0], rss[len(rss) // 2], rss[-1]
    step = max(((b[1] - a[1], b[0]) for a, b in itertools.pairwise(rss)), default=(0, 0.0))
    slope = slope_mb_per_10_min(rss)
    missing = set(soak.written) - set(soak.delivered)
    unknown = set(soak.delivered) - set(soak.written)
    twice = sum(n - 1 for n in soak.delivered.values() if n > 1)
    sent = metric_sum(soak.metrics, "profiling_agent_export_otlp_requests_total", outcome="success")
    lost = metric_sum(soak.metrics, "profiling_agent_probe_events_lost_total")
    verdict = "met" if slope <= SLOPE_BOUND_MB and not missing and not unknown and not twice else "missed"
    minutes = [(t, b) for t, b in rss if int(t) % 60 < SAMPLE_EVERY_S]
    lines = [
        "# Soak",
        "",
        f"`{command}` on {os.uname().nodename}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"kernel {os.uname().release}, {len(os.sched_getaffinity(0))} CPUs.",
        "",
        f"The agent ran {soak.seconds / 60:.1f} minutes with `--profilers {PROFILERS} --interval {interval_s}`, "
        "OTLP to the OpenTelemetry Collector (`include_pprof` on) and files on, beside a C burner on one core, a "
        "Python process that allocates, computes and sleeps, and 2 execs a second beside 10 idle processes "
        "(`bench/soak.py`).",
        "",
        f"Target (#16): RSS slope ≤ {SLOPE_BOUND_MB:g} MB / 10 min, every written interval delivered: **{verdict}**.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| RSS at start / middle / end | {start[1] / MB:.1f} / {middle[1] / MB:.1f} / {end[1] / MB:.1f} MB "
        f"(at {start[0]:.0f} / {middle[0]:.0f} / {end[0]:.0f} s) |",
        f"| RSS slope after the first {WARM_UP_S:.0f} s (least squares) | {slope:+.2f} MB / 10 min |",
        f"| largest step between two samples ({SAMPLE_EVERY_S:g} s apart) | {step[0] / MB:+.1f} MB "
        f"at {step[1]:.0f} s |",
        f"| agent CPU | {soak.cpu_s:.1f} s in {soak.seconds:.0f} s: {100 * soak.cpu_s / soak.seconds:.2f}% of a core |",
        f"| profiles written (files) | {sum(soak.written.values())} |",
        f"| profiles delivered (their bytes in the collector's output) | "
        f"{len(set(soak.written) & set(soak.delivered))} |",
        f"| written, not delivered / delivered, never written / delivered twice | {len(missing)} / {len(unknown)} / "
        f"{twice} |",
        f"| OTLP requests accepted | {sent:.0f} |",
        f"| records lost in the kernel (all buffers) | {lost:.0f} |",
        f"| warnings and errors in the agent's log | {soak.log_warnings} |",
        "",
        "RSS each minute:",
        "",
        "| s | MB |",
        "|---|---|",
        *(f"| {t:.0f} | {b / MB:.1f} |" for t, b in minutes),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=int, default=10, help="the agent's reporting interval (s)")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "soak.md")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "soak")
    parser.add_argument("--command", default="make soak", help="the command line the report names")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.soak: needs root (BPF)", file=sys.stderr)
        return 2
    soak = run(args.minutes * 60, args.interval, args.work)
    text = report(soak, args.interval, args.command)
    args.report.write_text(text)
    print(text)
    json.dump({"rss": soak.rss, "cpu_s": soak.cpu_s}, (args.work / "soak.json").open("w"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
