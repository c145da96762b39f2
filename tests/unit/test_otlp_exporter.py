"""OTLP gRPC exporter against an in-process ProfilesService on 127.0.0.1 with scripted replies."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc as service
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesPartialSuccess,
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Profile, ResourceProfiles, ScopeProfiles

from agent.errors import ExportError
from agent.export.otlp import exporter as exporter_module
from agent.export.otlp.config import OtlpConfig
from agent.export.otlp.exporter import OtlpExporter
from agent.export.otlp.retry import RetryPolicy, retry_delay
from agent.export.otlp.stats import REJECTED_PROFILES, REQUESTS, RETRIES, Counters

FAST = RetryPolicy(base_s=0.02, max_s=0.05)
Action = Callable[["Scripted", ExportProfilesServiceRequest, grpc.ServicerContext], ExportProfilesServiceResponse]


@dataclass
class Scripted(service.ProfilesServiceServicer):
    """Replies with the next scripted action per call (then OK); records calls and deliveries."""

    script: list[Action] = field(default_factory=list)
    calls: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    delivered: list[ExportProfilesServiceRequest] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(
        self, request: ExportProfilesServiceRequest, context: grpc.ServicerContext
    ) -> ExportProfilesServiceResponse:
        with self.lock:
            action = self.script.pop(0) if self.script else ok
            # Text headers only: binary ("-bin") ones carry bytes, and none of the tests look at them.
            metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
            self.calls.append((time.monotonic(), metadata))
        return action(self, request, context)


def ok(
    server: Scripted, request: ExportProfilesServiceRequest, context: grpc.ServicerContext
) -> ExportProfilesServiceResponse:
    server.delivered.append(request)
    return ExportProfilesServiceResponse()


def fail(code: grpc.StatusCode, retry_delay_s: float | None = None) -> Action:
    def action(
        server: Scripted, request: ExportProfilesServiceRequest, context: grpc.ServicerContext
    ) -> ExportProfilesServiceResponse:
        if retry_delay_s is not None:
            status = status_pb2.Status(code=code.value[0], message="scripted")
            delay = Duration()
            delay.FromNanoseconds(int(retry_delay_s * 1e9))
            info = error_details_pb2.RetryInfo(retry_delay=delay)
            status.details.add().Pack(info)
            context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
        context.abort(code, "scripted")

    return action


def partial(rejected: int, message: str) -> Action:
    def action(
        server: Scripted, request: ExportProfilesServiceRequest, context: grpc.ServicerContext
    ) -> ExportProfilesServiceResponse:
        server.delivered.append(request)
        return ExportProfilesServiceResponse(
            partial_success=ExportProfilesPartialSuccess(rejected_profiles=rejected, error_message=message)
        )

    return action


def hang(
    server: Scripted, request: ExportProfilesServiceRequest, context: grpc.ServicerContext
) -> ExportProfilesServiceResponse:
    server.release.wait(5.0)  # longer than the client's timeout; released at teardown
    return ExportProfilesServiceResponse()


@dataclass
class Server:
    servicer: Scripted
    port: int


def _start(servicer: Scripted, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service.add_ProfilesServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def receiver() -> Iterator[Server]:
    servicer = Scripted()
    server, port = _start(servicer)
    yield Server(servicer, port)
    servicer.release.set()
    server.stop(0)


def _request(tag: int, payload: bytes = b"") -> bytes:
    profile = Profile(time_unix_nano=tag, original_payload=payload, original_payload_format="pprof" if payload else "")
    request = ExportProfilesServiceRequest(
        resource_profiles=[ResourceProfiles(scope_profiles=[ScopeProfiles(profiles=[profile])])]
    )
    return request.SerializeToString()


def _tags(server: Scripted) -> list[int]:
    return [r.resource_profiles[0].scope_profiles[0].profiles[0].time_unix_nano for r in server.delivered]


def _exporter(port: int, counters: Counters | None = None, **overrides: object) -> OtlpExporter:
    settings: dict[str, object] = {"endpoint": f"127.0.0.1:{port}", "insecure": True, "timeout_s": 1.0, **overrides}
    config = OtlpConfig(**settings)  # type: ignore[arg-type]
    return OtlpExporter(config, counters or Counters(), FAST)


def test_unavailable_then_ok_is_delivered_once_on_a_fresh_channel(
    receiver: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.servicer.script = [fail(grpc.StatusCode.UNAVAILABLE), fail(grpc.StatusCode.UNAVAILABLE)]
    channels: list[str] = []
    real = grpc.insecure_channel

    def counting(target: str, **kwargs: object) -> grpc.Channel:
        channels.append(target)
        return real(target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(exporter_module.grpc, "insecure_channel", counting)
    counters = Counters()
    result = _exporter(receiver.port, counters).export(_request(7), threading.Event(), time.monotonic() + 5)
    assert result.attempts == 3 and result.rejected_profiles == 0
    assert _tags(receiver.servicer) == [7]
    assert counters.get(RETRIES, "UNAVAILABLE") == 2 and counters.get(REQUESTS, "success") == 1
    assert len(channels) == 3  # rebuilt after each UNAVAILABLE


def test_resource_exhausted_with_retry_info_honours_the_delay(receiver: Server) -> None:
    receiver.servicer.script = [fail(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=0.4)]
    counters = Counters()
    _exporter(receiver.port, counters).export(_request(1), threading.Event(), time.monotonic() + 5)
    (first, _), (second, _) = receiver.servicer.calls
    assert second - first >= 0.4  # the server's delay, not the 20 ms backoff
    assert counters.get(RETRIES, "RESOURCE_EXHAUSTED") == 1 and _tags(receiver.servicer) == [1]


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT])
def test_final_codes_are_not_retried(receiver: Server, code: grpc.StatusCode) -> None:
    receiver.servicer.script = [fail(code)]
    counters = Counters()
    with pytest.raises(ExportError) as info:
        _exporter(receiver.port, counters).export(_request(1), threading.Event(), time.monotonic() + 5)
    assert info.value.retryable is False and code.name in str(info.value)
    assert (
        len(receiver.servicer.calls) == 1 and counters.get(REQUESTS, "rejected") == 1 and counters.total(RETRIES) == 0
    )


def test_partial_success_is_counted_not_retried(receiver: Server) -> None:
    receiver.servicer.script = [partial(2, "two bad profiles")]
    counters = Counters()
    result = _exporter(receiver.port, counters).export(_request(1), threading.Event(), time.monotonic() + 5)
    assert (result.rejected_profiles, result.message, result.attempts) == (2, "two bad profiles", 1)
    assert len(receiver.servicer.calls) == 1
    assert counters.get(REQUESTS, "partial") == 1 and counters.get(REJECTED_PROFILES) == 2


def test_hanging_server_times_out_then_retry_succeeds(receiver: Server) -> None:
    receiver.servicer.script = [hang]
    counters = Counters()
    result = _exporter(receiver.port, counters, timeout_s=0.2).export(
        _request(3), threading.Event(), time.monotonic() + 5
    )
    assert result.attempts == 2 and _tags(receiver.servicer) == [3]
    assert counters.get(RETRIES, "DEADLINE_EXCEEDED") == 1


def test_overall_deadline_bounds_all_attempts(receiver: Server) -> None:
    receiver.servicer.script = [hang] * 20
    counters = Counters()
    started = time.monotonic()
    with pytest.raises(ExportError) as info:
        _exporter(receiver.port, counters, timeout_s=0.3).export(_request(3), threading.Event(), started + 0.8)
    elapsed = time.monotonic() - started
    assert info.value.retryable is True
    assert 0.6 <= elapsed < 2.0 and len(receiver.servicer.calls) >= 2
    assert counters.get(REQUESTS, "expired") == 1 and not receiver.servicer.delivered


def test_stop_event_interrupts_a_backoff(receiver: Server) -> None:
    receiver.servicer.script = [fail(grpc.StatusCode.UNAVAILABLE, retry_delay_s=30.0)]
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    counters = Counters()
    started = time.monotonic()
    with pytest.raises(ExportError) as info:
        _exporter(receiver.port, counters).export(_request(1), stop, started + 60)
    assert info.value.retryable is True and time.monotonic() - started < 2.0
    assert counters.get(REQUESTS, "interrupted") == 1


def test_headers_are_sent_lowercased_with_our_user_agent(receiver: Server) -> None:
    headers = (("X-Api-Key", "secret"), ("X-Scope-OrgID", "tenant-1"))
    _exporter(receiver.port, headers=headers).export(_request(1), threading.Event(), time.monotonic() + 5)
    (_, metadata), *_ = receiver.servicer.calls
    assert metadata["x-api-key"] == "secret" and metadata["x-scope-orgid"] == "tenant-1"
    assert metadata["user-agent"].startswith("profiling-agent/")


class CountingProxy:
    """A TCP relay counting the bytes the client sends, to see gzip on the wire."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                if count:
                    self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize(("compression", "low", "high"), [("gzip", 0, 200_000), ("none", 2_000_000, 3_000_000)])
