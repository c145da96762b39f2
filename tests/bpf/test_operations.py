"""Operating the real agent: metrics while profiling, health endpoints, sd_notify, SIGHUP reload."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import STARTUP_TIMEOUT_S, free_port, get, series, start_agent, wait_for_log

pytestmark = pytest.mark.bpf


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield process
    process.kill()
    process.wait()


def test_metrics_and_health_while_profiling(tmp_path: Path, busy: subprocess.Popen[bytes]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "agent.log"
    agent = start_agent(
        tmp_path / "profiles", "--interval", "1", "--metrics-address", f"127.0.0.1:{port}", log_path=log
    )
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (200, "ok\n")
        status, first = get(f"{base}/metrics")
        assert status == 200
        # Poll until an interval (1 s) has been written, rather than assume it takes under a fixed time:
        # on a busy host the first interval's symbolization can take seconds.
        deadline = time.monotonic() + 120
        while True:
            _, second = get(f"{base}/metrics")
            written = series(second, "profiling_agent_export_files_written_total")
            received = "profiling_agent_probe_events_received_total"
            more = series(second, received, profiler="cpu") > series(first, received, profiler="cpu")
            if (written >= 1 and more) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert get(f"{base}/nope")[0] == 404
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, log.read_text()
    # Types and names.
    for name, kind in (
        ("profiling_agent_probe_events_received_total", "counter"),
        ("profiling_agent_probe_attached", "gauge"),
        ("profiling_agent_symbolize_cache_entries", "gauge"),
        ("profiling_agent_export_files_written_total", "counter"),
        ("profiling_agent_pipeline_queue_depth", "gauge"),
        ("profiling_agent_build_info", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
    ):
        assert re.search(rf"^# TYPE {name.removesuffix('_total')}(_total)? {kind}$", second, re.M), name
    assert series(second, "profiling_agent_probe_attached", profiler="cpu") == 1
    assert 'method="software cpu-clock at 19 Hz per CPU"' in second or "hardware cpu-cycles" in second
    # Counters whose labels are known at start-up exist at 0 from the first scrape, right after READY,
    # so alerts on them can be written before anything happens.
    for line in (
        'profiling_agent_probe_events_lost_total{buffer="cpu_samples",profiler="cpu"} 0.0',
        'profiling_agent_probe_events_lost_total{buffer="proc_events",profiler="process"} 0.0',
        'profiling_agent_pipeline_events_dropped_total{reason="events_queue_full"} 0.0',
        'profiling_agent_sampling_events_dropped_total{profiler="cpu"} 0.0',
        'profiling_agent_symbolize_errors_total{reason="elf_unreadable"} 0.0',
        'profiling_agent_export_profiles_total{outcome="failed",sink="files"} 0.0',
        'profiling_agent_config_reloads_total{outcome="invalid"} 0.0',
    ):
        assert line in first.splitlines(), line
    # Counters increase while profiling.
    received = "profiling_agent_probe_events_received_total"
    # Wakeups are batched, so the very first scrape may come before any record was read.
    assert series(second, received, profiler="cpu") > series(first, received, profiler="cpu")
    assert series(second, "profiling_agent_export_files_written_total") >= 1
    assert series(second, "profiling_agent_sampling_parameter", profiler="cpu", parameter="frequency_hz") == 19


def test_readyz_fails_while_otlp_exports_cannot_be_delivered(tmp_path: Path, busy: subprocess.Popen[bytes]) -> None:
    port, dead = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "agent.yaml"
    config.write_text(
        "metrics:\n  ready_export_failure_s: 2\n"
        f"export:\n  otlp:\n    endpoint: 127.0.0.1:{dead}\n    insecure: true\n    spool_dir: {tmp_path / 'spool'}\n"
    )
    log = tmp_path / "agent.log"
    agent = start_agent(
        tmp_path / "profiles",
        "--config",
        str(config),
        "--interval",
        "1",
        "--metrics-address",
        f"127.0.0.1:{port}",
        log_path=log,
    )
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        assert get(f"{base}/readyz")[0] == 200
        deadline = time.monotonic() + 20
        while get(f"{base}/readyz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        status, body = get(f"{base}/readyz")
        assert status == 503 and "otlp" in body, body
        assert get(f"{base}/healthz")[0] == 200  # alive, just not delivering
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, log.read_text()


def test_sd_notify_ready_status_and_stopping(tmp_path: Path, busy: subprocess.Popen[bytes]) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(STARTUP_TIMEOUT_S)
    os.environ["NOTIFY_SOCKET"] = str(path)
    log = tmp_path / "agent.log"
    try:
        agent = start_agent(tmp_path / "profiles", "--metrics-address", f"127.0.0.1:{free_port()}", log_path=log)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    messages = []
    try:
        messages.append(receiver.recv(4096).decode())
        assert "READY=1" in messages[0]
        agent.terminate()
        while not any("STOPPING=1" in m for m in messages):
            messages.append(receiver.recv(4096).decode())
    finally:
        if agent.poll() is None:
            agent.terminate()
        agent.wait(timeout=30)
        receiver.close()
    assert agent.returncode == 0, log.read_text()
    assert any(m.startswith("STATUS=profiling") for m in messages), messages


def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(
    tmp_path: Path, busy: subprocess.Popen[bytes]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "agent.yaml"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    config.write_text(f"profiling:\n  interval_s: 1\nexport:\n  files:\n    output_dir: {first_dir}\n")
    log = tmp_path / "agent.log"
    # No --output-dir: a flag would win over the file, before and after the reload.
    agent = start_agent(None, "--config", str(config), "--metrics-address", f"127.0.0.1:{port}", log_path=log)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        deadline = time.monotonic() + 30
        while not list(first_dir.glob("cpu-*.pb.gz")) and time.monotonic() < deadline:
            time.sleep(0.2)  # at least one interval reported under the first config
        # An invalid file is refused and counted; the agent keeps running with the old config.
        config.write_text("profiling:\n  interval_s: -5\n")
        agent.send_signal(signal.SIGHUP)
        wait_for_log(log, "config reload refused", 10, agent)
        assert agent.poll() is None
        # A valid one is applied: a new output directory and a restart-only change that is reported.
        config.write_text(
            f"profiling:\n  interval_s: 1\n  frequency_hz: 49\nexport:\n  files:\n    output_dir: {second_dir}\n"
        )
        agent.send_signal(signal.SIGHUP)
        wait_for_log(log, "config reloaded", 10, agent)
        time.sleep(3)
        _, metrics = get(f"{base}/metrics")
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    text = log.read_text()
    assert agent.returncode == 0, text
    assert "profiling.frequency_hz take effect only after a restart" in text
    assert series(metrics, "profiling_agent_config_reloads_total", outcome="invalid") == 1
    assert series(metrics, "profiling_agent_config_reloads_total", outcome="applied") == 1
    assert list(first_dir.glob("cpu-*.pb.gz")), "profiles before the reload"
    assert list(second_dir.glob("cpu-*.pb.gz")), "profiles after the reload go to the new directory"
