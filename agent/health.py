"""Health: liveness and readiness, and the HTTP server that serves them with the metrics.

Owns the answers to "is the agent alive" (/healthz: every thread it started is running) and "is it
doing its job" (/readyz: probes attached, and no sink has been failing, or an OTLP backlog stuck,
for longer than `metrics.ready_export_failure_s`), plus the small HTTP server for /metrics, /healthz
and /readyz. The server is started and stopped by `agent.daemon`, which owns its thread. Its
configuration section, `metrics` (`MetricsConfig`), is declared here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.settings import parse_bool, parse_str, ranged_float, setting

logger = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


def parse_address(value: Any) -> str:
    """host:port to listen on; the host must be given (0.0.0.0 only when asked for)."""
    text = parse_str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9464), got {value!r}")
    return text


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The metrics and health server's section."""

    SECTION: ClassVar[str] = "metrics"

    enabled: bool = setting(True, parse_bool, "Serve Prometheus metrics, /healthz and /readyz.")
    address: str = setting(
        "127.0.0.1:9464",
        parse_address,
        "Address of the metrics and health server (use 0.0.0.0:9464 to expose it, e.g. in Kubernetes).",
        "--metrics-address",
    )
    ready_export_failure_s: float = setting(
        300.0,
        ranged_float(1.0, 86_400.0),
        "/readyz fails once exports have been failing (or undelivered) for this long.",
    )


class Backlog(Protocol):
    """A sink that delivers in the background (the OTLP sink): pending work and delivered count."""

    @property
    def queue_depth(self) -> int: ...

    def delivered(self) -> int: ...


class SinkFailures(Protocol):
    """When each sink started failing (absent while it succeeds): `agent.flow.report.Reporter`."""

    failing_since: dict[str, float]


class HealthState:
    def __init__(self, ready_export_failure_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = ready_export_failure_s
        self._clock = clock
        self.attached = False
        self.threads: list[threading.Thread] = []
        self.failures: SinkFailures | None = None
        self.backlogs: dict[str, Backlog] = {}
        self._progress: dict[str, tuple[int, float]] = {}  # sink -> (delivered count, when it last moved)

    def set_limit(self, ready_export_failure_s: float) -> None:
        self._limit = ready_export_failure_s

    def live(self) -> tuple[bool, str]:
        dead = [thread.name for thread in self.threads if not thread.is_alive()]
        return (False, f"threads stopped: {', '.join(dead)}") if dead else (True, "ok")

    def ready(self) -> tuple[bool, str]:
        if not self.attached:
            return False, "probes are not attached yet"
        alive, why = self.live()
        if not alive:
            return False, why
        now = self._clock()
        for sink, since in sorted((self.failures.failing_since if self.failures else {}).items()):
            if now - since > self._limit:
                return False, f"{sink} exports failing for {now - since:.0f} s"
        for sink, backlog in sorted(self.backlogs.items()):
            stuck = self._stuck_for(sink, backlog, now)
            if stuck > self._limit:
                return False, f"{sink}: {backlog.queue_depth} requests undelivered for {stuck:.0f} s"
        return True, "ok"

    def _stuck_for(self, sink: str, backlog: Backlog, now: float) -> float:
        """Seconds since the sink last delivered something while work was waiting."""
        delivered = backlog.delivered()
        last_count, last_moved = self._progress.get(sink, (delivered, now))
        if delivered != last_count or backlog.queue_depth == 0:
            last_moved = now
        self._progress[sink] = (delivered, last_moved)
        return now - last_moved


def _handler(registry: CollectorRegistry, health: HealthState) -> type[BaseHTTPRequestHandler]:
    checks: dict[str, Check] = {"/healthz": health.live, "/readyz": health.ready}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path in checks:
                ok, why = checks[path]()
                self._reply(200 if ok else 503, "text/plain; charset=utf-8", f"{why}\n".encode())
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("metrics server: " + format, *args)

    return Handler


def make_server(address: str, registry: CollectorRegistry, health: HealthState) -> ThreadingHTTPServer:
    """Bind the server (the caller runs `serve_forever` on a thread it owns); binding errors propagate."""
    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), _handler(registry, health))
    server.daemon_threads = True
    return server
