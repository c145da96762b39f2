"""Flow: what the pipeline thread does for Python processes (docs/python.md).

This module owns `PythonFrames`, which the pipeline calls:
- `on_exec(pid, exec_)` on every process event: the image may have changed, so the pid's BPF entries, its
  verdict and (on EXEC) its cached code objects go; a NEW announcement of the very image that has a
  verdict (a process inspected by the start-up scan, now first sampled) keeps them;
- `observe(pid)` when a process is announced (NEW) or first sampled without a verdict: inspect it
  (`agent.process.python.inspect.PythonInspector`) and, when walkable, enable it in BPF
  (`agent.probes.python_maps.PythonMaps`), writing its thread map when it is walked through one;
- `scan(pids)` once at start-up: the processes already running that look like CPython, inspected by
  `poll` (a slice at a time) so that they are walked from their first sample on;
- `poll(limit_s)` between batches: the scan's next slice, and the retries that are due. An exec'd
  interpreter is announced by its first sample, often before its runtime is ready (no libpython mapped
  yet, no thread state yet): that verdict (`retry`, state `initializing`) is not final, and the process
  is inspected again after `RETRY_DELAYS_S[n]`, until it is walkable or final (the last attempt's
  verdict is final whatever it says). `poll` returns how long the pipeline may wait for its next batch:
  until the next retry, and at most `RESOLVE_LAG_S` while `eager()`;
- `eager()`: whether a process was enabled, or a code object read for the first time, within the last
  `EAGER_S`. New code then tends to come in a run (an interpreter starting up, a short script), and
  the next samples may be a process's last: their code objects are read while it lives only if the
  events are read and resolved soon (the daemon's reader reads its buffers more often then too). Once
  every code object seen is cached, names come from the cache even after the process exits, and
  events wait for their batched wakeups, as without the walker. Reading 10 times a second all the
  time cost 0.4 points of a core on a host of two Python burners at 19 Hz (0.98% against 0.58%);
- `on_event(event)` for each kept stack event: resolve its Python frames' code objects now, while the
  process is alive (the CodeCache), shims skipped; an event of a thread-map process that found no
  thread state (a thread started since the map was written) refreshes the map, at most every
  `REFRESH_MIN_INTERVAL_S`;
- `end_interval()` at each interval end: the thread maps of thread-map processes are walked again
  (one walk of `interp->threads` per such process per interval), and verdicts of exited pids dropped
  one interval end after they were first found gone (the report thread names the interval they left
  with their runtime still known; their code objects stay in the bounded cache).

It starts no threads and holds no lock: everything runs on the pipeline thread.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from agent.probes.events import StackEvent
from agent.probes.records import PythonProcRecord
from agent.process.python.proc import PythonProcess, PythonProcSpec, PythonState
from agent.types import PYTHON_FRAME_FLAGS, PYTHON_FRAME_SHIM, InterpreterStatus

logger = logging.getLogger(__name__)

REFRESH_MIN_INTERVAL_S = 1.0  # a thread map is re-walked at most this often on missing-thread signals
# After a verdict marked `retry`, the process is inspected again after each of these in turn; the last
# attempt's verdict is final. CPython sets up _PyRuntime's interpreter and main thread state within a
# few milliseconds of starting on an idle machine (tens on a busy one), before its imports; an embedding
# application may start its interpreter later, hence the long tail (about 10 s in all).
RETRY_DELAYS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
SCAN_SLICE_S = 0.05  # the start-up scan inspects for about this long between two batches of events
RESOLVE_LAG_S = 0.1  # while eager(), events wait at most about this long to be resolved
EAGER_S = 2.0  # eager() for this long after a process was enabled or a code object was first read


class PythonMapsLike(Protocol):
    """The BPF maps' writer (`agent.probes.python_maps.PythonMaps`)."""

    def enable(self, pid: int, record: PythonProcRecord) -> bool: ...

    def disable(self, pid: int) -> None: ...

    def set_threads(self, pid: int, threads: Mapping[int, int]) -> bool: ...

    def forget(self, pid: int) -> None: ...


class InspectorLike(Protocol):
    """The process stage's inspector (`agent.process.python.inspect.PythonInspector`)."""

    def inspect(self, pid: int, retry: bool = False) -> PythonProcess: ...

    def get(self, pid: int) -> PythonProcess | None: ...

    def same_image(self, pid: int) -> bool: ...

    def forget(self, pid: int) -> None: ...

    def refresh_threads(self, pid: int) -> Mapping[int, int] | None: ...

    def pids(self) -> frozenset[int]: ...


class CodeResolverLike(Protocol):
    """Reads and caches code objects (`agent.process.python.code_cache.CodeCache`)."""

    def resolve(self, pid: int, key: int) -> object: ...

    def forget(self, pid: int) -> None: ...

    def release(self, pid: int) -> None: ...

    @property
    def reads(self) -> int:
        """How many times a code object was looked for in a process's memory (a cache miss)."""
        ...


def record_of(spec: PythonProcSpec) -> PythonProcRecord:
    """The ctypes mirror of the process stage's record (same fields, same order)."""
    return PythonProcRecord(
        spec.tls_offset,
        spec.tls_second_offset,
        spec.flags,
        spec.tstate_frame,
        spec.cframe_current_frame,
        spec.frame_previous,
        spec.frame_code,
        spec.frame_instr,
        spec.frame_is_entry,
        spec.frame_owner,
        spec.code_fingerprint,
        spec.owner_cstack,
    )


