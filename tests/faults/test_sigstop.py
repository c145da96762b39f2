"""SIGSTOP and SIGCONT (#16): an agent stopped for a while under load (a debugger, a frozen cgroup, a
VM paused) comes back: it reports again after SIGCONT, what the kernel could not hand it meanwhile is
counted as lost rather than silently missing, and it still exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.agent import STARTUP_TIMEOUT_S, free_port, get, start_agent, wait_for_log
from tests.support.otlp_backends import wait_until

pytestmark = pytest.mark.bpf

STOPPED_S = 8.0


def test_an_agent_stopped_under_load_recovers_and_counts_what_it_missed(tmp_path: Path) -> None:
    out, log, port = tmp_path / "profiles", tmp_path / "agent.log", free_port()
    # Small perf buffers (2 pages per CPU) at 499 Hz: 8 s stopped is far more than they hold.
    args = ("--frequency", "499", "--interval", "1", "--metrics-address", f"127.0.0.1:{port}")
    env = {"PROFILING_AGENT_PROFILING_PERF_BUFFER_PAGES": "2"}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    agent = start_agent(out, *args, log_path=log, env=env)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        wait_until(lambda: len(list(out.glob("cpu-*.pb.gz"))) >= 1, 60, "a first profile")
        agent.send_signal(signal.SIGSTOP)
        time.sleep(STOPPED_S)
        agent.send_signal(signal.SIGCONT)
        resumed = time.time()
        wait_until(
            lambda: any(path.stat().st_mtime > resumed + 1 for path in out.glob("cpu-*.pb.gz")),
            60,
            "a profile written after SIGCONT",
        )
        _, metrics = get(f"http://127.0.0.1:{port}/metrics")
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        agent.send_signal(signal.SIGCONT)
        agent.terminate()
        agent.wait(timeout=60)
    assert agent.returncode == 0, log.read_text()
    lost = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("profiling_agent_probe_events_lost_total{") and 'profiler="cpu"' in line
    )
    assert lost > 0, [line for line in metrics.splitlines() if "events_lost" in line]
    assert log.read_text().count("Traceback") == 0
