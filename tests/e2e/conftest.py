"""End-to-end fixtures: a real OpenTelemetry Collector receiving OTLP profiles on 127.0.0.1.

The collector is built by tests/e2e/otelcol/build.sh (ocb, cached under build/otelcol/); the
fixture runs the script itself, so a fresh machine gets its collector without a manual step. Each
test gets its own collector process with an otlp receiver (gRPC), the debug exporter (detailed) and
the contrib file exporter (JSON lines) writing into the test's tmp directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "e2e" / "otelcol" / "build.sh"
BINARY = REPO / "build" / "otelcol" / "dist" / "otelcol-prof"
BUILD_TIMEOUT_S = 1800
START_TIMEOUT_S = 60

CONFIG = """\
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
exporters:
  debug:
    verbosity: detailed
  file:
    path: {output}
    format: json
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
    logs:
      level: info
      encoding: console
  pipelines:
    profiles:
      receivers: [otlp]
      exporters: [debug, file]
"""


@dataclass
class Collector:
    endpoint: str
    output: Path
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def exported(self) -> list[dict[str, Any]]:
        """Every ProfilesData the file exporter wrote, one JSON document per line."""
        if not self.output.exists():
            return []
        # The exporter writes through a buffer: only newline-terminated lines are complete documents.
        complete = self.output.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_for(self, predicate: Any, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Poll the file output until `predicate(documents)` holds (the exporter flushes every 100 ms)."""
        deadline = time.monotonic() + timeout_s
        while True:
            documents = self.exported()
            if predicate(documents) or time.monotonic() > deadline:
                return documents
            time.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def otelcol_binary() -> Path:
    """The collector binary, built (or found up to date) by the ocb script."""
    result = subprocess.run(
        [str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if result.returncode != 0 or not os.access(BINARY, os.X_OK):
        pytest.fail(f"building the collector failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return BINARY


def start_collector(binary: Path, directory: Path, grpc_port: int | None = None) -> Collector:
    """Start a collector (on `grpc_port`, or a free one) and wait until it listens."""
    grpc_port = grpc_port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / "profiles.jsonl"
    config = directory / "otelcol.yaml"
    config.write_text(CONFIG.format(grpc_port=grpc_port, output=output))
    log = directory / "otelcol.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(binary), "--config", str(config), "--feature-gates=service.profilesSupport"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    collector = Collector(f"127.0.0.1:{grpc_port}", output, log, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _listening(grpc_port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_collector(collector)
            pytest.fail(f"collector did not start listening on {grpc_port}:\n{collector.log_text()}")
        time.sleep(0.1)
    return collector


def stop_collector(collector: Collector) -> None:
    collector.process.terminate()
    try:
        collector.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        collector.process.kill()
        collector.process.wait()


@pytest.fixture
def otelcol(otelcol_binary: Path, tmp_path: Path) -> Iterator[Collector]:
    """A running collector; stopped (and its log kept in tmp_path) after the test."""
    collector = start_collector(otelcol_binary, tmp_path)
    try:
        yield collector
    finally:
        stop_collector(collector)