class PythonFrames:
    def __init__(
        self,
        inspector: InspectorLike,
        maps: PythonMapsLike,
        codes: CodeResolverLike,
        proc_root: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inspector = inspector
        self._maps = maps
        self._codes = codes
        self._proc_root = proc_root
        self._clock = clock
        self._last_refresh: dict[int, float] = {}
        self._gone: set[int] = set()  # pids found exited at the last interval end
        self._walked: set[int] = set()  # pids enabled in BPF
        self._eager_until = -math.inf  # see eager()
        self._retries: dict[int, tuple[int, float]] = {}  # pid -> (attempts made, when to inspect it again)
        self._scan: deque[int] = deque()  # processes found running at start-up, not inspected yet
        # enabled, enable_failed, retries, scanned, thread_refreshes
        self.stats: Counter[str] = Counter()

    def on_exec(self, pid: int, exec_: bool) -> None:
        """A process event: what BPF and the inspector know of `pid` may describe another image."""
        if not exec_ and self._inspector.same_image(pid):
            return  # announced at its first sample, and inspected already (by the scan, or a retry)
        self._drop(pid)
        if exec_:
            self._codes.forget(pid)

    def _drop(self, pid: int) -> None:
        if pid in self._walked:
            self._maps.forget(pid)
            self._walked.discard(pid)
        self._inspector.forget(pid)
        self._last_refresh.pop(pid, None)
        self._retries.pop(pid, None)

    def observe(self, pid: int, announced: bool) -> None:
        """Inspect `pid` unless it has a verdict (an announcement's on_exec dropped a stale one)."""
        del announced  # the same rule for both: on_exec decides whether an announced pid's verdict holds
        if self._inspector.get(pid) is None:
            self._inspect(pid, 0)

    def scan(self, pids: Iterable[int]) -> None:
        """Processes running before the agent started: inspect them (from `poll`) before they are sampled."""
        self._scan.extend(pids)

    def poll(self, limit_s: float) -> float:
        """Inspect what is due (a slice of the scan, the retries whose time has come); the seconds the
        pipeline may wait for events before calling again, at most `limit_s`."""
        now = self._clock()
        end = now + SCAN_SLICE_S
        while self._scan and self._clock() < end:
            pid = self._scan.popleft()
            if self._inspector.get(pid) is None:
                self.stats["scanned"] += 1
                self._inspect(pid, 0)
        if self._scan:
            return 0.0
        for pid, (attempts, due) in list(self._retries.items()):
            if due <= now:
                self.stats["retries"] += 1
                self._inspect(pid, attempts)
        wait = limit_s
        if self._retries:
            wait = min(wait, min(due for _, due in self._retries.values()) - self._clock())
        if self.eager():
            wait = min(wait, RESOLVE_LAG_S)
        return max(0.0, wait)

    def eager(self) -> bool:
        """Whether events should be read and resolved promptly now (see the module docstring). Also read
        by the daemon's reader thread: one float, read atomically under the GIL."""
        return bool(self._walked) and self._clock() < self._eager_until

    def _inspect(self, pid: int, attempts: int) -> None:
        """Inspect `pid` (its `attempts`-th retry), apply the verdict in BPF, schedule the next retry."""
        before = self._inspector.get(pid)
        result = self._inspector.inspect(pid, retry=attempts < len(RETRY_DELAYS_S))
        if result.retry:
            self._retries[pid] = (attempts + 1, self._clock() + RETRY_DELAYS_S[attempts])
        else:
            self._retries.pop(pid, None)
        if not result.walked or result.spec is None:
            if pid in self._walked:
                self._maps.forget(pid)  # walked until now (through a thread map), and not any more
                self._walked.discard(pid)
            return
        if not self._maps.enable(pid, record_of(result.spec)):
            self.stats["enable_failed"] += 1
            return
        self.stats["enabled"] += 1
        self._walked.add(pid)
        self._eager_until = self._clock() + EAGER_S
        if result.state is PythonState.THREAD_MAP:
            self._maps.set_threads(pid, result.threads)
        elif before is not None and before.state is PythonState.THREAD_MAP:
            self._maps.set_threads(pid, {})  # its TSS slot found on a retry: the thread entries go

    def on_event(self, event: StackEvent) -> None:
        """Resolve the event's code objects now; a missing thread state may call for a map refresh."""
        python = event.python
        if python.frames:
            pid, codes = event.pid, self._codes
            reads = codes.reads
            words = python.frames
            for i in range(0, len(words), 2):
                word = words[i]
                if not word & PYTHON_FRAME_SHIM:
                    codes.resolve(pid, word & ~PYTHON_FRAME_FLAGS)
            if codes.reads != reads:
                self._eager_until = self._clock() + EAGER_S
        elif python.status is InterpreterStatus.NO_THREAD_STATE:
            self._refresh(event.pid, rate_limited=True)

    def end_interval(self) -> None:
        """Refresh every thread-map process's threads; drop the verdicts of pids that have exited."""
        gone: set[int] = set()
        for pid in self._inspector.pids():
            if not os.path.exists(self._proc_root / str(pid)):
                gone.add(pid)
            else:
                self._refresh(pid, rate_limited=False)
        for pid in self._gone & gone:
            self._drop(pid)
            self._codes.release(pid)
        self._gone = gone - self._gone

    def _refresh(self, pid: int, rate_limited: bool) -> None:
        known = self._inspector.get(pid)
        if known is None or known.state is not PythonState.THREAD_MAP:
            return
        now = self._clock()
        if rate_limited and now - self._last_refresh.get(pid, -REFRESH_MIN_INTERVAL_S) < REFRESH_MIN_INTERVAL_S:
            return
        self._last_refresh[pid] = now
        threads = self._inspector.refresh_threads(pid)
        if threads is not None:
            self._maps.set_threads(pid, threads)
            self.stats["thread_refreshes"] += 1
