"""SIGKILL in the middle of a write, then a restart (#16): nothing written before is lost, nothing is
delivered twice, and the half-written file is dropped and counted, never read as data.

The agent is caught mid-write, not at a random moment: inotify reports the temp file the moment it
is created, the agent is stopped at once, and it is killed only if that file is still there, i.e.
before its fsync and rename completed (tests/support/inotify.py). One case for the OTLP spool (the
backend down, so every interval's request is spooled), one for the local file sink.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from agent.export.otlp.spool import HEADER
from tests.support.agent import STARTUP_TIMEOUT_S, free_port, get, series, start_agent, wait_for_log
from tests.support.inotify import catch_mid_write
from tests.support.otlp_backends import deliver_the_rest, otlp_env, request_start, wait_until
from tests.support.profiles import read_pprof

pytestmark = pytest.mark.bpf

CATCH_TIMEOUT_S = 120  # intervals are 1 s: a write not caught in 120 of them is a failure


def _kill_mid_write(tmp_path: Path, directory: Path, args: list[str], env: dict[str, str], done: str) -> Path:
    """Run an agent writing into `directory`; once `done` files are there, SIGKILL it in the middle of
    a write. Returns the temp file it left."""
    log = tmp_path / "killed.log"
    agent = start_agent(None, "--interval", "1", *args, log_path=log, env=env)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        wait_until(lambda: len(list(directory.glob(done))) >= 2, 60, "two files written")
        temp = catch_mid_write(agent.pid, directory, lambda name: name.endswith(".tmp"), CATCH_TIMEOUT_S)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert temp.exists(), "the killed write left its temp file"
    return temp


def _spooled_start(path: Path) -> int:
    request = ExportProfilesServiceRequest.FromString(path.read_bytes()[HEADER.size :])
    return request_start(request)


def test_sigkill_mid_spool_write_then_a_restart_delivers_every_spooled_request_once(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    down = free_port()  # nothing listens: every call fails at once and each request stays spooled
    temp = _kill_mid_write(tmp_path, spool, [], otlp_env(down, spool), "*.otlp")
    spooled = sorted(spool.glob("*.otlp"))
    expected = [_spooled_start(path) for path in spooled]  # what the killed agent had acknowledged

    starts, metrics = deliver_the_rest(tmp_path, spool, len(spooled))
    assert starts[: len(spooled)] == expected, "every spooled request, in order, before the new ones"
    assert len(set(starts)) == len(starts), f"a request delivered twice: {starts}"
    assert not temp.exists() and not any(path.exists() for path in spooled)
    assert series(metrics, "profiling_agent_export_otlp_dropped_batches_total", reason="interrupted_write") == 1


def test_sigkill_mid_profile_write_then_a_restart_keeps_every_file_whole(tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    out.mkdir()
    temp = _kill_mid_write(tmp_path, out, ["--output-dir", str(out)], {}, "*.pb.gz")
    written = sorted(out.glob("*.pb.gz"))
    for path in written:  # each file under a final name is a whole profile
        read_pprof(path)

    log, metrics_port = tmp_path / "restarted.log", free_port()
    env = {"PROFILING_AGENT_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    agent = start_agent(None, "--interval", "1", "--output-dir", str(out), log_path=log, env=env)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        wait_until(lambda: len(list(out.glob("*.pb.gz"))) > len(written), 60, "a new profile written")
        time.sleep(0.2)
        _, metrics = get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    assert agent.returncode == 0, log.read_text()[-2000:]
    assert not temp.exists(), "the half-written profile is deleted at start-up"
    assert all(path.exists() for path in written), "every profile written before the kill is kept"
    assert series(metrics, "profiling_agent_export_files_interrupted_total") == 1
    for path in sorted(out.glob("*.pb.gz")):
        read_pprof(path)
