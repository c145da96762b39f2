"""Benchmark helper: the real agent as a user runs it, `.venv/bin/profiling-agent run`, under `time -v`.

Every run gets its own directory (profiles, OTLP spool, log) and its own metrics port, so benchmarks do
not collide with an agent or a test running on the same host; everything else is the agent's defaults
unless a scenario passes flags. Start-up ends when the log says `profiling started` (logged when the
probes are attached and READY=1 is sent to systemd).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.build import REPO
from bench.procs import Timed, TimeV, status_kib, wait_until

AGENT = REPO / ".venv" / "bin" / "profiling-agent"
READY_TEXT = "profiling started"
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(slots=True)
class AgentRun:
    timed: Timed
    directory: Path
    metrics_port: int
    ready_s: float = float("nan")  # launch to READY
    hwm_at_ready_kib: int = 0  # peak resident memory up to READY

    @property
    def pid(self) -> int:
        return self.timed.pid

    @property
    def log(self) -> Path:
        return self.directory / "agent.log"

    @property
    def profiles(self) -> Path:
        return self.directory / "profiles"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds from launch to `profiling started`; records the peak RSS at that moment."""

        def ready() -> bool:
            if not self.timed.alive():
                raise RuntimeError(f"the agent exited before it was ready:\n{self.log_text()[-3000:]}")
            return READY_TEXT in self.log_text()

        wait_until(ready, timeout, "agent start-up", interval=0.01)
        self.ready_s = self._since_launch()
        self.hwm_at_ready_kib = status_kib(self.pid, "VmHWM")
        return self.ready_s

    def _since_launch(self) -> float:
        return time.monotonic() - self.timed.launched

    def metrics(self) -> dict[str, float]:
        """The agent's Prometheus samples, as `name{label=value,...}` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    def stop(self, timeout: float = 60.0) -> TimeV:
        return self.timed.stop(timeout)


def start_agent(directory: Path, *args: str, env: dict[str, str] | None = None) -> AgentRun:
    """`profiling-agent run --output-dir DIR --metrics-address 127.0.0.1:<free> ARGS` in the background.

    `env` adds to (or overrides) the environment, e.g. a `PROFILING_AGENT_*` setting that has no flag."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environment = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PROFILING_AGENT_EXPORT_OTLP_SPOOL_DIR": str(directory / "spool"),
        **(env or {}),
    }
    argv = [
        str(AGENT),
        "run",
        "--output-dir",
        str(directory / "profiles"),
        "--metrics-address",
        f"127.0.0.1:{port}",
        *args,
    ]
    with open(directory / "agent.log", "wb") as log:
        timed = Timed(argv, directory / "agent.time", stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
    return AgentRun(timed, directory, port)


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = [f"{k}={v}" for k, v in labels.items()]
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(item in rest.rstrip("}").split(",") for item in wanted):
            total += value
    return total
