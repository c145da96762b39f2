"""Process stage: the agent's discovery for the inspector, and code objects resolved for live processes.

This module owns `discover_interpreter`, the `Discover` the daemon gives `PythonInspector`: it runs
`agent.process.python.discover.discover` and `read_layout` and turns their verdicts into an
`Interpreter` or a `NotWalkable` with the matching `PythonState`; and `CodeResolver`, which resolves a
walked process's code objects through the bounded `CodeCache` with that process's layout and
`&PyCode_Type` (from the inspector's verdict), reading through one `ProcessMemory` per walked pid.

The runtime of a process (`CodeResolver.runtime`, the process.runtime.* labels and the symbolizer's
split rule) is taken when its code objects are resolved, and kept, like them, until the pid exec's:
the report thread names an interval after the pipeline has moved on, by when a process that exited
may have lost its verdict, or been inspected again as a zombie with no mappings (seen: a whole last
interval of a short-lived process reported without names).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from agent.process.maps import root_path
from agent.process.memory import MemoryReader, MemoryReadError, ProcessMemory
from agent.process.python.code_cache import CodeCache
from agent.process.python.discover import NotPython, NotPythonReason, discover, read_layout
from agent.process.python.inspect import Discover, Interpreter, NotWalkable, PythonInspector, code_check
from agent.process.python.objects import CodeInfo
from agent.process.python.proc import PythonState
from agent.process.runtime_files import SymbolCache

_STATES = {
    NotPythonReason.NOT_PYTHON: PythonState.NOT_PYTHON,
    NotPythonReason.NO_SYMBOLS: PythonState.NO_SYMBOLS,
    NotPythonReason.UNSUPPORTED_VERSION: PythonState.UNSUPPORTED_VERSION,
    NotPythonReason.UNREADABLE: PythonState.READ_FAILED,
    NotPythonReason.GONE: PythonState.READ_FAILED,
}
RUNTIMES_KEPT = 16384  # pids whose runtime is remembered; beyond it the oldest go (a few bytes each)


def discover_interpreter(proc_root: Path = Path("/proc"), symbols: SymbolCache | None = None) -> Discover:
    """The inspector's discovery of one process's interpreter, through `proc_root`; the ELF files' symbols
    are parsed once per file (`symbols`, a cache of its own by default)."""
    cache = symbols if symbols is not None else SymbolCache()

    def run(pid: int, memory: MemoryReader) -> Interpreter:
        found = discover(pid, proc_root, memory, cache)
        if isinstance(found, NotPython):
            raise NotWalkable(_STATES[found.reason], str(found.reason), found.detail)
        version = found.minor
        if found.free_threaded:
            raise NotWalkable(PythonState.FREE_THREADED, "free_threaded", found.elf_path, version)
        if not found.code_type:
            raise NotWalkable(PythonState.NO_SYMBOLS, "no_code_type", found.elf_path, version)
        try:
            layout = read_layout(memory, found)  # LayoutError: the inspector says unsupported_version
        except MemoryReadError as e:
            raise NotWalkable(PythonState.READ_FAILED, str(e.reason), str(e), version) from e
        gilstate = found.gilstate_get_this_thread_state
        return Interpreter(
            elf_path=root_path(proc_root, pid, found.elf_path),
            load_bias=found.load_bias,
            runtime=found.runtime,
            layout=layout,
            gilstate_function=gilstate - found.load_bias if gilstate else 0,
            check_code=code_check(memory, layout, found.code_type),
            code_type=found.code_type,
            # The micro is known from Py_Version (3.11+) only: the file name says major.minor.
            version_text=".".join(map(str, found.version if found.version_source == "Py_Version" else version)),
        )

    return run


class CodeResolver:
    """Code objects of walked processes, resolved now and cached; used from the pipeline thread."""

    def __init__(self, cache: CodeCache, inspector: PythonInspector, proc_root: Path = Path("/proc")) -> None:
        self.cache = cache
        self._inspector = inspector
        self._proc_root = proc_root
        self._memories: dict[int, ProcessMemory] = {}
        # pid -> ("cpython", version), written by the pipeline thread only (resolve, forget), read by
        # the report thread (runtime): single dict operations, atomic under the GIL.
        self._runtimes: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self.reads = 0  # cache misses: code objects looked for in a process's memory (the pipeline's pace)

    def resolve(self, pid: int, key: int) -> CodeInfo | None:
        """The code object `key` (a code key: address and fingerprint) in `pid`, a walked process; None if
        it is not one, unreadable, or freed and replaced."""
        cached = self.cache.get(pid, key)
        if cached is not None:
            return cached
        verdict = self._inspector.get(pid)
        if verdict is None or not verdict.walked or verdict.layout is None:
            return None
        if verdict.version is not None:
            self._remember_runtime(pid, verdict.version_text or ".".join(map(str, verdict.version)))
        memory = self._memories.get(pid)
        if memory is None:
            memory = self._memories[pid] = ProcessMemory(pid, self._proc_root)
        self.reads += 1
        return self.cache.resolve(pid, memory, verdict.layout, key, verdict.code_type)

    def code(self, pid: int, key: int) -> CodeInfo | None:
        """The code object resolved earlier (the symbolizer's `PythonCodes`; never reads the process)."""
        return self.cache.get(pid, key)

    def runtime(self, pid: int) -> tuple[str, str] | None:
        """("cpython", its version) of a process whose code objects were resolved since its last exec, else
        of a walked process."""
        kept = self._runtimes.get(pid)
        if kept is not None:
            return kept
        verdict = self._inspector.get(pid)
        if verdict is None or not verdict.walked or verdict.version is None:
            return None
        return "cpython", verdict.version_text or ".".join(map(str, verdict.version))

    def _remember_runtime(self, pid: int, version: str) -> None:
        runtime = ("cpython", version)
        if self._runtimes.get(pid) == runtime:
            return
        self._runtimes[pid] = runtime
        if len(self._runtimes) > RUNTIMES_KEPT:
            self._runtimes.popitem(last=False)

    def forget(self, pid: int) -> None:
        """The pid exec'd: its addresses mean other objects now, and it may run another runtime."""
        self.cache.forget(pid)
        self._runtimes.pop(pid, None)
        self.release(pid)

    def release(self, pid: int) -> None:
        """The pid exited: its reader goes (its code objects stay, for the interval being reported)."""
        memory = self._memories.pop(pid, None)
        if memory is not None:
            memory.close()
