"""Process stage: turning "this pid runs CPython" into "the BPF walker can walk it" (docs/python.md).

This module owns `PythonInspector`: for an announced process it finds the interpreter (a `Discover`
callable: `agent.process.python.discover` by default), its layout, how the walker finds each thread's
`PyThreadState` (the autoTSSkey's TLS slot, or the python_threads thread map), and validates it all
with a walk from user space before saying `PythonState.ENABLED`/`THREAD_MAP`; every other outcome is a
state with a counted reason, never an exception. It keeps the current state per pid (the gauge), the
counts of inspections by state and of thread-map fallbacks by reason, and refreshes the thread maps.

The TSS key's address is taken from the layout (`_PyRuntime + runtime_autotss_key`) and must agree with
the address `PyGILState_GetThisThreadState`'s code loads (decoded from the ELF file); where the layout
has none (a 3.13 whose debug offsets differ from the table), the decoded address is used alone. Either
way the slot search then requires the key's slot to hold every thread's own state, which is what makes
a wrong key impossible to enable. A disagreement, an undecodable function, musl, or a slot not found
falls back to the thread map (`THREAD_MAP`, with the reason).

An idle process (no thread running Python code: no frames) is validated by its thread states alone:
every state points back at its interpreter, is bound to a live thread of the pid and (TSS) sits in
that thread's slot. The frame layout it will be walked with is the table's, checked on other processes
of the same version; its code objects are still checked one by one when they are resolved.

A thread state's `native_thread_id` is the tid in the process's own pid namespace (a container's), so
it is compared with the process's threads as that namespace numbers them (`agent.process.pidns`, from
each task's `NSpid:`). The pthread ids (TLS bases), and the thread map keyed by them, do not depend on
the namespace; the pids are the agent's (those BPF reports).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from agent.errors import AgentError
from agent.process.memory import ProcessMemory
from agent.process.pidns import TaskIds, task_ids
from agent.process.python.elfcode import ElfCode, ElfCodeError
from agent.process.python.frames import CodeCheck, validate_frames
from agent.process.python.layouts import NO_FIELD, LayoutError, PythonLayout, layout_for_version
from agent.process.python.objects import CodeReadError, read_code
from agent.process.python.proc import TORN_READS, PythonProcess, PythonState, provisional, spec_of_layout
from agent.process.python.threads import (
    MemoryReader,
    ThreadsError,
    ThreadState,
    TlsSlot,
    bound_threads,
    find_tls_slot,
    read_tls_slot,
    read_tss_key,
    thread_map,
    walk_threads,
)
from agent.process.python.x86 import SpecificOffsets, pthread_specific_offsets, tss_key_address

logger = logging.getLogger(__name__)

THREAD_MAP_FROM = (3, 14)  # the thread map by design from here on (docs/python.md)
MIN_VERSION = (3, 10)
MAX_VALIDATION_THREADS = 8
_FUNCTION_BYTES = 64
LOG_INTERVAL_S = 60.0
# The process runs while it is read: a thread state or frame freed and reused between two reads makes a
# walk look like garbage once. An inspection failing so (proc.TORN_READS) is made again at once, up to
# INSPECT_ATTEMPTS in all (garbage fails every time; each thread's frame walk is also retried, see
# frames.py), and, when retries are allowed, again later (`provisional`).
INSPECT_ATTEMPTS = 3
# Why a process is walked through the thread map rather than its TSS slot (the labels counted from the
# start; a ThreadsError reason met in the slot search is counted under its own name too).
FALLBACK_REASONS = (
    "version",  # 3.14+: the thread map by design
    "tss_mismatch",  # the layout's key address and PyGILState_GetThisThreadState's disagree
    "tss_undecoded",  # neither a layout entry nor a decodable function: no key address to trust
    "musl",  # musl's pthread_getspecific is not glibc's
    "no_libc",  # no C library mapped (a static binary): nothing to check the slot against
    "tss_uninitialized",  # the key's Py_tss_t is not initialized
    "tls_slot_not_found",  # no single offset holds every thread's state
    "tls_libc_mismatch",  # the offset found disagrees with glibc's pthread_getspecific code
)


@dataclass(frozen=True, slots=True)
class Interpreter:
    """What the inspector needs to know of a discovered CPython runtime in one process."""

    elf_path: Path  # the ELF file holding _PyRuntime (the executable or libpython), openable by the agent
    load_bias: int  # runtime address minus link-time address in that file
    runtime: int  # _PyRuntime's runtime address
    layout: PythonLayout
    gilstate_function: int = 0  # PyGILState_GetThisThreadState's link-time address (0: not exported)
    check_code: CodeCheck | None = None  # None: the discovery could not say what a code object is
    code_type: int = 0  # &PyCode_Type in the process (what resolved code objects are checked against)
    version_text: str = ""  # "3.12.1" (the micro when known)


class NotWalkable(AgentError):
    """Discovery's verdict on a process that is not (or not usably) CPython."""

    def __init__(self, state: PythonState, reason: str, detail: str = "", version: tuple[int, int] | None = None):
        super().__init__(f"{state}: {reason}: {detail}")
        self.state = state
        self.reason = reason
        self.detail = detail
        self.version = version


