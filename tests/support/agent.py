"""Run the real `profiling-agent` command, as a user would, for the privileged tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

AGENT = [sys.executable, "-m", "agent"]
REPO = Path(__file__).resolve().parent.parent.parent


def start_agent(output_dir: Path, *args: str, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    log = open(log_path or output_dir.parent / "agent.log", "wb")  # noqa: SIM115 - owned by the Popen
    return subprocess.Popen(
        [*AGENT, "run", "--output-dir", str(output_dir), *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


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
