"""Export stage, OTLP sink: the OTLP/gRPC retry policy.

Per the OTLP specification: CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE and
DATA_LOSS are retried; RESOURCE_EXHAUSTED only when the server attached a `google.rpc.RetryInfo`
(it is then throttling, not refusing); every other code is final. The wait is exponential
(`base * 2**n * uniform(0.8, 1.2)`, capped), except that a server's RetryInfo delay wins.
RetryInfo travels in the `grpc-status-details-bin` trailer as a serialized `google.rpc.Status`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 1.0  # first backoff, before jitter
    max_s: float = 32.0  # cap of one backoff (a server's RetryInfo may ask for longer)
    max_server_delay_s: float = 300.0  # a RetryInfo delay is believed up to this

    def backoff(self, attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """Delay before retry number `attempt` (0-based), jittered so a fleet does not retry in step."""
        return min(self.base_s * 2.0**attempt * uniform(0.8, 1.2), self.max_s)


def retry_info_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay in seconds attached to a failed call, or None when there is none."""
    if not callable(getattr(error, "trailing_metadata", None)):
        return None
    # grpcio returns (key, value) pairs here, whatever the typeshed stub says.
    trailers = cast("tuple[tuple[str, str | bytes], ...] | None", error.trailing_metadata())
    for key, value in trailers or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    delay: float = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                    return max(delay, 0.0)
        except Exception:  # a malformed trailer must not crash the sender; treat it as absent
            logger.debug("unparseable %s trailer", STATUS_DETAILS_KEY, exc_info=True)
    return None


def retried_code_names() -> tuple[str, ...]:
    """The gRPC codes a call can be retried after (the `code` label of the retry counter)."""
    return tuple(sorted(code.name for code in (*RETRYABLE_CODES, grpc.StatusCode.RESOURCE_EXHAUSTED)))


def retry_delay(code: grpc.StatusCode, server_delay: float | None, attempt: int, policy: RetryPolicy) -> float | None:
    """Seconds to wait before retrying a call that ended with `code`, or None when it is final."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None if server_delay is None else min(server_delay, policy.max_server_delay_s)
    if code not in RETRYABLE_CODES:
        return None
    if server_delay is not None:
        return min(server_delay, policy.max_server_delay_s)
    return policy.backoff(attempt)
