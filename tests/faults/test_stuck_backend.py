"""A stuck backend (#16): SIGTERM exits 0 within 5 s whatever the receiver does, and the next start
delivers what was left.

The first agent exports to a black hole: a TCP listener that accepts and never speaks HTTP/2, so
every call waits for its timeout. After a few intervals are spooled it gets SIGTERM, and must be gone
within the bound. The second agent, started on the same spool with a real receiver, delivers every
request the first one left before its own.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.agent import STARTUP_TIMEOUT_S, series, start_agent, wait_for_log
from tests.support.otlp_backends import BlackHole, deliver_the_rest, otlp_env, wait_until

pytestmark = pytest.mark.bpf

EXIT_BOUND_S = 5.0  # the acceptance: whatever the backend does


def test_sigterm_with_a_black_hole_backend_exits_in_5_s_and_the_next_start_delivers(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    hole = BlackHole()
    log = tmp_path / "first.log"
    agent = start_agent(None, "--interval", "1", log_path=log, env=otlp_env(hole.port, spool))
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        wait_until(lambda: len(list(spool.glob("*.otlp"))) >= 3, 60, "three intervals spooled")
        assert hole.connections, "the agent never connected to the black hole"
        agent.send_signal(signal.SIGTERM)
        started = time.monotonic()
        agent.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        hole.close()
    assert agent.returncode == 0, log.read_text()
    assert took <= EXIT_BOUND_S, (took, log.read_text()[-2000:])
    left = sorted(spool.glob("*.otlp"))
    assert len(left) >= 3, "the undelivered requests stay in the spool"

    # The spool's requests go first, in order, then the new agent's own.
    starts, _ = deliver_the_rest(tmp_path, spool, len(left))
    assert not any(path.exists() for path in left), "delivered requests leave the spool"
    assert starts[: len(left)] == sorted(starts[: len(left)]) and starts[len(left)] >= starts[len(left) - 1]


def test_a_resetting_backend_keeps_everything_spooled_and_a_corrupt_spool_file_is_dropped(tmp_path: Path) -> None:
    """A receiver that resets every connection: nothing is delivered, nothing lost (all stays spooled,
    retried). Then two spool files are corrupted (random bytes, a truncation) before the next start:
    they are dropped and counted, and every other request is delivered, in order."""
    spool = tmp_path / "spool"
    resetter = BlackHole(reset=True)
    log = tmp_path / "first.log"
    agent = start_agent(None, "--interval", "1", log_path=log, env=otlp_env(resetter.port, spool))
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        wait_until(lambda: len(list(spool.glob("*.otlp"))) >= 4, 60, "four intervals spooled")
        wait_until(lambda: resetter.resets >= 2, 60, "the agent retried against the resetting backend")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        resetter.close()
    assert agent.returncode == 0, log.read_text()
    files = sorted(spool.glob("*.otlp"))
    assert len(files) >= 4
    files[0].write_bytes(os.urandom(files[0].stat().st_size))  # random bytes
    with open(files[1], "r+b") as f:  # cut in the middle of its payload
        f.truncate(files[1].stat().st_size // 2)
    good = files[2:]

    starts, metrics = deliver_the_rest(tmp_path, spool, len(good))
    assert not any(path.exists() for path in files), "corrupt files dropped, good ones delivered"
    assert series(metrics, "profiling_agent_export_otlp_dropped_batches_total", reason="corrupt") == 2
    assert starts[: len(good)] == sorted(starts[: len(good)])
