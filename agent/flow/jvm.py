"""Flow: what the pipeline thread does for HotSpot JVMs, so that their interpreted Java frames are named.

This module owns `JavaFrames`, which the pipeline calls:
- `observe(pid)` when a process is announced or first sampled: a process mapping libjvm.so is read
  (`agent.process.jvm.discover`); once its vmStructs and interpreter are known, the unwind stage reads
  each interpreter frame's Method* and bytecode pointer (`Unwinder.set_java`) and `reader(pid)` gives
  the symbolize stage the `MethodReader` that names them. A JVM is mostly still starting when it is
  announced (the `java` launcher loads libjvm.so after the exec; HotSpot fills its tables in as it
  boots), so a process that is, or may become, a JVM is looked at again after `RETRY_DELAYS_S[n]`;
- `on_stack(pid, stack)` for each kept event's user stack that holds interpreter frames: their methods
  are read now, while the JVM lives (the reader keeps them), so that the report thread, which names
  the interval after it ends, names them even if the JVM has exited by then;
- `poll(limit_s)` between batches: the retries that are due; returns how long the pipeline may wait;
- `on_exec(pid)` on every process event: the image may have changed, so the pid's verdict goes;
- `end_interval()`: the verdicts and readers of exited pids go one interval end after they were found
  gone (the report thread names the interval they left with their reader, from its cache).

No signal is ever sent to a JVM, and nothing is written into it. It starts no threads; `reader` is
the one method another thread (the report thread's symbolizer) calls, and reads a dict that is only
ever replaced whole.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.process.jvm.discover import HotSpot, NotHotSpot, NotHotSpotReason, discover_hotspot
from agent.process.jvm.frames import InterpreterFrames
from agent.process.jvm.methods import MethodReader, MethodReadError
from agent.process.maps import ProcessMaps
from agent.process.memory import ProcessMemory
from agent.process.runtime_files import SymbolCache
from agent.types import Stack

logger = logging.getLogger(__name__)

# A JVM's tables are filled in within a few hundred milliseconds of its start on an idle host (seconds
# on a busy one); a launcher may also start its JVM late. About 25 s in all, then the verdict is final.
RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)
_LAUNCHER_LIBRARIES = ("libjli.so", "libjvm.so")  # a process mapping one of these is, or is becoming, a JVM
# Why a JVM was not (yet) readable: these are worth another look; any other verdict is final.
_RETRIED = (NotHotSpotReason.NOT_READY, NotHotSpotReason.NOT_JVM, NotHotSpotReason.UNREADABLE)


class UnwinderJavaLike(Protocol):
    def set_java(self, pid: int, interpreter: InterpreterFrames | None) -> None: ...


Discover = Callable[[int, Path, SymbolCache], HotSpot | NotHotSpot]


def _discover(pid: int, proc_root: Path, symbols: SymbolCache) -> HotSpot | NotHotSpot:
    return discover_hotspot(pid, proc_root, symbols=symbols)


class JavaFrames:
    def __init__(
        self,
        snapshots: Callable[[int], ProcessMaps | None],
        unwinder: UnwinderJavaLike,
        proc_root: Path = Path("/proc"),
        discover: Discover = _discover,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`snapshots`: the process registry's mappings of a pid (to tell a possible JVM at a glance)."""
        self._snapshots = snapshots
        self._unwinder = unwinder
        self._proc_root = proc_root
        self._discover = discover
        self._clock = clock
        self._symbols = SymbolCache()
        self._verdicts: dict[int, str] = {}  # pid -> "jvm" or the final NotHotSpotReason
        self._retries: dict[int, tuple[float, int]] = {}  # pid -> (due, attempts so far)
        self._readers: dict[int, MethodReader] = {}  # replaced whole, never changed in place
        self._gone: set[int] = set()
        self.outcomes: Counter[str] = Counter()  # final verdicts: jvm, or why not (for the metrics)
        self.method_reads_failed = 0

    def reader(self, pid: int) -> MethodReader | None:
        """The method reader of a JVM whose frames are read (any thread)."""
        return self._readers.get(pid)

    def on_stack(self, pid: int, stack: Stack) -> None:
        reader = self._readers.get(pid)
        if reader is None:
            return
        java = stack.java
        for i in range(1, len(java), 3):
            try:
                reader.method(java[i])  # cached after the first time: one lookup
            except MethodReadError:
                self.method_reads_failed += 1  # named from nothing later: the frame stays native

    def observe(self, pid: int) -> None:
        if pid in self._verdicts or pid in self._retries:
            return
        maps = self._snapshots(pid)
        if maps is not None and not _may_be_jvm(maps):
            self._verdicts[pid] = NotHotSpotReason.NOT_JVM  # the common case: a glance at the paths
            self.outcomes[NotHotSpotReason.NOT_JVM] += 1
            return
        self._attempt(pid, 0)

    def poll(self, limit_s: float) -> float:
        now = self._clock()
        for pid, (due, attempts) in list(self._retries.items()):
            if due <= now:
                del self._retries[pid]
                self._attempt(pid, attempts)
        if not self._retries:
            return limit_s
        return max(0.0, min(limit_s, min(due for due, _ in self._retries.values()) - self._clock()))

    def on_exec(self, pid: int) -> None:
        self._verdicts.pop(pid, None)
        self._retries.pop(pid, None)
        self._gone.discard(pid)
        if pid in self._readers:
            self._readers = {p: r for p, r in self._readers.items() if p != pid}
        self._unwinder.set_java(pid, None)

    def end_interval(self) -> None:
        for pid in list(self._gone):  # on_exec takes each out of the set
            self.on_exec(pid)
        self._gone = {pid for pid in self._verdicts if not os.path.exists(self._proc_root / str(pid))}

    def _attempt(self, pid: int, attempts: int) -> None:
        found = self._discover(pid, self._proc_root, self._symbols)
        if isinstance(found, HotSpot):
            self._enable(pid, found)
            return
        if found.reason in _RETRIED and attempts < len(RETRY_DELAYS_S) and self._may_become_jvm(pid, found):
            self._retries[pid] = (self._clock() + RETRY_DELAYS_S[attempts], attempts + 1)
            return
        self._final(pid, found.reason, found.detail)

    def _may_become_jvm(self, pid: int, found: NotHotSpot) -> bool:
        if found.reason is not NotHotSpotReason.NOT_JVM:
            return True  # libjvm.so is there, and not readable yet
        maps = self._snapshots(pid)
        return maps is None or _may_be_jvm(maps)

    def _enable(self, pid: int, jvm: HotSpot) -> None:
        memory = ProcessMemory(pid, self._proc_root)
        try:
            interpreter = InterpreterFrames.of(memory, jvm.vmstructs)
            reader = MethodReader(memory, jvm.vmstructs, jvm.feature)
        except MethodReadError as e:
            self._final(pid, "unsupported", str(e))
            return
        self._verdicts[pid] = "jvm"
        self.outcomes["jvm"] += 1
        self._readers = {**self._readers, pid: reader}
        self._unwinder.set_java(pid, interpreter)
        release = jvm.release or "(release unknown)"
        logger.info("pid %d: HotSpot %s; its interpreted Java frames are named", pid, release)

    def _final(self, pid: int, reason: str, detail: str) -> None:
        self._verdicts[pid] = reason
        self.outcomes[str(reason)] += 1
        if reason not in (NotHotSpotReason.NOT_JVM, NotHotSpotReason.GONE):
            logger.info("pid %d: a JVM whose Java frames cannot be named: %s", pid, detail)


def _may_be_jvm(maps: ProcessMaps) -> bool:
    """Whether the process is, or may be about to be, a JVM: it maps the launcher's or the VM's library,
    or it is the `java` launcher itself, announced at its exec before it has mapped either."""
    if os.path.basename(maps.exe_path) == "java":
        return True
    return any(os.path.basename(m.path.removesuffix(" (deleted)")) in _LAUNCHER_LIBRARIES for m in maps.mappings)
