"""A stuck backend (#16): SIGTERM exits 0 within 5 s whatever the receiver does, and the next start
delivers what was left.

The first agent exports to a black hole: a TCP listener that accepts and never speaks HTTP/2, so
every call waits for its timeout. After a few intervals are spooled it gets SIGTERM, and must be gone
within the bound. The second agent, started on the same spool with a real receiver, delivers every
request the first one left before its own.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2, profiles_service_pb2_grpc

from tests.support.agent import STARTUP_TIMEOUT_S, start_agent, wait_for_log

pytestmark = pytest.mark.bpf

EXIT_BOUND_S = 5.0  # the acceptance: whatever the backend does


class BlackHole:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


class Receiver(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self) -> None:
        self.starts: list[int] = []  # each request's first profile start, in arrival order
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        start = min(
            (p.time_unix_nano for r in request.resource_profiles for s in r.scope_profiles for p in s.profiles),
            default=0,
        )
        with self.lock:
            self.starts.append(start)
        return profiles_service_pb2.ExportProfilesServiceResponse()


def _otlp_env(port: int, spool: Path) -> dict[str, str]:
    return {
        "PROFILING_AGENT_EXPORT_OTLP_ENDPOINT": f"127.0.0.1:{port}",
        "PROFILING_AGENT_EXPORT_OTLP_INSECURE": "true",
        "PROFILING_AGENT_EXPORT_OTLP_SPOOL_DIR": str(spool),
        "PROFILING_AGENT_EXPORT_FILES_ENABLED": "false",
    }


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_sigterm_with_a_black_hole_backend_exits_in_5_s_and_the_next_start_delivers(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    hole = BlackHole()
    log = tmp_path / "first.log"
    agent = start_agent(None, "--interval", "1", log_path=log, env=_otlp_env(hole.port, spool))
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        _wait(lambda: len(list(spool.glob("*.otlp"))) >= 3, 60, "three intervals spooled")
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

    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    log = tmp_path / "second.log"
    agent = start_agent(None, "--interval", "1", log_path=log, env=_otlp_env(port, spool))
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        # The spool's requests go first, in order, then the new agent's own.
        _wait(lambda: len(receiver.starts) > len(left), 60, "the left requests and one new one delivered")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        server.stop(0)
    assert agent.returncode == 0, log.read_text()
    assert not any(path.exists() for path in left), "delivered requests leave the spool"
    with receiver.lock:
        starts = list(receiver.starts)
    assert starts[: len(left)] == sorted(starts[: len(left)]) and starts[len(left)] >= starts[len(left) - 1]
