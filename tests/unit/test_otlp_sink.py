"""OtlpSink: nothing lost through a receiver outage and an agent restart, in order, exactly once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc as service
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
)

from agent.errors import ExportError
from agent.export.otlp import OtlpConfig, OtlpSink, ResourceOptions
from agent.export.otlp.retry import RetryPolicy
from agent.export.otlp.stats import DROPPED, ENCODE_ERRORS, REQUESTS, RETRIES
from agent.export.sink import Sink
from agent.symbolize.types import Frame, FrameKind, MappingInfo, ProcessInfo, Profile, Sample
from agent.types import ProfileSpec, ValueType

CPU = ProfileSpec(
    "cpu", (ValueType("samples", "count"), ValueType("cpu", "nanoseconds")), ValueType("cpu", "nanoseconds"), 1_000_000
)
BASE = 1_700_000_000_000_000_000
RESOURCE = ResourceOptions(host_name="h", host_arch="amd64")
FAST = RetryPolicy(base_s=0.02, max_s=0.05)


def _profile(interval: int) -> Profile:
    """Interval `interval`'s profile; its start time identifies it at the receiver."""
    start = BASE + interval * 1_000_000_000
    frame = Frame(FrameKind.NATIVE, 0x1000, "work", MappingInfo("/nonexistent/app", 0, 0x10000, 0))
    sample = Sample(10, 10, 0, "app", (frame,), (2, 2 * CPU.period), (start + 1, start + 2))
    return Profile(CPU, start, 1_000_000_000, (sample,), {10: ProcessInfo(10, "app", "/nonexistent/app")})


