"""The agent as an operator meets it: check, dump, signals, duration, and running without privileges."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.agent import AGENT, REPO, STARTUP_TIMEOUT_S, free_port, start_agent, wait_for_log
from tests.support.profiles import read_all

pytestmark = pytest.mark.bpf


def test_check_reports_ready_and_the_fallbacks_in_use() -> None:
    result = subprocess.run([*AGENT, "check"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    names = ("privileges", "bpf syscall", "perf events", "tracefs", "kernel headers", "DWARF unwinding", "kprobes")
    for name in names:
        assert f"] {name}:" in result.stdout
    assert result.stdout.rstrip().endswith("ready: the agent can run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_the_partial_interval_and_exits_zero(tmp_path: Path, sig: signal.Signals) -> None:
    out, log = tmp_path / "profiles", tmp_path / "agent.log"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    agent = start_agent(out, "--interval", "3600", "--frequency", "49", log_path=log)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        time.sleep(2)
        sent = time.monotonic()
        agent.send_signal(sig)
        agent.wait(timeout=15)
        stopped_in = time.monotonic() - sent
    finally:
        busy.kill()
        busy.wait()
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, log.read_text()
    assert stopped_in < 5, f"took {stopped_in:.1f} s to stop"
    assert "Traceback" not in log.read_text()
    # The interval never reached its end (3600 s): what was sampled was flushed at shutdown.
    pids = {sample.numeric.get("pid") for sample in read_all(out)}
    assert busy.pid in pids


def test_duration_stops_and_exits_zero(tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    started = time.monotonic()
    try:
        result = subprocess.run(
            [
                *AGENT,
                "run",
                "--output-dir",
                str(out),
                "--duration",
                "2",
                "--interval",
                "1",
                "--metrics-address",
                f"127.0.0.1:{free_port()}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S + 60,
        )
    finally:
        busy.kill()
        busy.wait()
    assert result.returncode == 0, result.stderr
    # Start-up (compiling the BPF programs) may take a minute on a busy host: the duration is measured
    # from the log's own timestamps, from "profiling started" to "profiling stopped".
    stamps = {
        event: datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        for line in result.stderr.splitlines()
        for event in ("profiling started", "profiling stopped")
        if event in line
    }
    assert len(stamps) == 2, result.stderr
    profiled = (stamps["profiling stopped"] - stamps["profiling started"]).total_seconds()
    assert 1.5 <= profiled < 10, (profiled, result.stderr)
    assert time.monotonic() - started < STARTUP_TIMEOUT_S + 30
    assert list(out.glob("cpu-*.pb.gz"))


def test_dump_bpf_prints_source_and_flags() -> None:
    result = subprocess.run(
        [*AGENT, "run", "--dump-bpf", "--pid", "1"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "-DFILTER_PIDS=1" in result.stdout
    assert "int on_cpu_sample(struct bpf_perf_event_data *ctx)" in result.stdout
    assert "struct stack_event {" in result.stdout


def test_without_privileges_the_report_is_printed_not_a_traceback(tmp_path: Path) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(
        [*nobody, *AGENT, "run", "--output-dir", str(tmp_path / "p"), "--duration", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "[FAIL] privileges" in result.stderr
    assert "-> run as root" in result.stderr
    check = subprocess.run([*nobody, *AGENT, "check"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert check.returncode == 1
    assert "not ready" in check.stdout