def test_gzip_is_negotiated_on_the_wire(receiver: Server, compression: str, low: int, high: int) -> None:
    proxy = CountingProxy(receiver.port)
    try:
        payload = _request(9, payload=b"\0" * 2_000_000)
        exporter = _exporter(proxy.port, compression=compression)
        exporter.export(payload, threading.Event(), time.monotonic() + 5)
        exporter.close()
    finally:
        proxy.close()
    assert _tags(receiver.servicer) == [9]
    assert low <= proxy.sent < high


def test_mutual_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=cert.read_bytes(), require_client_auth=True
    )
    servicer = Scripted()
    server, port = _start(servicer, credentials)
    try:
        config = OtlpConfig(endpoint=f"localhost:{port}", ca_file=str(cert), cert_file=str(cert), key_file=str(key))
        config.validate()
        OtlpExporter(config, Counters(), FAST).export(_request(5), threading.Event(), time.monotonic() + 5)
        assert _tags(servicer) == [5]
        # Without the client certificate the server refuses the handshake: retried, then given up.
        anonymous = OtlpConfig(endpoint=f"localhost:{port}", ca_file=str(cert), timeout_s=0.3)
        with pytest.raises(ExportError) as info:
            OtlpExporter(anonymous, Counters(), FAST).export(_request(6), threading.Event(), time.monotonic() + 0.8)
        assert info.value.retryable is True and _tags(servicer) == [5]
    finally:
        server.stop(0)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=5.0)
    assert policy.backoff(0, lambda a, b: a) == 0.8 and policy.backoff(0, lambda a, b: b) == 1.2
    assert policy.backoff(2, lambda a, b: 1.0) == 4.0 and policy.backoff(10, lambda a, b: 1.2) == 5.0
    assert retry_delay(grpc.StatusCode.UNAVAILABLE, 7.0, 0, policy) == 7.0  # RetryInfo wins
    assert retry_delay(grpc.StatusCode.RESOURCE_EXHAUSTED, None, 0, policy) is None
    for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAUTHENTICATED):
        assert retry_delay(code, 1.0, 0, policy) is None
    for name in ("CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"):
        assert retry_delay(grpc.StatusCode[name], None, 3, RetryPolicy(base_s=0.5, max_s=100)) is not None