# pid, its memory -> the interpreter, or NotWalkable.
Discover = Callable[[int, MemoryReader], Interpreter]


def code_check(memory: MemoryReader, layout: PythonLayout, code_type: int) -> CodeCheck:
    """The validation walk's check of one code object: `ob_type == &PyCode_Type` (`code_type`, its
    runtime address), sane name, qualname and file name strings, a line table covering the bytecode."""

    def check(address: int) -> str | None:
        try:
            read_code(memory, layout, address, code_type)
        except CodeReadError as e:
            return f"{e.reason}: {e}"
        return None

    return check


def describe_walkable() -> str:
    """Which CPython versions the inspector can enable, and how their threads are found (for `check`)."""
    tables = [v for v in ((3, minor) for minor in range(MIN_VERSION[1], THREAD_MAP_FROM[1])) if _has_table(v)]
    tss = f"{tables[0][0]}.{tables[0][1]}-3.{THREAD_MAP_FROM[1] - 1}" if tables else "none"
    return f"{tss} through the TSS slot, 3.{THREAD_MAP_FROM[1]} through the thread map"


def _has_table(version: tuple[int, int]) -> bool:
    if version >= (3, 13):
        return True  # from the process's debug offsets
    try:
        layout_for_version(version)
    except LayoutError:
        return False
    return True


