"""The daemon: wires the stages together and owns every thread the agent runs.

Start-up, in order: preflight, sinks (exporters), the metrics server, load and attach BPF, start the
reader, pipeline, report and sender threads, then READY=1. The main thread ticks the intervals; every
wait is an `Event.wait(timeout)`, so a signal (whose handler only sets events) interrupts it at once.
Shutdown, in order: stop sampling, drain the perf buffers, flush the partial interval through the
pipeline and the sinks (within the deadline), unload BPF, stop the metrics server. SIGHUP reloads the
config file (see `agent.reload`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import ThreadingHTTPServer
from types import FrameType

from agent import logs
from agent.aggregate.types import IntervalProfile
from agent.config import AgentConfig
from agent.errors import ConfigError, PreflightError
from agent.export.files import FileSink
from agent.export.otlp.resource import ResourceOptions
from agent.export.otlp.sink import OtlpSink
from agent.export.sink import Sink
from agent.flow.jvm import JavaFrames
from agent.flow.pipeline import Pipeline
from agent.flow.python import PythonFrames
from agent.flow.queue import DropOldestQueue
from agent.flow.report import Reporter
from agent.flow.sinks import make_file_sink
from agent.health import HealthState, make_server
from agent.metadata.process import ProcessMetadata
from agent.metadata.selector import ProcessSelector
from agent.metrics import QueueStats, make_registry
from agent.preflight import run_checks
from agent.probes.events import IntervalMark
from agent.probes.loader import release_compiler_memory
from agent.probes.program import ProbeProgram
from agent.probes.reader import PerfReader
from agent.probes.registry import make_probes, stack_copy_bytes
from agent.process.jvm.methods import MethodReader
from agent.process.python.code_cache import CodeCache
from agent.process.python.discover import running_pythons
from agent.process.python.inspect import PythonInspector
from agent.process.python.runtime import CodeResolver, discover_interpreter
from agent.process.registry import ProcessRegistry
from agent.reload import changed_keys, is_live, merge_live
from agent.sampling.adaptive import AdaptiveSampler
from agent.sampling.keep import KeepSampler
from agent.sdnotify import Notifier
from agent.symbolize.jvm import JvmPerfMapRequester
from agent.symbolize.symbolizer import Symbolizer
from agent.unwind.unwinder import Unwinder

logger = logging.getLogger(__name__)

# The reader also notices interval ends and shutdown between polls: a mark is queued at most this late.
# Records wake it themselves (batched wakeups), so a longer timeout only saves idle wake-ups.
POLL_TIMEOUT_MS = 500
# With the Python walker loaded, records below the wakeup threshold are read at least this often while
# the reads are eager (`_ReadPace`): the pipeline reads a process's code objects from its memory when
# its events arrive, and a short-lived process (a script, a cron job) would otherwise be gone by then,
# its frames `[unknown python code]`.
PYTHON_READ_LAG_MS = 100
# Eager for this long after a process was announced or exec'd: it may be a short-lived interpreter,
# which the pipeline inspects and enables meanwhile (then `PythonFrames.eager` keeps the pace).
ANNOUNCED_EAGER_S = 2.0
GIL_SWITCH_INTERVAL_S = 0.0005
SERVER_POLL_S = 1.0
# Spread a fleet's reports so backends do not see every host at once.
INTERVAL_JITTER = 0.2
SHUTDOWN_DEADLINE_S = 10.0
# The sinks' final flush at shutdown, within that deadline: what a slow or silent receiver has not
# taken by then stays in the OTLP spool for the next start (the README promises an exit within seconds).
SHUTDOWN_FLUSH_S = 3.0
REPORT_QUEUE_SIZE = 4
CONSUME_WAIT_S = 1.0  # the longest stack events wait for the pipeline thread (process events wake it at once)
CODE_CACHE_ENTRIES = 65536  # code objects of Python processes, over all of them (a few hundred bytes each)

ConfigLoader = Callable[[], AgentConfig]
RELOAD_OUTCOMES = ("applied", "invalid", "ignored")  # of a SIGHUP


class Daemon:
    def __init__(self, config: AgentConfig, reload_config: ConfigLoader | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.stop_event = threading.Event()
        self._wake = threading.Event()  # interrupts the main loop: stop or reload
        self._reload_requested = threading.Event()
        self._rotate = threading.Event()
        self._sender_stop = threading.Event()
        self._reader_done = threading.Event()
        self._events: DropOldestQueue[object] = DropOldestQueue(config.profiling.queue_size)
        self._intervals: DropOldestQueue[IntervalProfile | None] = DropOldestQueue(REPORT_QUEUE_SIZE)
        self.metadata = ProcessMetadata()
        # One registry of process snapshots, read by the pipeline, the unwind and the symbolize stages.
        self.processes = ProcessRegistry(ttl_intervals=config.symbolize.process_ttl_intervals, metadata=self.metadata)
        # Python frames: the inspector and the code objects it resolves, which the symbolizer names from.
        self.python_inspector: PythonInspector | None = None
        self.python_codes: CodeResolver | None = None
        if config.python.enabled:
            self.python_inspector = PythonInspector(discover_interpreter())
            self.python_codes = CodeResolver(CodeCache(CODE_CACHE_ENTRIES), self.python_inspector)
        # Java frames: the pipeline's JVM flow, made once the unwinder exists (it reads the interpreter
        # frames of stack copies); the symbolizer asks it for each JVM's method reader.
        self.java: JavaFrames | None = None
        self.symbolizer = Symbolizer(
            self.processes,
            elf_cache_size=config.symbolize.elf_cache_size,
            python=self.python_codes,
            java=self._java_reader,
        )
        symbolize = config.symbolize
        self.jvm = JvmPerfMapRequester(symbolize.jvm_perf_map_interval_s) if symbolize.jvm_perf_map else None
        self.selector = ProcessSelector(config.filters, self.metadata)
        self.keep = KeepSampler(profilers=config.profiling.profilers)
        # Only profilers whose programs copy the user stack need the unwind stage; their decoders run it,
        # but for bursty profilers, whose copies the pipeline unwinds.
        copy_bytes = stack_copy_bytes(config)
        self.unwinder: Unwinder | None = None
        if any(copy_bytes.values()):
            self.unwinder = Unwinder(snapshots=self.processes.get, skip=self.selector.known_rejected)
        unwind = self.unwinder.unwind_copy if self.unwinder is not None else None
        if config.jvm.enabled and self.unwinder is not None:
            self.java = JavaFrames(self.processes.get, self.unwinder)
        self.probes = make_probes(config, self._events.put, copy_bytes, unwind)
        self.program = ProbeProgram(
            config.profiling, self.probes, self._events.put, config.python, announced=self.processes.announced
        )
        self.sampler: AdaptiveSampler | None = None
        self.sinks: list[Sink] = []
        self.otlp: OtlpSink | None = None
        self.reporter: Reporter | None = None
        self.pipeline: Pipeline | None = None
        # The pipeline's part of Python frames, once the program is loaded with the walker's maps; without
        # the walker (no fsbase offset) nothing is inspected, and the metrics say nothing of Python.
        self.python: PythonFrames | None = None
        if self.program.python_unavailable:
            logger.info("Python frames off: %s", self.program.python_unavailable)
            self.python_inspector = self.python_codes = None
        self.health = HealthState(config.metrics.ready_export_failure_s)
        self.notifier = Notifier(config.notify_socket or None)
        self.reloads: Counter[str] = Counter(dict.fromkeys(RELOAD_OUTCOMES, 0))
        self._reader: PerfReader | None = None
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    def _java_reader(self, pid: int) -> MethodReader | None:
        return self.java.reader(pid) if self.java is not None else None

    # What the metrics collector reads (agent.metrics.MetricsSource).
    @property
    def queues(self) -> dict[str, QueueStats]:
        return {"events": self._events, "intervals": self._intervals}

    @property
    def sampling_parameters(self) -> dict[tuple[str, str], float]:
        values = {(probe.name, name): value for probe in self.probes for name, value in probe.parameters().items()}
        return values | (self.sampler.parameters() if self.sampler is not None else {})

    def install_signal_handlers(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()  # only events: no logging, no I/O in a signal handler
            self._wake.set()

        def on_reload(signum: int, frame: FrameType | None) -> None:
            self._reload_requested.set()
            self._wake.set()

        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def run(self) -> int:
        report = run_checks()
        if not report.ok:
            raise PreflightError(report.render())
        self._make_sinks()
        self._start_metrics_server()
        try:
            self._load_and_attach()
            started = time.monotonic()
            self._start_threads()
            self.health.attached = True
            self.notifier.ready()
            self.notifier.status(f"profiling: {self._describe()}")
            logger.info("profiling started: %s", self._describe())
            self._tick_until_stopped(started)
            self.notifier.stopping()
            self._shutdown()
        finally:
            if self._reader is not None:
                self._reader.close()
            self.program.close()
            for sink in self.sinks:
                sink.shutdown(0.0)  # after a clean shutdown this does nothing; after a failure it spools
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
        logger.info("profiling stopped")
        return 0

    def _load_and_attach(self) -> None:
        self.program.load()
        release_compiler_memory()
        maps = self.program.python_maps
        if maps is not None and self.python_inspector is not None and self.python_codes is not None:
            self.python = PythonFrames(self.python_inspector, maps, self.python_codes)
        else:
            self.python_inspector = self.python_codes = None  # loaded without the walker: nothing to inspect
        self.program.attach()
        self._reader = PerfReader(self.program)
        if self.unwinder is not None:
            self.unwinder.catch_up = self._reader.read_announcements
        self.sampler = AdaptiveSampler(self.config.sampling, self.probes, self.keep)

    def _describe(self) -> str:
        cfg = self.config.profiling
        scope = f"pids {','.join(map(str, cfg.pids))}" if cfg.pids else "all processes"
        probes = "; ".join(f"{probe.name}: {probe.attach_method}" for probe in self.probes)
        sinks = ", ".join(sink.name for sink in self.sinks) or "no sink"
        return f"{probes}; {scope}; every ~{self.config.profiling.interval_s:g} s to {sinks}"

    def _make_sinks(self) -> None:
        otlp = self.config.export.otlp
        file_sink = make_file_sink(self.config.export.files, self.config.files_enabled)
        self.sinks = [file_sink] if file_sink is not None else []
        if otlp.enabled:
            resource = ResourceOptions.detect(otlp.service_name, node_name=self.config.metadata.node_name)
            self.otlp = OtlpSink(otlp, resource=resource)
            self.sinks.append(self.otlp)
            self.health.backlogs["otlp"] = self.otlp
        self.reporter = Reporter(self.symbolizer, self.sinks)
        self.health.failures = self.reporter

    def _start_metrics_server(self) -> None:
        if not self.config.metrics.enabled:
            return
        address = self.config.metrics.address
        try:
            self._server = make_server(address, make_registry(self), self.health)
        except OSError as e:
            raise ConfigError("metrics.address", f"cannot listen on {address}: {e.strerror or e}") from e
        # serve_forever wakes every poll_interval to look for shutdown(): idle wake-ups cost CPU too.
        serve = functools.partial(self._server.serve_forever, poll_interval=SERVER_POLL_S)
        thread = threading.Thread(target=serve, name="metrics-http", daemon=True)
        thread.start()
        logger.info("metrics, /healthz and /readyz on http://%s/", address)

    def _start_threads(self) -> None:
        assert self.reporter is not None
        # The reader needs the GIL after each epoll wakeup (it then keeps it across a batch of records,
        # see agent.probes.reader). While another thread holds it (the report thread symbolizing, loading
        # an ELF file), the reader gets it only after the switch interval (5 ms by default), and a burst
        # overflows the buffers in the meantime: hand the GIL over sooner.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.pipeline = Pipeline(
            {probe.name: probe.spec for probe in self.probes},
            self.processes,
            self._intervals.put,
            self.selector,
            self.keep,
            self.unwinder,
            self.python,
            self.java,
        )
        if self.python is not None:  # inspected by the pipeline thread before they are first sampled
            pids = self.config.profiling.pids
            # Not the agent itself: BPF never samples it (AGENT_PID), and its own threads move under
            # the inspection's walk, which would log a validation failure at every start.
            me = os.getpid()
            self.pipeline.scan_python(p for p in running_pythons() if p != me and (not pids or p in pids))
        targets: list[tuple[str, Callable[[], None]]] = [
            ("perf-reader", self._read_loop),
            ("pipeline", self._pipeline_loop),
            ("report", self._report_loop),
        ]
        if self.otlp is not None:
            otlp = self.otlp
            targets.append(("otlp-sender", lambda: otlp.run(self._sender_stop)))
        self._threads = [threading.Thread(target=target, name=name, daemon=True) for name, target in targets]
        for thread in self._threads:
            thread.start()
        self.health.threads = list(self._threads)

    def _tick_until_stopped(self, started: float) -> None:
        """The main loop: interval ends (jittered), sampler adjustments and reloads, until stopped."""
        end = started + self.config.profiling.duration_s if self.config.profiling.duration_s > 0 else float("inf")
        next_tick = started + _jittered(self.config.profiling.interval_s)
        adjust_every = self.config.sampling.adjust_interval_s
        next_adjust = started + adjust_every
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= end:
                break
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                next_tick = self._reload(next_tick)
            if now >= next_adjust:
                self._adjust()
                next_adjust = now + adjust_every
            if now >= next_tick:
                self._rotate.set()
                next_tick = now + _jittered(self.config.profiling.interval_s)
            self._wake.wait(max(0.0, min(next_tick, next_adjust, end) - now))
            self._wake.clear()

    def _adjust(self) -> None:
        """Periodic upkeep of the probes and the sampler; a failure here is logged, never fatal."""
        try:
            for probe in self.probes:
                probe.refresh()
            if self.sampler is not None:
                self.sampler.tick()
            if self.jvm is not None:
                self.jvm.tick(self.symbolizer.take_unnamed_jit_pids())
        except Exception:
            logger.exception("adjusting the probes failed; continuing with the current settings")

    def _reload(self, next_tick: float) -> float:
        """Apply a SIGHUP'd config: live settings now, the rest after a restart. Returns the next tick."""
        if self._reload_config is None:
            logger.warning("SIGHUP ignored: the agent was started without a config file to reload")
            self.reloads["ignored"] += 1
            return next_tick
        try:
            new = self._reload_config()
        except ConfigError as e:
            self.reloads["invalid"] += 1
            for problem in e.problems:
                logger.error("config reload refused, the running configuration stays: %s", problem)
            return next_tick
        merged = merge_live(self.config, new)
        files_changed = merged.export.files != self.config.export.files
        try:  # a new output directory must be usable before anything of the reload is applied
            new_file = make_file_sink(merged.export.files, merged.files_enabled) if files_changed else None
        except ConfigError as e:
            self.reloads["invalid"] += 1
            logger.error("config reload refused, the running configuration stays: %s", e)
            return next_tick
        changed = changed_keys(self.config, new)
        restart_only = [key for key in changed if not is_live(key)]
        if restart_only:
            logger.warning("config reload: %s take effect only after a restart", ", ".join(restart_only))
        old, self.config = self.config, merged
        logs.configure(self.config.logging.level, self.config.logging.format)
        self.selector.set_filter(self.config.filters)
        self.health.set_limit(self.config.metrics.ready_export_failure_s)
        if files_changed:
            self._swap_file_sink(new_file)
        self.reloads["applied"] += 1
        logger.info("config reloaded: %s", ", ".join(key for key in changed if is_live(key)) or "no change")
        if old.profiling.interval_s != self.config.profiling.interval_s:
            return time.monotonic() + _jittered(self.config.profiling.interval_s)
        return next_tick

    def _swap_file_sink(self, new_file: FileSink | None) -> None:
        assert self.reporter is not None
        old_files = [sink for sink in self.sinks if sink is not self.otlp]
        self.sinks = ([new_file] if new_file is not None else []) + ([self.otlp] if self.otlp else [])
        self.reporter.set_sinks(self.sinks)
        for sink in old_files:
            sink.shutdown(1.0)

    def _shutdown(self) -> None:
        """Stop sampling and flush the pipeline; the sinks get what remains of the deadline."""
        self.stop_event.set()
        deadline = time.monotonic() + SHUTDOWN_DEADLINE_S
        senders = [thread for thread in self._threads if thread.name.endswith("-sender")]
        for thread in self._threads:
            if thread not in senders:
                thread.join(max(0.1, deadline - time.monotonic()))
                if thread.is_alive():
                    logger.error("%s thread did not finish within the shutdown deadline", thread.name)
        # The final profiles are in the sinks now. Stop the background senders' loops (their backoff
        # waits end at once), then each sink flushes what it holds within the remaining time and keeps
        # the rest (the OTLP spool survives restarts).
        self._sender_stop.set()
        flush_end = min(deadline, time.monotonic() + SHUTDOWN_FLUSH_S)
        for sink in self.sinks:
            sink.shutdown(max(0.0, flush_end - time.monotonic()))
        for thread in senders:
            thread.join(max(0.1, deadline - time.monotonic()))

    # Thread bodies. Each catches everything at the top so one bad interval cannot kill the agent.

    def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            pace = _ReadPace(self.program.process_events, self.python.eager) if self.python is not None else None
            while not self.stop_event.is_set():
                eager = pace is not None and pace.eager()
                self._reader.poll(PYTHON_READ_LAG_MS if eager else POLL_TIMEOUT_MS, read_on_timeout=eager)
                if self._rotate.is_set():
                    self._rotate.clear()
                    self._reader.drain()
                    self._events.put(IntervalMark(time.monotonic_ns()))
        except Exception:
            logger.exception("perf-buffer reader failed; stopping the agent")
            self.stop_event.set()
            self._wake.set()
        finally:
            # Stop sampling first so the final drain sees everything that was sampled.
            self.program.stop_sampling()
            try:
                self._reader.drain()
            except Exception:
                logger.exception("final drain of the perf buffers failed")
            self._events.put(IntervalMark(time.monotonic_ns(), final=True))
            self._reader_done.set()

    def _pipeline_loop(self) -> None:
        assert self.pipeline is not None
        try:
            _consume(
                self._events,
                self.pipeline.handle,
                lambda: self._reader_done.is_set() and not len(self._events),
                self.pipeline.poll,
            )
        except Exception:
            logger.exception("pipeline failed; stopping the agent")
            self.stop_event.set()
            self._wake.set()
        finally:
            self._intervals.put(None)

    def _report_loop(self) -> None:
        assert self.reporter is not None
        while True:
            for interval in self._intervals.get_batch(timeout=5.0):  # an interval (or None) wakes it at once
                if interval is None:
                    return
                try:
                    self.reporter.report(interval)
                except Exception:
                    logger.exception("reporting the %s interval failed; continuing", interval.spec.name)


