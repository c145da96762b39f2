"""Export stage, OTLP sink: thread-safe counters the metrics module reads at scrape time.

The sink's `export()` (on the report thread), its sender loop and the spool all write here from different
threads; `agent/metrics.py` later turns a `snapshot()` into `profiling_agent_export_otlp_*` series
with the label kept here (outcome, reason or gRPC code).
"""

from __future__ import annotations

import threading
from collections import Counter, deque

# Counter names. The label says which outcome, reason or code.
REQUESTS = "requests"  # label: success | partial | rejected | expired (retry deadline) | interrupted (stop)
RETRIES = "retries"  # label: gRPC status code name
# label: rejected | spool_full | disk_full | memory_full | corrupt | unsaved_at_exit | interrupted_write (a
# spool file the previous run was killed while writing)
DROPPED = "dropped_batches"
REJECTED_PROFILES = "rejected_profiles"  # from partial_success.rejected_profiles
SPOOL_ERRORS = "spool_errors"  # label: write | read | delete
HTLHASH_UNREADABLE = "htlhash_unreadable"  # mapping files whose htlhash could not be computed
ENCODE_ERRORS = "encode_errors"

# The labels each labelled counter can take, exported at 0 from the start so alerts can be written on
# them. Retries add their gRPC codes (`agent.export.otlp.retry`).
KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    REQUESTS: ("success", "partial", "rejected", "expired", "interrupted"),
    DROPPED: ("rejected", "spool_full", "disk_full", "memory_full", "corrupt", "unsaved_at_exit", "interrupted_write"),
    SPOOL_ERRORS: ("write", "read", "delete"),
}


class Counters:
    """Monotonic counters keyed by (name, label), plus a bounded buffer of export latencies."""

    def __init__(self, latency_capacity: int = 1024) -> None:
        self._lock = threading.Lock()
        self._values: Counter[tuple[str, str]] = Counter()
        # The metrics collector drains these into a histogram; bounded so nobody scraping costs memory.
        self._latencies: deque[float] = deque(maxlen=latency_capacity)

    def inc(self, name: str, label: str = "", n: int = 1) -> None:
        with self._lock:
            self._values[(name, label)] += n

    def declare(self, known: dict[str, tuple[str, ...]]) -> None:
        """Make each (name, label) exist at 0, so a snapshot has it before the first increment."""
        with self._lock:
            for name, labels in known.items():
                for label in labels:
                    self._values.setdefault((name, label), 0)

    def get(self, name: str, label: str = "") -> int:
        with self._lock:
            return self._values[(name, label)]

    def total(self, name: str) -> int:
        with self._lock:
            return sum(v for (n, _), v in self._values.items() if n == name)

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._values)

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def drain_latencies(self) -> list[float]:
        with self._lock:
            drained = list(self._latencies)
            self._latencies.clear()
            return drained