@dataclass
class Recorder(service.ProfilesServiceServicer):
    fail_first: list[grpc.StatusCode] = field(default_factory=list)
    received: list[ExportProfilesServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(
        self, request: ExportProfilesServiceRequest, context: grpc.ServicerContext
    ) -> ExportProfilesServiceResponse:
        with self.lock:
            code = self.fail_first.pop(0) if self.fail_first else None
            if code is None:
                self.received.append(request)
        if code is not None:
            context.abort(code, "scripted")
        return ExportProfilesServiceResponse()

    def intervals(self) -> list[int]:
        with self.lock:
            starts = [r.resource_profiles[0].scope_profiles[0].profiles[0].time_unix_nano for r in self.received]
        return [(s - BASE) // 1_000_000_000 for s in starts]


class Receiver:
    """A ProfilesService on a fixed 127.0.0.1 port that can be down, then come up."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.recorder = Recorder()
        self._server: grpc.Server | None = None

    def start(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service.add_ProfilesServiceServicer_to_server(self.recorder, self._server)
        assert self._server.add_insecure_port(f"127.0.0.1:{self.port}") == self.port
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)

    def wait_for(self, count: int, timeout_s: float = 15.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while len(self.recorder.intervals()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # a late duplicate would show up here
        return self.recorder.intervals()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def _sink(receiver: Receiver, spool: Path, **overrides: object) -> OtlpSink:
    settings: dict[str, object] = {
        "enabled": True,
        "endpoint": f"127.0.0.1:{receiver.port}",
        "insecure": True,
        "timeout_s": 0.5,
        "retry_deadline_s": 1.0,
        "spool_dir": str(spool),
        **overrides,
    }
    return OtlpSink(OtlpConfig(**settings), resource=RESOURCE, retry_policy=FAST, idle_wait_s=0.02)  # type: ignore[arg-type]


class Sender:
    """Runs `sink.run` on a thread, as the daemon does."""

    def __init__(self, sink: OtlpSink) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=sink.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_outage_for_the_first_third_loses_nothing(receiver: Receiver, tmp_path: Path) -> None:
    sink = _sink(receiver, tmp_path / "spool")
    sender = Sender(sink)
    for interval in range(9):
        if interval == 3:
            receiver.start()
        assert sink.export(_profile(interval), b"") != ()
        time.sleep(0.05)
    assert receiver.wait_for(9) == list(range(9))
    sender.halt()
    sink.shutdown(1.0)
    assert sink.queue_depth == 0 and sink.counters.total(DROPPED) == 0
    assert sink.counters.get(REQUESTS, "success") == 9
    assert sink.counters.get(RETRIES, "UNAVAILABLE") > 0  # the outage was real


def test_outage_across_an_agent_restart_loses_nothing(receiver: Receiver, tmp_path: Path) -> None:
    first = _sink(receiver, tmp_path / "spool")
    sender = Sender(first)
    for interval in range(3):
        first.export(_profile(interval), b"")
        time.sleep(0.05)
    sender.halt()  # the agent dies mid-outage: no shutdown, no flush
    assert first.queue_depth == 3

    second = _sink(receiver, tmp_path / "spool")
    assert second.queue_depth == 3
    sender = Sender(second)
    receiver.start()
    for interval in range(3, 9):
        second.export(_profile(interval), b"")
        time.sleep(0.05)
    assert receiver.wait_for(9) == list(range(9))
    sender.halt()
    second.shutdown(1.0)
    assert second.queue_depth == 0 and list((tmp_path / "spool").iterdir()) == []


def test_export_never_waits_for_the_network(receiver: Receiver, tmp_path: Path) -> None:
    sink = _sink(receiver, tmp_path / "spool", timeout_s=5.0)
    sender = Sender(sink)  # busy retrying against a receiver that is down
    started = time.monotonic()
    for interval in range(5):
        sink.export(_profile(interval), b"")
    assert time.monotonic() - started < 2.0 and sink.queue_depth == 5
    sender.halt()


def test_rejected_request_is_dropped_and_counted(receiver: Receiver, tmp_path: Path) -> None:
    receiver.recorder.fail_first = [grpc.StatusCode.INVALID_ARGUMENT]
    receiver.start()
    sink = _sink(receiver, tmp_path / "spool")
    sink.export(_profile(0), b"")
    sink.export(_profile(1), b"")
    sender = Sender(sink)
    assert receiver.wait_for(1) == [1]
    sender.halt()
    assert sink.counters.get(DROPPED, "rejected") == 1 and sink.queue_depth == 0


def test_shutdown_flushes_within_the_deadline_and_is_idempotent(receiver: Receiver, tmp_path: Path) -> None:
    receiver.start()
    sink = _sink(receiver, tmp_path / "spool")
    for interval in range(3):
        sink.export(_profile(interval), b"")
    sink.shutdown(5.0)  # no sender thread ever ran: shutdown itself delivers
    assert receiver.recorder.intervals() == [0, 1, 2] and sink.queue_depth == 0
    started = time.monotonic()
    sink.shutdown(5.0)
    assert time.monotonic() - started < 0.1
    sink.export(_profile(3), b"")  # after shutdown: kept for the next start, not sent
    assert sink.queue_depth == 1 and receiver.recorder.intervals() == [0, 1, 2]


def test_shutdown_with_the_receiver_away_leaves_the_rest_spooled(receiver: Receiver, tmp_path: Path) -> None:
    sink = _sink(receiver, tmp_path / "spool", timeout_s=5.0)
    sender = Sender(sink)
    sink.export(_profile(0), b"")
    sink.export(_profile(1), b"")
    sender.stop.set()  # the daemon stops its threads first, then shuts the sinks down
    started = time.monotonic()
    sink.shutdown(0.5)
    assert time.monotonic() - started < 2.5  # bounded by the deadline, not by the 5 s call timeout
    sender.halt()
    assert sink.queue_depth == 2 and len(list((tmp_path / "spool").glob("*.otlp"))) == 2


def test_shutdown_with_a_receiver_that_accepts_and_never_answers(tmp_path: Path) -> None:
    """A TCP listener that takes the connection and says nothing (no HTTP/2 handshake): the call in
    flight waits for its whole timeout. Seen: SIGTERM took 10.3 s. The sender's call is cancelled when
    it is told to stop, and the request stays in the spool."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    config = OtlpConfig(
        enabled=True,
        endpoint=f"127.0.0.1:{listener.getsockname()[1]}",
        insecure=True,
        timeout_s=30.0,
        retry_deadline_s=60.0,
        spool_dir=str(tmp_path / "spool"),
    )
    sink = OtlpSink(config, resource=RESOURCE, retry_policy=FAST, idle_wait_s=0.02)
    try:
        sender = Sender(sink)
        sink.export(_profile(0), b"")
        deadline = time.monotonic() + 20
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted, "the sender never connected"
        # As the daemon does: stop the senders, then shut the sinks down. The sender must let go of its
        # call at once (it used to keep it, and the sink's lock, for the 30 s call timeout): a 10 s
        # join leaves a busy host its margin and still fails the old behaviour.
        sender.stop.set()
        sender.thread.join(10)
        assert not sender.thread.is_alive(), "the sender kept its call after it was told to stop"
        assert sink.counters.get(REQUESTS, "interrupted") == 1
        sink.shutdown(0.5)
        assert sink.queue_depth == 1  # kept for the next start
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def test_unencodable_profile_is_counted_and_reported(receiver: Receiver, tmp_path: Path) -> None:
    sink = _sink(receiver, tmp_path / "spool")
    good = _profile(0)
    one_value = Sample(10, 10, 0, "app", good.samples[0].frames, (1,), ())  # the spec has two sample types
    bad = Profile(CPU, good.start_unix_ns, good.duration_ns, (one_value,), good.processes)
    with pytest.raises(ExportError) as info:
        sink.export(bad, b"")
    assert info.value.retryable is False
    assert sink.counters.get(ENCODE_ERRORS) == 1 and sink.queue_depth == 0
    assert sink.export(good, b"") != ()  # the next profile goes through


def test_is_a_sink(receiver: Receiver, tmp_path: Path) -> None:
    assert isinstance(_sink(receiver, tmp_path / "spool"), Sink)


def test_resource_hook_and_pprof_payload(receiver: Receiver, tmp_path: Path) -> None:
    receiver.start()
    settings = OtlpConfig(
        enabled=True,
        endpoint=f"127.0.0.1:{receiver.port}",
        insecure=True,
        spool_dir=str(tmp_path / "spool"),
        include_pprof=True,
    )
    sink = OtlpSink(settings, resource=RESOURCE, resource_hook=lambda pid: {"container.id": f"ctr-{pid}"})
    sink.export(_profile(0), b"PPROF")
    sink.shutdown(5.0)
    (request,) = receiver.recorder.received
    attributes = {kv.key: kv.value.string_value for kv in request.resource_profiles[0].resource.attributes}
    assert attributes["container.id"] == "ctr-10"
    profile = request.resource_profiles[0].scope_profiles[0].profiles[0]
    assert (profile.original_payload, profile.original_payload_format) == (b"PPROF", "pprof")
