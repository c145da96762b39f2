"""Run the real `profiling-agent` command, as a user would, for the privileged tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

AGENT = [sys.executable, "-m", "agent"]
# How long the agent may take to start: BCC compiles the BPF programs with clang at start-up, a few
# seconds on an idle host and over a minute on a busy 2-core one. Waits poll, so a generous deadline
# costs nothing when it starts quickly.
STARTUP_TIMEOUT_S = 300
REPO = Path(__file__).resolve().parent.parent.parent


def start_agent(
    output_dir: Path | None, *args: str, log_path: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`profiling-agent run` in the background; `output_dir` None leaves the directory to the config;
    `env` adds environment variables (settings without a flag: PROFILING_AGENT_UNWIND_CPU=dwarf, ...)."""
    assert log_path is not None or output_dir is not None
    log = open(log_path or output_dir.parent / "agent.log", "wb")  # type: ignore[union-attr]  # noqa: SIM115
    directory = ["--output-dir", str(output_dir)] if output_dir is not None else []
    # Each agent gets its own metrics port (a --metrics-address flag still wins), so agents that
    # overlap, or an agent already running on the host, never collide on the default 9464.
    environ = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PROFILING_AGENT_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        **(env or {}),
    }
    return subprocess.Popen(
        [*AGENT, "run", *directory, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environ
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_log(log_path: Path, text: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Block until the agent's log contains `text` (e.g. 'profiling started')."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    raise AssertionError(f"agent did not log {text!r} within {timeout} s:\n{log_path.read_text(errors='replace')}")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def series(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")
