"""OTLP backends for the fault tests: a black hole (accepts TCP, never answers), a resetter (accepts and
closes at once), and a real in-process receiver that records what it got, in order."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2, profiles_service_pb2_grpc

from tests.support.agent import STARTUP_TIMEOUT_S, free_port, get, start_agent, wait_for_log


class BlackHole:
    """Accepts connections and never answers; with `reset`, closes each at once instead (an RST)."""

    def __init__(self, reset: bool = False) -> None:
        self.reset = reset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection = self.listener.accept()[0]
            except OSError:
                return
            if self.reset:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                connection.close()  # linger 0: a reset, not a clean close
                self.resets += 1
            else:
                self.connections.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


class Receiver(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self) -> None:
        self.starts: list[int] = []  # each request's first profile start, in arrival order
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        start = request_start(request)
        with self.lock:
            self.starts.append(start)
        return profiles_service_pb2.ExportProfilesServiceResponse()


def request_start(request: Any) -> int:
    """An ExportProfilesServiceRequest's earliest profile start: one interval's requests share it."""
    return min(
        (p.time_unix_nano for r in request.resource_profiles for s in r.scope_profiles for p in s.profiles),
        default=0,
    )


def start_receiver() -> tuple[grpc.Server, Receiver, int]:
    """A real ProfilesService on 127.0.0.1: (server, its recorder, port)."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, receiver, port


def otlp_env(port: int, spool: Path) -> dict[str, str]:
    """The agent's environment for OTLP to 127.0.0.1:`port` with its spool in `spool`, and no files."""
    return {
        "PROFILING_AGENT_EXPORT_OTLP_ENDPOINT": f"127.0.0.1:{port}",
        "PROFILING_AGENT_EXPORT_OTLP_INSECURE": "true",
        "PROFILING_AGENT_EXPORT_OTLP_SPOOL_DIR": str(spool),
        "PROFILING_AGENT_EXPORT_FILES_ENABLED": "false",
    }


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 0.1 s; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def deliver_the_rest(tmp_path: Path, spool: Path, spooled: int) -> tuple[list[int], str]:
    """A second agent on `spool` with a real receiver, until it has delivered more than `spooled`
    requests: the profile starts it delivered, in order, and its metrics then."""
    server, receiver, port = start_receiver()
    log, metrics_port = tmp_path / "second.log", free_port()
    env = {**otlp_env(port, spool), "PROFILING_AGENT_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    agent = start_agent(None, "--interval", "1", log_path=log, env=env)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        wait_until(lambda: len(receiver.starts) > spooled, 60, "the spooled requests and one new one delivered")
        _, metrics = get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        server.stop(0)
    assert agent.returncode == 0, log.read_text()
    with receiver.lock:
        return list(receiver.starts), metrics
