"""Benchmark helper: a minimal local OTLP profiles receiver (gRPC on 127.0.0.1), run as its own process.

`python -m bench.receiver --port N` accepts every `ProfilesService/Export` request, counts requests,
bytes and events, and answers with an empty (fully successful) response. It prints `listening` once
bound and, on SIGTERM or SIGINT, one JSON line `{"requests": n, "bytes": n, "events_by_second": {...}}`
before exiting. Events are counted by the second of their timestamps (Unix time), so that a benchmark
can count what a sender delivered for a window of its own whatever its reporting interval: a sample
with timestamps is one event per timestamp unless it carries a value (then the value, at its first
timestamp); a sample with a value and no timestamps counts at its profile's start. It stands in for a
collector so that the agent's export path (encode, spool, send) runs while its cost is measured,
without a collector's own CPU on this two-core machine.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2, profiles_service_pb2_grpc

from bench.agent import free_port

NS = 1_000_000_000


class CountingReceiver(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.events: dict[int, int] = {}

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        size = request.ByteSize()
        events = events_by_second(request)
        with self._lock:
            self.requests += 1
            self.bytes += size
            for second, count in events.items():
                self.events[second] = self.events.get(second, 0) + count
        return profiles_service_pb2.ExportProfilesServiceResponse()


def start_receiver(log: Path) -> tuple[subprocess.Popen[str], str]:
    """This module as a process on a free port of 127.0.0.1, once it listens: (process, endpoint)."""
    port = free_port()
    with open(log, "w") as stderr:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "bench.receiver", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert receiver.stdout is not None
    if receiver.stdout.readline().strip() != "listening":
        raise RuntimeError(f"the OTLP receiver did not start (see {log})")
    return receiver, f"127.0.0.1:{port}"


def stop_receiver(receiver: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop it and return its totals (the JSON line it prints on exit; empty if it printed none)."""
    receiver.terminate()
    out, _ = receiver.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    totals: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return totals


def events_by_second(request: Any) -> dict[int, int]:
    """Events of one Export request by the Unix second they happened in (see the module docstring)."""
    found: dict[int, int] = {}
    for resource in request.resource_profiles:
        for scope in resource.scope_profiles:
            for profile in scope.profiles:
                for sample in profile.samples:
                    stamps = sample.timestamps_unix_nano
                    if sample.values:
                        second = (stamps[0] if stamps else profile.time_unix_nano) // NS
                        found[second] = found.get(second, 0) + int(sample.values[0])
                        continue
                    for stamp in stamps:
                        found[stamp // NS] = found.get(stamp // NS, 0) + 1
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    receiver = CountingReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.max_receive_message_length", -1)])
    profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("listening", flush=True)
    while not stop.wait(1.0):
        pass
    server.stop(grace=1.0).wait()
    totals = {"requests": receiver.requests, "bytes": receiver.bytes, "events_by_second": receiver.events}
    print(json.dumps(totals), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
