"""The daemon: wires the stages together and owns every thread the agent runs.

Start-up, in order: preflight, sinks (exporters), load and attach BPF, start the reader, pipeline and
report threads, then sampling is live. Every wait is `stop_event.wait(timeout)`, so a signal (whose
handler only sets the event) interrupts ticks at once. Shutdown, in order: stop sampling, drain the
perf buffers, flush the partial interval through the pipeline and the sinks, detach and unload BPF,
then shut the sinks down with what remains of the deadline.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from agent.aggregate.types import IntervalProfile
from agent.config import AgentConfig
from agent.errors import PreflightError
from agent.export.files import FileSink
from agent.export.otlp.sink import OtlpSink
from agent.export.sink import Sink
from agent.pipeline import Pipeline, Stream
from agent.preflight import run_checks
from agent.probes.events import IntervalMark
from agent.probes.loader import release_compiler_memory
from agent.probes.queue import DropOldestQueue
from agent.probes.reader import PerfReader
from agent.probes.registry import make_probes
from agent.report import Reporter
from agent.symbolize.symbolizer import Symbolizer

logger = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
# Spread a fleet's reports so backends do not see every host at once.
INTERVAL_JITTER = 0.2
SHUTDOWN_DEADLINE_S = 10.0
REPORT_QUEUE_SIZE = 4


@dataclass(slots=True)
class _Threads:
    reader: threading.Thread
    pipeline: threading.Thread
    reporter: threading.Thread
    senders: list[threading.Thread]


class Daemon:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self._rotate = threading.Event()
        self._events: DropOldestQueue[object] = DropOldestQueue(config.profiling.queue_size)
        self._intervals: DropOldestQueue[IntervalProfile | None] = DropOldestQueue(REPORT_QUEUE_SIZE)
        self._reader_done = threading.Event()
        self.sinks: list[Sink] = []
        self.otlp: OtlpSink | None = None
        self.probes = make_probes(config.profiling, self._events.put)
        self._reader: PerfReader | None = None
        self._sender_stop = threading.Event()
        self.symbolizer = Symbolizer(
            elf_cache_size=config.symbolize.elf_cache_size,
            process_ttl_intervals=config.symbolize.process_ttl_intervals,
        )
        self.reporter: Reporter | None = None

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()  # nothing else: no logging, no I/O in a signal handler

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def run(self) -> int:
        report = run_checks()
        if not report.ok:
            raise PreflightError(report.render())
        self.sinks = self._make_sinks()
        self.reporter = Reporter(self.symbolizer, self.sinks)
        try:
            for probe in self.probes:
                probe.load()
            release_compiler_memory()
            for probe in self.probes:
                probe.attach()
            self._reader = PerfReader(self.probes)
            started = time.monotonic()
            logger.info("profiling started: %s", self._describe())
            threads = self._start_threads()
            self._tick_until_stopped(started)
            self._shutdown(threads)
        finally:
            for probe in self.probes:
                probe.close()
            for sink in self.sinks:
                sink.shutdown(0.0)  # after a clean shutdown this does nothing; after a failure it spools
        logger.info("profiling stopped")
        return 0

    def _describe(self) -> str:
        cfg = self.config.profiling
        scope = f"pids {','.join(map(str, cfg.pids))}" if cfg.pids else "all processes"
        sinks = ", ".join(sink.name for sink in self.sinks)
        probes = "; ".join(f"{probe.name}: {probe.attach_method}" for probe in self.probes)
        return f"{probes}; {scope}; every ~{cfg.interval_s:g} s to {sinks}"

    def _make_sinks(self) -> list[Sink]:
        files, otlp = self.config.export.files, self.config.export.otlp
        sinks: list[Sink] = []
        if self.config.files_enabled:
            sinks.append(FileSink(Path(files.output_dir), files.max_files, files.max_bytes))
        if otlp.enabled:
            self.otlp = OtlpSink(otlp)
            sinks.append(self.otlp)
        return sinks

    def _start_threads(self) -> _Threads:
        assert self.reporter is not None
        streams = {}
        for probe in self.probes:
            assert probe.stacks is not None, "probes are loaded before threads start"
            streams[probe.name] = Stream(probe.spec, probe.stacks)
        pipeline = Pipeline(streams, self.symbolizer, self._intervals.put)
        # Sinks that deliver in the background get their own thread; it runs until the agent stops.
        senders = []
        if self.otlp is not None:
            senders.append(
                threading.Thread(target=self.otlp.run, args=(self._sender_stop,), name="otlp-sender", daemon=True)
            )
        threads = _Threads(
            reader=threading.Thread(target=self._read_loop, name="perf-reader", daemon=True),
            pipeline=threading.Thread(target=self._pipeline_loop, args=(pipeline,), name="pipeline", daemon=True),
            reporter=threading.Thread(target=self._report_loop, args=(self.reporter,), name="report", daemon=True),
            senders=senders,
        )
        for thread in (threads.reader, threads.pipeline, threads.reporter, *threads.senders):
            thread.start()
        return threads

    def _tick_until_stopped(self, started: float) -> None:
        cfg = self.config.profiling
        end = started + cfg.duration_s if cfg.duration_s > 0 else float("inf")
        next_tick = started + _jittered(cfg.interval_s)
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_tick:
                self._rotate.set()
                next_tick = now + _jittered(cfg.interval_s)
            self.stop_event.wait(max(0.0, min(next_tick, end) - now))

    def _shutdown(self, threads: _Threads) -> None:
        """Stop sampling and flush the pipeline; the sinks' own shutdown gets what remains of the deadline."""
        self.stop_event.set()
        deadline = time.monotonic() + SHUTDOWN_DEADLINE_S
        for thread in (threads.reader, threads.pipeline, threads.reporter):
            thread.join(max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                logger.error("%s thread did not finish within the shutdown deadline", thread.name)
        # The final profiles are queued in the sinks now. Stop the background senders' loops (their
        # backoff waits end at once), then each sink flushes what it holds within the remaining time
        # and keeps the rest (the OTLP spool survives restarts).
        self._sender_stop.set()
        for sink in self.sinks:
            sink.shutdown(max(0.0, deadline - time.monotonic()))
        for thread in threads.senders:
            thread.join(max(0.1, deadline - time.monotonic()))

    # Thread bodies. Each catches everything at the top so one bad interval cannot kill the agent.

    def _read_loop(self) -> None:
        try:
            assert self._reader is not None
            while not self.stop_event.is_set():
                self._reader.poll(POLL_TIMEOUT_MS)
                if self._rotate.is_set():
                    self._rotate.clear()
                    self._reader.drain()
                    self._events.put(IntervalMark(time.monotonic_ns()))
        except Exception:
            logger.exception("perf-buffer reader failed; stopping the agent")
            self.stop_event.set()
        finally:
            # Stop sampling first so the final drain sees everything that was sampled.
            for probe in self.probes:
                probe.stop_sampling()
            try:
                for probe in self.probes:
                    probe.drain()
            except Exception:
                logger.exception("final drain of the perf buffers failed")
            self._events.put(IntervalMark(time.monotonic_ns(), final=True))
            self._reader_done.set()

    def _pipeline_loop(self, pipeline: Pipeline) -> None:
        try:
            _consume(self._events, pipeline.handle, lambda: self._reader_done.is_set() and not len(self._events))
        except Exception:
            logger.exception("pipeline failed; stopping the agent")
            self.stop_event.set()
        finally:
            self._intervals.put(None)

    def _report_loop(self, reporter: Reporter) -> None:
        while True:
            for interval in self._intervals.get_batch(timeout=1.0):
                if interval is None:
                    return
                try:
                    reporter.report(interval)
                except Exception:
                    logger.exception("reporting the %s interval failed; continuing", interval.spec.name)


def _consume(queue: DropOldestQueue[object], handle: Callable[[object], bool], exhausted: Callable[[], bool]) -> None:
    """Feed queued items to `handle` until it reports the final interval (or the reader died)."""
    while True:
        batch = queue.get_batch(timeout=0.5)
        for item in batch:
            if handle(item):
                return
        if not batch and exhausted():
            return


def _jittered(interval_s: float) -> float:
    return interval_s * random.uniform(1 - INTERVAL_JITTER, 1 + INTERVAL_JITTER)