class PythonInspector:
    """Inspects processes and keeps their states; called from the pipeline thread only."""

    def __init__(
        self,
        discover: Discover,
        proc_root: Path = Path("/proc"),
        enabled: bool = True,
        memory: Callable[[int], ProcessMemory] | None = None,
    ) -> None:
        self._discover = discover
        self._proc_root = proc_root
        self.enabled = enabled
        self._memory = memory or (lambda pid: ProcessMemory(pid, proc_root))
        self._current: dict[int, PythonProcess] = {}
        self._libc: dict[tuple[int, int, int], SpecificOffsets | None] = {}  # file identity -> offsets
        self._keys: dict[tuple[int, int, int, int], int | None] = {}  # (file identity, function) -> key address
        self.inspected: Counter[str] = Counter()  # inspections by resulting state
        self.fallbacks: Counter[str] = Counter()  # THREAD_MAP by reason
        self.refresh_failures = 0
        self.task_skips: Counter[str] = Counter()  # tasks not mapped through NSpid, by TASK_SKIP_REASONS
        self.retried: Counter[str] = Counter()  # verdicts to be retried (the runtime not ready), by reason
        self._last_log: dict[str, float] = {}

    def get(self, pid: int) -> PythonProcess | None:
        return self._current.get(pid)

    def forget(self, pid: int) -> None:
        """The pid exited or exec'd: its verdict no longer holds."""
        self._current.pop(pid, None)

    def states(self) -> dict[str, int]:
        """Processes by current state (every state, zeros included), for the gauge."""
        # list() copies in one step: the metrics thread reads while the pipeline thread inspects.
        counts = Counter(p.state.value for p in list(self._current.values()))
        return {state.value: counts.get(state.value, 0) for state in PythonState}

    def pids(self) -> frozenset[int]:
        """The pids with a verdict."""
        return frozenset(self._current)

    def walked(self) -> dict[int, PythonProcess]:
        return {pid: p for pid, p in self._current.items() if p.walked}

    def same_image(self, pid: int) -> bool:
        """Whether `pid` has a verdict about the process image it runs now (not a reused pid's, nor from
        before an exec to another executable)."""
        current = self._current.get(pid)
        return current is not None and bool(current.image) and current.image == _image(self._proc_root, pid)

    def inspect(self, pid: int, retry: bool = False) -> PythonProcess:
        """Inspect `pid` now (its previous verdict is replaced) and remember the result. With `retry`, a
        runtime that is not ready yet gets a verdict marked `retry` (`proc.provisional`) instead of a
        final one: the caller inspects it again."""
        image = _image(self._proc_root, pid)
        if not self.enabled:
            result = PythonProcess(pid, PythonState.DISABLED, "python_disabled")
        else:
            for _ in range(INSPECT_ATTEMPTS):  # a torn read of a running process is read again
                result = self._attempt(pid)
                if result.state is not PythonState.VALIDATION_FAILED or result.reason not in TORN_READS:
                    break
        result = replace(provisional(result) if retry else result, image=image)
        if result.retry:
            self.retried[result.reason] += 1
        self._current[pid] = result
        self.inspected[result.state.value] += 1
        if result.state is PythonState.THREAD_MAP:
            self.fallbacks[result.reason] += 1
        self._log(result)
        return result

    def _attempt(self, pid: int) -> PythonProcess:
        try:
            with self._memory(pid) as memory:
                return self._inspect(pid, memory)
        except NotWalkable as e:
            return PythonProcess(pid, e.state, e.reason, e.detail, e.version)
        except LayoutError as e:
            return PythonProcess(pid, PythonState.UNSUPPORTED_VERSION, e.reason, str(e))
        except ThreadsError as e:  # the thread list itself (cycle, foreign pointers) or a failed read
            state = PythonState.READ_FAILED if e.reason == "read_failed" else PythonState.VALIDATION_FAILED
            return PythonProcess(pid, state, e.reason, str(e))
        except (ElfCodeError, AgentError, OSError) as e:
            return PythonProcess(pid, PythonState.READ_FAILED, getattr(e, "reason", "read_failed"), str(e))

    def refresh_threads(self, pid: int) -> Mapping[int, int] | None:
        """Walk a THREAD_MAP process's threads again; the new map, or None (not such a process, or it
        could not be read: counted in `refresh_failures`)."""
        current = self._current.get(pid)
        if current is None or current.state is not PythonState.THREAD_MAP or current.layout is None:
            return None
        try:
            with self._memory(pid) as memory:
                threads = walk_threads(memory, current.layout, current.runtime_address)
        except (ThreadsError, AgentError, OSError) as e:
            self.refresh_failures += 1
            logger.debug("cannot refresh the Python threads of pid %d: %s", pid, e)
            return None
        mapping = MappingProxyType(thread_map(threads))
        self._current[pid] = _replace_threads(current, mapping)
        return mapping

    def _inspect(self, pid: int, memory: ProcessMemory) -> PythonProcess:
        found = self._discover(pid, memory)
        layout = found.layout
        version = layout.version
        if layout.free_threaded:
            return PythonProcess(pid, PythonState.FREE_THREADED, "free_threaded", version=version)
        threads = walk_threads(memory, layout, found.runtime)
        failure = self._check_threads(pid, threads)
        if failure is not None:
            return PythonProcess(pid, PythonState.VALIDATION_FAILED, failure[0], failure[1], version)
        slot, why = self._tss_slot(pid, memory, found, threads)
        if found.check_code is None:
            return PythonProcess(pid, PythonState.NO_SYMBOLS, "no_code_type", version=version)
        try:
            checked = validate_frames(memory, layout, bound_threads(threads), found.check_code, MAX_VALIDATION_THREADS)
        except ThreadsError as e:
            state = PythonState.READ_FAILED if e.reason == "read_failed" else PythonState.VALIDATION_FAILED
            return PythonProcess(pid, state, e.reason, str(e), version)
        state = PythonState.ENABLED if slot is not None else PythonState.THREAD_MAP
        mapping = MappingProxyType(thread_map(threads) if slot is None else {})
        spec = spec_of_layout(layout, slot)
        return PythonProcess(
            pid,
            state,
            why,
            "",
            version,
            layout,
            found.runtime,
            spec,
            mapping,
            checked,
            found.code_type,
            found.version_text,
        )

    def _check_threads(self, pid: int, threads: tuple[ThreadState, ...]) -> tuple[str, str] | None:
        """(reason, detail) when the thread states do not look like this process's threads."""
        if not threads:
            return "no_threads", "the interpreter has no thread state"
        bound = bound_threads(threads)
        for thread in bound:
            if thread.thread_id % 8:
                return "bad_thread_id", f"thread state {thread.address:#x}: pthread_t {thread.thread_id:#x}"
        # A thread that has just exited may not have unlinked its state yet, so one stale tid is no proof
        # of garbage; none of them being a thread of this pid is. native_thread_id is the tid in the
        # process's own pid namespace (a container's), so it is matched against its threads' ids there.
        natives = {t.native_thread_id for t in bound if t.native_thread_id}
        tasks = self._task_ids(pid)
        if natives and tasks.found and not natives & tasks.own:
            seen = dict(sorted(tasks.to_agent.items())[:4])  # its own tid -> the agent's
            detail = f"no thread state's tid {sorted(natives)[:4]} is a thread of pid {pid} (its tids: {seen})"
            return "bad_native_thread_id", detail
        return None

    def _task_ids(self, pid: int) -> TaskIds:
        """The pid's threads by their own namespace's tids; the tasks that could not be mapped counted."""
        tasks = task_ids(self._proc_root, pid)
        for reason, count in tasks.skipped.items():
            self.task_skips[reason] += count
            logger.debug("pid %d: %d of its tasks not mapped through NSpid: %s", pid, count, reason)
        return tasks

    def _tss_slot(
        self, pid: int, memory: MemoryReader, found: Interpreter, threads: tuple[ThreadState, ...]
    ) -> tuple[TlsSlot | None, str]:
        """The TLS slot the walker reads each thread's state from, or (None, why the thread map instead)."""
        layout = found.layout
        if layout.version >= THREAD_MAP_FROM:
            return None, "version"
        key_address, why = self._key_address(found)
        if key_address is None:
            return None, why
        libc_kind, libc = self._libc_offsets(pid)
        if libc_kind != "glibc":
            return None, libc_kind
        try:
            key = read_tss_key(memory, key_address, layout.tss_key)
            slot = find_tls_slot(memory, threads, key, libc)
            for thread in bound_threads(threads):  # what the walker will read, read the same way
                if read_tls_slot(memory, thread.thread_id, slot) != thread.address:
                    return None, "tls_slot_changed"
        except ThreadsError as e:
            return None, e.reason
        return slot, ""

    def _key_address(self, found: Interpreter) -> tuple[int | None, str]:
        layout = found.layout
        table = found.runtime + layout.runtime_autotss_key if layout.runtime_autotss_key != NO_FIELD else None
        decoded = None
        if found.gilstate_function:
            link = self._decoded_key(found.elf_path, found.gilstate_function)
            decoded = link + found.load_bias if link is not None else None
        if table is not None and decoded is not None:
            return (table, "") if table == decoded else (None, "tss_mismatch")
        if decoded is not None:
            return decoded, ""  # no table entry: the slot search checks the decoded key on every thread
        return None, "tss_undecoded"

    def _decoded_key(self, path: Path, function: int) -> int | None:
        """The link-time key address `function` (PyGILState_GetThisThreadState) loads, decoded once per
        file: every process of one interpreter, and every inspection of one process, has the same."""
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, function)
        except OSError:
            key = None
        if key is not None and key in self._keys:
            return self._keys[key]
        try:
            with ElfCode.open(path) as elf:
                link = tss_key_address(elf.code(function, _FUNCTION_BYTES), function, elf.pointer)
        except ElfCodeError as e:
            logger.debug("cannot decode PyGILState_GetThisThreadState: %s", e)
            return None  # not remembered: a file that could not be read now may be readable later
        if key is not None:
            self._keys[key] = link
            if len(self._keys) > 64:
                self._keys.pop(next(iter(self._keys)))
        return link

    def _libc_offsets(self, pid: int) -> tuple[str, SpecificOffsets | None]:
        """("glibc", pthread_getspecific's offsets or None when undecodable), or ("musl"/"no_libc", None)."""
        path = _libc_path(self._proc_root, pid)
        if path is None:
            return "no_libc", None
        if "musl" in path.name:
            return "musl", None
        try:
            st = os.stat(path)
        except OSError:
            return "glibc", None
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)  # one decode per C library, whichever pid maps it
        if key not in self._libc:
            self._libc[key] = _decode_libc(path)
            if len(self._libc) > 64:
                self._libc.pop(next(iter(self._libc)))
        return "glibc", self._libc[key]

    def _log(self, result: PythonProcess) -> None:
        if result.state in (PythonState.NOT_PYTHON, PythonState.DISABLED):
            return
        label = f"{result.state}:{result.reason}"
        now = time.monotonic()
        level = logging.DEBUG
        noteworthy = result.state in (PythonState.VALIDATION_FAILED, PythonState.THREAD_MAP)
        if noteworthy and now - self._last_log.get(label, -LOG_INTERVAL_S) >= LOG_INTERVAL_S:
            level, self._last_log[label] = logging.INFO, now  # once a minute per reason, the rest at debug
        version = ".".join(map(str, result.version)) if result.version else "?"
        logger.log(
            level, "pid %d (Python %s): %s %s %s", result.pid, version, result.state, result.reason, result.detail
        )


