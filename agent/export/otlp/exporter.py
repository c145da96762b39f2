"""Export stage, OTLP sink: the gRPC client of `ProfilesService/Export` and its retry loop.

`OtlpExporter.export()` delivers one serialized request: it retries the retryable outcomes (see
`retry`) until one overall deadline, rebuilds the channel after UNAVAILABLE (a fresh DNS lookup
and connection), and raises `ExportError` at the boundary: `retryable=False` when the receiver
refused the data for good (the caller drops it), `retryable=True` when the deadline ran out or the
stop event was set (the caller keeps it). A `partial_success` is final: it is logged and counted,
never retried. Every wait is `stop_event.wait(timeout)` so shutdown interrupts backoffs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2_grpc import ProfilesServiceStub

from agent import __version__
from agent.errors import ExportError
from agent.export.otlp.config import OtlpConfig, parse_endpoint, read_pem
from agent.export.otlp.retry import RetryPolicy, retry_delay, retry_info_delay
from agent.export.otlp.stats import REJECTED_PROFILES, REQUESTS, RETRIES, Counters

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExportResult:
    rejected_profiles: int  # from partial_success; 0 on full success
    message: str  # partial_success.error_message ("" when none)
    attempts: int


CANCEL_CHECK_S = 0.1  # while a call is in flight, how often it looks for shutdown


class _Interrupted(Exception):
    """The call in flight was cancelled for shutdown."""


class OtlpExporter:
    """One gRPC channel to the receiver, rebuilt on demand; safe to close twice."""

    def __init__(self, config: OtlpConfig, counters: Counters, policy: RetryPolicy | None = None) -> None:
        parse_endpoint(config.endpoint)  # raises ConfigError naming export.otlp.endpoint
        self._target = config.endpoint
        self._timeout_s = config.timeout_s
        self._policy = policy or RetryPolicy()
        self._counters = counters
        self._metadata = tuple((key.lower(), value) for key, value in config.headers)
        self._compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        self._credentials = None if config.insecure else _tls_credentials(config)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._closed = False

    def export(self, payload: bytes, stop_event: threading.Event, deadline: float) -> ExportResult:
        """Deliver one serialized request before the `time.monotonic()` deadline, retrying as allowed."""
        try:
            request = ExportProfilesServiceRequest.FromString(payload)
        except DecodeError as e:
            self._counters.inc(REQUESTS, "rejected")
            raise ExportError(f"undecodable OTLP request ({len(payload)} bytes): {e}", retryable=False) from e
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if self._closed or stop_event.is_set() or remaining <= 0:
                self._counters.inc(REQUESTS, "expired" if remaining <= 0 else "interrupted")
                raise ExportError(f"not delivered to {self._target} after {attempt} retries", retryable=True)
            started = time.monotonic()
            try:
                response = self._call(request, min(self._timeout_s, remaining), stop_event)
            except _Interrupted:
                self._counters.inc(REQUESTS, "interrupted")
                raise ExportError(f"not delivered to {self._target}: interrupted by shutdown", retryable=True) from None
            except grpc.RpcError as error:
                delay = self._on_error(error, attempt)
                if delay >= deadline - time.monotonic() or stop_event.wait(delay):
                    self._counters.inc(REQUESTS, "interrupted" if stop_event.is_set() else "expired")
                    raise ExportError(
                        f"gave up on {self._target} after {attempt + 1} attempts", retryable=True
                    ) from error
                attempt += 1
                continue
            self._counters.observe_latency(time.monotonic() - started)
            return self._result(response, attempt + 1)

    def _call(
        self, request: ExportProfilesServiceRequest, timeout: float, stop_event: threading.Event
    ) -> ExportProfilesServiceResponse:
        """One Export call, cancelled when `stop_event` is set or the exporter closes: a receiver that
        accepts the connection and never answers held SIGTERM for the whole call timeout (10.3 s seen)."""
        future = self._stub().Export.future(
            request, timeout=timeout, metadata=self._metadata, compression=self._compression
        )
        finished = threading.Event()
        future.add_done_callback(lambda _: finished.set())
        while not finished.wait(CANCEL_CHECK_S):
            if stop_event.is_set() or self._closed:
                future.cancel()
                raise _Interrupted
        return future.result()  # raises the call's RpcError

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _on_error(self, error: grpc.RpcError, attempt: int) -> float:
        """Seconds to wait before the next attempt; raises ExportError(retryable=False) when final."""
        # Errors raised by a call implement grpc.Call; a bare RpcError (not from a call) has no status.
        has_status = callable(getattr(error, "code", None))
        code = error.code() if has_status else grpc.StatusCode.UNKNOWN
        details = (error.details() if has_status else None) or str(error)
        delay = retry_delay(code, retry_info_delay(error), attempt, self._policy)
        if delay is None:
            self._counters.inc(REQUESTS, "rejected")
            raise ExportError(f"{self._target} refused the request: {code.name}: {details}", retryable=False) from error
        self._counters.inc(RETRIES, code.name)
        if code == grpc.StatusCode.UNAVAILABLE:
            self._reset_channel()
        logger.info("OTLP export to %s failed (%s: %s); retry in %.2fs", self._target, code.name, details, delay)
        return delay

    def _result(self, response: ExportProfilesServiceResponse, attempts: int) -> ExportResult:
        partial = response.partial_success
        rejected, message = int(partial.rejected_profiles), str(partial.error_message)
        if rejected > 0:
            self._counters.inc(REQUESTS, "partial")
            self._counters.inc(REJECTED_PROFILES, n=rejected)
            logger.warning("OTLP receiver %s rejected %d profiles: %s", self._target, rejected, message)
        else:
            self._counters.inc(REQUESTS, "success")
            if message:
                logger.warning("OTLP receiver %s accepted the request with a warning: %s", self._target, message)
        return ExportResult(rejected, message, attempts)

    def _stub(self) -> ProfilesServiceStub:
        with self._lock:
            if self._channel is None:
                self._channel = self._new_channel()
            return ProfilesServiceStub(self._channel)

    def _reset_channel(self) -> None:
        # A broken connection or a moved server: the next attempt dials again from scratch.
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _new_channel(self) -> grpc.Channel:
        options = [("grpc.primary_user_agent", f"profiling-agent/{__version__}")]
        if self._credentials is None:
            return grpc.insecure_channel(self._target, options=options, compression=self._compression)
        return grpc.secure_channel(self._target, self._credentials, options=options, compression=self._compression)


def _tls_credentials(config: OtlpConfig) -> grpc.ChannelCredentials:
    root = read_pem("ca_file", config.ca_file) if config.ca_file else None
    cert = read_pem("cert_file", config.cert_file) if config.cert_file else None
    key = read_pem("key_file", config.key_file) if config.key_file else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
