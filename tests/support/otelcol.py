"""A real OpenTelemetry Collector receiving OTLP profiles on 127.0.0.1, for the end-to-end tests and
`make soak`.

The collector is built by tests/e2e/otelcol/build.sh (ocb, cached under build/otelcol/); `build()`
runs the script, so a fresh machine gets its collector without a manual step. Each collector process
has an otlp receiver (gRPC), the contrib file exporter (JSON lines) writing into its directory and,
unless turned off, the debug exporter (detailed) in its log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.agent import REPO, free_port

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
      exporters: [{exporters}]
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


def build() -> Path:
    """The collector binary, built (or found up to date) by the ocb script."""
    result = subprocess.run(
        [str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if result.returncode != 0 or not os.access(BINARY, os.X_OK):
        raise AssertionError(f"building the collector failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return BINARY


def start_collector(binary: Path, directory: Path, grpc_port: int | None = None, debug: bool = True) -> Collector:
    """Start a collector (on `grpc_port`, or a free one) and wait until it listens; `debug` False leaves
    out the debug exporter, whose detailed log a long run cannot afford."""
    grpc_port = grpc_port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / "profiles.jsonl"
    config = directory / "otelcol.yaml"
    exporters = "debug, file" if debug else "file"
    config.write_text(CONFIG.format(grpc_port=grpc_port, output=output, exporters=exporters))
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
            raise AssertionError(f"collector did not start listening on {grpc_port}:\n{collector.log_text()}")
        time.sleep(0.1)
    return collector


def stop_collector(collector: Collector) -> None:
    collector.process.terminate()
    try:
        collector.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        collector.process.kill()
        collector.process.wait()
