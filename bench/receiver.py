"""Benchmark helper: a minimal local OTLP profiles receiver (gRPC on 127.0.0.1), run as its own process.

`python -m bench.receiver --port N` accepts every `ProfilesService/Export` request, counts requests and
bytes and answers with an empty (fully successful) response. It prints `listening` once bound and, on
SIGTERM or SIGINT, one JSON line `{"requests": n, "bytes": n}` before exiting. It stands in for a
collector so that the agent's export path (encode, spool, send) runs while its cost is measured,
without a collector's own CPU on this two-core machine.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from types import FrameType
from typing import Any

import grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2, profiles_service_pb2_grpc


class CountingReceiver(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        size = request.ByteSize()
        with self._lock:
            self.requests += 1
            self.bytes += size
        return profiles_service_pb2.ExportProfilesServiceResponse()


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
    print(json.dumps({"requests": receiver.requests, "bytes": receiver.bytes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