def _replace_threads(process: PythonProcess, threads: Mapping[int, int]) -> PythonProcess:
    return replace(process, threads=threads)


def _libc_path(proc_root: Path, pid: int) -> Path | None:
    """The C library the process maps (glibc's libc.so.6 or libc-2.x.so, musl's ld-musl-*), through
    /proc/PID/root so a container's own library is the one read."""
    try:
        with open(proc_root / str(pid) / "maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or "x" not in parts[1]:
                    continue
                name = os.path.basename(parts[5].strip())
                if name.startswith(("libc.so", "libc-2.", "ld-musl-", "libc.musl")):
                    return proc_root / str(pid) / "root" / parts[5].strip().lstrip("/")
    except OSError:
        return None
    return None


def _decode_libc(path: Path) -> SpecificOffsets | None:
    try:
        with ElfCode.open(path) as elf:
            function = elf.symbol("pthread_getspecific") or elf.symbol("__pthread_getspecific")
            return pthread_specific_offsets(elf.code(function, 128)) if function else None
    except ElfCodeError as e:
        logger.debug("cannot decode pthread_getspecific in %s: %s", path, e)
        return None


def _image(proc_root: Path, pid: int) -> tuple[int, ...]:
    """(start time, executable's device and inode): what tells a process image from a reused pid's or,
    mostly, from the image before an exec; () when the pid cannot be read."""
    try:
        stat = (proc_root / str(pid) / "stat").read_bytes()
        exe = os.stat(proc_root / str(pid) / "exe")
    except OSError:
        return ()
    fields = stat.rpartition(b")")[2].split()  # comm may hold spaces and parentheses
    try:
        start = int(fields[19])  # field 22, starttime: fields after comm start at field 3
    except (IndexError, ValueError):
        return ()
    return start, exe.st_dev, exe.st_ino