class _ReadPace:
    """Whether the reader reads every PYTHON_READ_LAG_MS (eager) or waits for batched wakeups: eager
    for ANNOUNCED_EAGER_S after a process announcement, an exec or a Python walk's new code object,
    which the reader's own callbacks count (`process_events`, so they are seen before the pipeline has
    handled them: new code's samples would otherwise wait for a batched wakeup, past a short-lived
    process's exit), and while the pipeline says so (`PythonFrames.eager`: a process enabled or new code
    read just now)."""

    def __init__(
        self,
        process_events: Mapping[str, int],
        pipeline_eager: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._events = process_events
        self._pipeline_eager = pipeline_eager
        self._clock = clock
        self._seen = -1
        self._announced_at = -math.inf

    def eager(self) -> bool:
        seen = sum(self._events.get(kind, 0) for kind in ("new", "exec", "python_code"))
        if seen != self._seen:
            self._seen, self._announced_at = seen, self._clock()
        return self._clock() - self._announced_at < ANNOUNCED_EAGER_S or self._pipeline_eager()


def _consume(
    queue: DropOldestQueue[object],
    handle: Callable[[object], bool],
    exhausted: Callable[[], bool],
    poll: Callable[[float], float] = lambda limit: limit,
) -> None:
    """Feed queued items to `handle` until it reports the final interval (or the reader died); between
    batches, `poll` does the timed work and says how long the next wait may be."""
    while True:
        batch = queue.get_batch(timeout=poll(CONSUME_WAIT_S))  # marks and process events wake it at once
        for item in batch:
            if handle(item):
                return
        if not batch and exhausted():
            return


def _jittered(interval_s: float) -> float:
    return interval_s * random.uniform(1 - INTERVAL_JITTER, 1 + INTERVAL_JITTER)
