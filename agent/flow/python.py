"""Flow: what the pipeline thread does for Python processes (docs/python.md).

This module owns `PythonFrames`, which the pipeline calls:
- `on_exec(pid)` on every process event: the image may have changed, so the pid's BPF entries, its
  verdict and (on EXEC) its cached code objects go;
- `observe(pid)` when a process is announced (NEW) or first sampled without a verdict (processes that
  were running before the agent started): inspect it (`agent.process.python.inspect.PythonInspector`)
  and, when walkable, enable it in BPF (`agent.probes.python_maps.PythonMaps`), writing its thread map
  when it is walked through one;
- `on_event(event)` for each kept stack event: resolve its Python frames' code objects now, while the
  process is alive (the CodeCache), shims skipped; an event of a thread-map process that found no
  thread state (a thread started since the map was written) refreshes the map, at most once a second;
- `end_interval()` at each interval end: the thread maps of thread-map processes are walked again
  (one walk of `interp->threads` per such process per interval), and verdicts of exited pids dropped
  one interval end after they were first found gone (the report thread names the interval they left
  with their runtime still known; their code objects stay in the bounded cache).

It starts no threads and holds no lock: everything runs on the pipeline thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from agent.probes.events import StackEvent
from agent.probes.records import PythonProcRecord
from agent.process.python.proc import PythonProcess, PythonProcSpec, PythonState
from agent.types import PYTHON_FRAME_FLAGS, PYTHON_FRAME_SHIM, InterpreterStatus

logger = logging.getLogger(__name__)

REFRESH_MIN_INTERVAL_S = 1.0  # a thread map is re-walked at most this often on missing-thread signals


class PythonMapsLike(Protocol):
    """The BPF maps' writer (`agent.probes.python_maps.PythonMaps`)."""

    def enable(self, pid: int, record: PythonProcRecord) -> bool: ...

    def disable(self, pid: int) -> None: ...

    def set_threads(self, pid: int, threads: Mapping[int, int]) -> bool: ...

    def forget(self, pid: int) -> None: ...


class InspectorLike(Protocol):
    """The process stage's inspector (`agent.process.python.inspect.PythonInspector`)."""

    def inspect(self, pid: int) -> PythonProcess: ...

    def get(self, pid: int) -> PythonProcess | None: ...

    def forget(self, pid: int) -> None: ...

    def refresh_threads(self, pid: int) -> Mapping[int, int] | None: ...

    def pids(self) -> frozenset[int]: ...


class CodeResolverLike(Protocol):
    """Reads and caches code objects (`agent.process.python.code_cache.CodeCache`)."""

    def resolve(self, pid: int, address: int) -> object: ...

    def forget(self, pid: int) -> None: ...

    def release(self, pid: int) -> None: ...


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
        self.stats: Counter[str] = Counter()  # enabled, enable_failed, thread_refreshes, codes_resolved

    def on_exec(self, pid: int, exec_: bool) -> None:
        """A process event: what BPF and the inspector know of `pid` may describe another image."""
        known = self._inspector.get(pid)
        if known is not None and known.walked:
            self._maps.forget(pid)
        self._inspector.forget(pid)
        self._last_refresh.pop(pid, None)
        if exec_:
            self._codes.forget(pid)

    def observe(self, pid: int, announced: bool) -> None:
        """Inspect `pid` if announced (NEW), or if it has no verdict yet (a first sample)."""
        if not announced and self._inspector.get(pid) is not None:
            return
        result = self._inspector.inspect(pid)
        if not result.walked or result.spec is None:
            return
        if not self._maps.enable(pid, record_of(result.spec)):
            self.stats["enable_failed"] += 1
            return
        self.stats["enabled"] += 1
        if result.state is PythonState.THREAD_MAP:
            self._maps.set_threads(pid, result.threads)

    def on_event(self, event: StackEvent) -> None:
        """Resolve the event's code objects now; a missing thread state may call for a map refresh."""
        python = event.python
        if python.frames:
            pid, codes = event.pid, self._codes
            words = python.frames
            for i in range(0, len(words), 2):
                word = words[i]
                if not word & PYTHON_FRAME_SHIM:
                    codes.resolve(pid, word & ~PYTHON_FRAME_FLAGS)
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
            self.on_exec(pid, exec_=False)
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
