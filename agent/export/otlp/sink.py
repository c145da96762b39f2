"""Export stage, OTLP sink: `OtlpSink`, the Sink that ships profiles to an OTLP/gRPC receiver.

`export()` runs on the report thread: it encodes the profile, spools the requests and returns,
never touching the network. `run()` is the sender loop, run by the daemon on a thread it owns: it
delivers the spooled requests one at a time, oldest first, so they arrive in order; a request stays
spooled until it is delivered or refused for good. `shutdown()` stops the loop, flushes what it can
within its deadline and leaves the rest in the spool for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from agent.errors import ExportError
from agent.export.otlp.config import OtlpConfig
from agent.export.otlp.dictionary import AttrValue
from agent.export.otlp.encode import encode_request
from agent.export.otlp.exporter import OtlpExporter
from agent.export.otlp.fileid import FileIdCache
from agent.export.otlp.resource import ResourceOptions
from agent.export.otlp.retry import RetryPolicy, retried_code_names
from agent.export.otlp.spool import Spool, SpoolEntry
from agent.export.otlp.stats import DROPPED, ENCODE_ERRORS, KNOWN_LABELS, REQUESTS, RETRIES, Counters
from agent.symbolize.types import Profile

logger = logging.getLogger(__name__)

ResourceHook = Callable[[int], Mapping[str, AttrValue]]


class OtlpSink:
    """Encode, spool and deliver profiles as OTLP; see the module docstring for the threads involved."""

    name = "otlp"

    def __init__(
        self,
        config: OtlpConfig,
        *,
        resource: ResourceOptions | None = None,
        resource_hook: ResourceHook | None = None,
        proc_root: str = "/proc",
        retry_policy: RetryPolicy | None = None,
        idle_wait_s: float = 1.0,
        counters: Counters | None = None,
    ) -> None:
        """`resource_hook(pid)` returns extra resource attributes of a process (e.g. `container.id`)."""
        config.validate()
        self._config = config
        self.needs_pprof = config.include_pprof  # otherwise requests are encoded from the profile alone
        self.counters = counters or Counters()
        self.counters.declare({**KNOWN_LABELS, RETRIES: retried_code_names()})
        self._resource = resource or ResourceOptions.detect(config.service_name)
        self._resource_hook = resource_hook
        self._policy = retry_policy or RetryPolicy()
        self._idle_wait_s = idle_wait_s
        self._file_ids = FileIdCache(self.counters, proc_root)
        self._spool = Spool(config.spool_dir, config.spool_max_bytes, config.queue_size, self.counters)
        self._exporter = OtlpExporter(config, self.counters, self._policy)
        self._encode_lock = threading.Lock()
        self._wakeup = threading.Event()  # set by export() and shutdown(): there is work, or it is time to stop
        self._closing = threading.Event()
        self._sending = threading.Lock()  # held by whoever delivers: run(), or shutdown()'s flush
        self._shutdown_lock = threading.Lock()
        self._shut_down = False

    def export(self, profile: Profile, pprof: bytes) -> tuple[int, ...]:
        """Encode and spool one profile; returns the spool sequence numbers of its requests.

        Raises ExportError(retryable=False) only when the profile cannot be encoded; delivery problems
        never surface here (the sender loop owns them).
        """
        try:
            with self._encode_lock:
                extra = None
                if self._resource_hook is not None:
                    extra = {pid: self._resource_hook(pid) for pid in profile.processes}
                requests = encode_request(
                    [(profile, pprof)],
                    self._resource,
                    self._config.include_pprof,
                    extra_resource=extra,
                    file_ids=self._file_ids,
                )
        except Exception as e:
            self.counters.inc(ENCODE_ERRORS)
            raise ExportError(f"cannot encode the {profile.spec.name} profile as OTLP: {e!r}", retryable=False) from e
        seqs = tuple(self._spool.append(request.SerializeToString()) for request in requests)
        if seqs:
            self._wakeup.set()
        return seqs

    def run(self, stop_event: threading.Event) -> None:
        """Deliver spooled requests in order until `stop_event` is set or `shutdown()` is called."""
        with self._sending:
            failures = 0
            while not (stop_event.is_set() or self._closing.is_set()):
                self._wakeup.clear()
                entry = self._spool.peek()
                if entry is None:
                    # export() and shutdown() set the wakeup event; the timeout bounds how late a set
                    # stop_event is noticed while idle.
                    self._wakeup.wait(self._idle_wait_s)
                    continue
                try:
                    done = self._deliver(entry, stop_event, time.monotonic() + self._config.retry_deadline_s)
                except Exception:
                    logger.exception("OTLP sender failed on request %d", entry.seq)
                    done = False
                failures = 0 if done else failures + 1
                if not done:
                    # The exporter gave up (receiver away for the whole retry deadline): pause, then go on.
                    stop_event.wait(self._policy.backoff(min(failures, 16)))

    def shutdown(self, deadline_s: float) -> None:
        """Flush within `deadline_s`, leaving what is left in the spool; a second call does nothing."""
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
        end = time.monotonic() + max(deadline_s, 0.0)
        self._closing.set()
        self._wakeup.set()
        # run() finishes the request in hand (its waits end when the daemon sets its stop event).
        if self._sending.acquire(timeout=max(end - time.monotonic(), 0.0)):
            try:
                self._flush(end)
            finally:
                self._sending.release()
        else:
            logger.warning("OTLP sender still busy at shutdown; leaving its requests in the spool")
        self._exporter.close()
        kept, lost = self._spool.close()
        if kept:
            logger.info("OTLP: %d requests (%d bytes) left in the spool for the next start", kept, self.spool_bytes)
        if lost:
            logger.warning(
                "OTLP: %d undelivered requests are lost: the spool disk refused them, so they were held in memory only",
                lost,
            )

    @property
    def queue_depth(self) -> int:
        return len(self._spool)

    def delivered(self) -> int:
        """Requests that left the spool: accepted, partly accepted, or refused for good."""
        return sum(self.counters.get(REQUESTS, outcome) for outcome in ("success", "partial", "rejected"))

    @property
    def spool_bytes(self) -> int:
        return self._spool.disk_bytes

    def _flush(self, end: float) -> None:
        never = threading.Event()  # the deadline alone bounds the flush
        while time.monotonic() < end:
            entry = self._spool.peek()
            if entry is None or not self._deliver(entry, never, end):
                return

    def _deliver(self, entry: SpoolEntry, stop_event: threading.Event, deadline: float) -> bool:
        """Send one request; True when it left the spool (delivered or refused for good)."""
        try:
            self._exporter.export(entry.payload, stop_event, deadline)
        except ExportError as e:
            if e.retryable:
                logger.info("OTLP request %d kept in the spool: %s", entry.seq, e)
                return False
            self.counters.inc(DROPPED, "rejected")
            logger.warning("OTLP request %d dropped: %s", entry.seq, e)
        self._spool.remove(entry.seq)
        return True
