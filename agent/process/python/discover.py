"""Process stage: is this process a CPython, which one, and where are its runtime symbols.

This module owns `discover(pid)`, which finds the interpreter ELF among a process's executable
mappings (a `libpython3.X*.so` first: an embedding or a thin `python` launcher links it; else the main
executable, which holds the interpreter when it is built statically), opens it through
`/proc/PID/root` (so a container's files resolve in its own mount namespace) or else
`/proc/PID/map_files` (a deleted or replaced file), and returns a `PythonRuntime`: the interpreter's
version (from `Py_Version` in memory, else the file name), whether it is free-threaded, its load bias
and the runtime addresses of `_PyRuntime`, `Py_Version`, `PyGILState_GetThisThreadState`, `PyCode_Type`
and friends. A process that is not one it can use gets a `NotPython` with a `NotPythonReason`.
`read_layout` then gives the runtime's `PythonLayout` (a table, or its `_PyRuntime.debug_offsets`).

The symbols read from each ELF file are kept in a `SymbolCache` by the file's identity (device, inode,
mtime) when one is given: parsing libpython's and libc's symbol tables is most of an inspection (about
0.3 s each here), and every process of one interpreter, and every retry of one process, maps the same
files.
"""

from __future__ import annotations

import enum
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.process.elf import ElfReadError, NamedSymbols, segment_for_offset
from agent.process.maps import (
    MapEntry,
    MapKind,
    ProcessMaps,
    load_bias,
    printable,
    read_process_maps,
)
from agent.process.memory import MemoryErrorReason, MemoryReader, MemoryReadError, ProcessMemory
from agent.process.python.layouts import (
    DEBUG_COOKIE,
    PythonLayout,
    debug_offsets_size,
    layout_for_version,
    layout_from_debug_offsets,
)
from agent.process.runtime_files import SymbolCache, open_mapped_file, read_symbols

MIN_VERSION = (3, 10)
MAX_VERSION = (3, 14)  # the newest whose debug offsets format is known (layouts.py)

PYTHON_SYMBOLS = (
    "_PyRuntime",
    "Py_Version",
    "PyGILState_GetThisThreadState",
    "PyCode_Type",
    "PyUnicode_Type",
    "PyBytes_Type",
    "PyThread_tss_get",
    "pthread_getspecific",  # in the interpreter only when libc is linked in statically
)
# libpython3.12.so.1.0, libpython3.13t.so, python3.11, python3.13t, python3.10d
_NAME = re.compile(r"^(lib)?python(\d+)\.(\d+)(t?)d?m?(\.so(\.[\d.]+)?)?$")
_LIBC = re.compile(r"^(libc\.so(\.\d+)?|libc-[\d.]+\.so|ld-musl-.*\.so(\.\d+)?|libc\.musl-.*\.so(\.\d+)?)$")


class NotPythonReason(enum.StrEnum):
    NOT_PYTHON = "not_python"  # no mapping looks like or defines a CPython interpreter
    NO_SYMBOLS = "no_symbols"  # a python-named ELF without _PyRuntime (stripped of .dynsym too)
    UNSUPPORTED_VERSION = "unsupported_version"  # before 3.10, past MAX_VERSION, or not known
    UNREADABLE = "unreadable"  # the maps or the interpreter file could not be read (permissions, parse)
    GONE = "gone"  # the process exited while it was being inspected


@dataclass(frozen=True, slots=True)
class NotPython:
    reason: NotPythonReason
    detail: str


@dataclass(frozen=True, slots=True)
class PythonRuntime:
    """One process's CPython: which file, which version, and where its symbols are at run time (0: absent)."""

    pid: int
    elf_path: str  # as the process maps it
    shared_library: bool  # libpython (True) or the executable itself
    version: tuple[int, int, int]  # micro is 0 when only the file name told the version
    version_source: str  # "Py_Version" or "filename"
    free_threaded: bool
    load_bias: int
    runtime: int  # &_PyRuntime
    py_version: int  # &Py_Version (3.11+)
    gilstate_get_this_thread_state: int  # PyGILState_GetThisThreadState
    code_type: int  # &PyCode_Type
    unicode_type: int
    bytes_type: int
    tss_get: int  # PyThread_tss_get
    pthread_getspecific: int  # from the C library's mapping (or the interpreter when static)

    @property
    def minor(self) -> tuple[int, int]:
        return self.version[0], self.version[1]


def name_version(path: str) -> tuple[int, int, bool] | None:
    """(major, minor, free-threaded) from a file name or soname such as libpython3.13t.so.1.0."""
    match = _NAME.match(os.path.basename(path))
    if match is None:
        return None
    return int(match.group(2)), int(match.group(3)), match.group(4) == "t"


@dataclass(frozen=True, slots=True)
class _Candidate:
    entry: MapEntry
    shared_library: bool


def _candidates(maps: ProcessMaps) -> list[_Candidate]:
    """The mappings that may hold the interpreter, one per file, libpython first, then the executable."""
    seen: set[str] = set()
    libraries: list[_Candidate] = []
    executables: list[_Candidate] = []
    for entry in maps.mappings:
        if entry.kind not in (MapKind.FILE, MapKind.DELETED) or entry.path in seen:
            continue
        seen.add(entry.path)
        base = os.path.basename(_shown_path(entry))
        if base.startswith("libpython"):
            libraries.append(_Candidate(entry, True))
        elif printable(entry.path) == maps.exe_path or name_version(base) is not None:
            executables.append(_Candidate(entry, False))
    return libraries + executables


def _shown_path(entry: MapEntry) -> str:
    """The mapped file's path without the " (deleted)" the kernel appends to an unlinked one."""
    return entry.path.removesuffix(" (deleted)")


def _pid_gone(proc_root: Path, pid: int) -> bool:
    return not (proc_root / str(pid)).exists()


def discover(
    pid: int, proc_root: str | Path = "/proc", memory: MemoryReader | None = None, symbols: SymbolCache | None = None
) -> PythonRuntime | NotPython:
    """What CPython (if any) process `pid` runs; `memory` reads it (default: a ProcessMemory of `pid`);
    `symbols` keeps what was read of each ELF file (default: every file is parsed afresh)."""
    root = Path(proc_root)
    try:
        maps = read_process_maps(root, pid)
    except (FileNotFoundError, ProcessLookupError) as e:
        return NotPython(NotPythonReason.GONE, f"maps: {e}")
    except OSError as e:  # EACCES: another user's process, or one outside this agent's namespace
        return NotPython(NotPythonReason.UNREADABLE, f"maps: {e}")
    candidates = _candidates(maps)
    named = [c for c in candidates if name_version(_shown_path(c.entry)) is not None]
    for candidate in candidates:
        opened = open_mapped_file(root, pid, candidate.entry)
        if opened is None:
            continue
        try:
            named_symbols = read_symbols(symbols, opened, PYTHON_SYMBOLS, candidate.entry.path)
        except ElfReadError:
            continue
        if "_PyRuntime" in named_symbols.addresses:
            reader = memory if memory is not None else ProcessMemory(pid, root)
            return _runtime(root, maps, candidate, named_symbols, reader, symbols)
    if _pid_gone(root, pid):
        return NotPython(NotPythonReason.GONE, "exited during discovery")
    for candidate in named:
        version = name_version(_shown_path(candidate.entry))
        if version is not None and not MIN_VERSION <= version[:2] <= MAX_VERSION:
            return NotPython(NotPythonReason.UNSUPPORTED_VERSION, f"{candidate.entry.path}: {version[0]}.{version[1]}")
    if named:
        return NotPython(NotPythonReason.NO_SYMBOLS, f"{named[0].entry.path}: no _PyRuntime symbol")
    return NotPython(NotPythonReason.NOT_PYTHON, f"{len(maps.mappings)} executable mappings, none CPython")


def _runtime(
    root: Path,
    maps: ProcessMaps,
    candidate: _Candidate,
    symbols: NamedSymbols,
    memory: MemoryReader,
    cache: SymbolCache | None,
) -> PythonRuntime | NotPython:
    entry = candidate.entry
    segment = segment_for_offset(symbols.segments, entry.offset)
    if segment is None:
        return NotPython(NotPythonReason.UNREADABLE, f"{entry.path}: no load segment at offset {entry.offset:#x}")
    bias = load_bias(entry, segment)
    at = {name: value + bias for name, value in symbols.addresses.items()}
    from_name = name_version(symbols.soname) or name_version(_shown_path(entry))
    found = _version(memory, at.get("Py_Version", 0), from_name)
    if isinstance(found, NotPython):
        return found
    version, source = found
    if not MIN_VERSION <= version[:2] <= MAX_VERSION:
        return NotPython(NotPythonReason.UNSUPPORTED_VERSION, f"{entry.path}: {version[0]}.{version[1]}")
    free_threaded = _free_threaded(memory, at["_PyRuntime"], version, from_name)
    if isinstance(free_threaded, NotPython):
        return free_threaded
    return PythonRuntime(
        pid=maps.pid,
        elf_path=printable(entry.path),
        shared_library=candidate.shared_library,
        version=version,
        version_source=source,
        free_threaded=free_threaded,
        load_bias=bias,
        runtime=at["_PyRuntime"],
        py_version=at.get("Py_Version", 0),
        gilstate_get_this_thread_state=at.get("PyGILState_GetThisThreadState", 0),
        code_type=at.get("PyCode_Type", 0),
        unicode_type=at.get("PyUnicode_Type", 0),
        bytes_type=at.get("PyBytes_Type", 0),
        tss_get=at.get("PyThread_tss_get", 0),
        pthread_getspecific=at.get("pthread_getspecific", 0) or _libc_symbol(root, maps, "pthread_getspecific", cache),
    )


def _version(
    memory: MemoryReader, py_version: int, from_name: tuple[int, int, bool] | None
) -> tuple[tuple[int, int, int], str] | NotPython:
    """((major, minor, micro), source) from Py_Version (PY_VERSION_HEX), else the name (micro 0: unknown)."""
    if py_version:
        try:
            hexversion = struct.unpack("<I", memory.read(py_version, 4))[0]
        except MemoryReadError as e:
            if e.reason == MemoryErrorReason.GONE:
                return NotPython(NotPythonReason.GONE, str(e))
        else:
            read = (hexversion >> 24, hexversion >> 16 & 0xFF, hexversion >> 8 & 0xFF)
            if read[0] == 3 and (from_name is None or from_name[:2] == read[:2]):
                return read, "Py_Version"
    if from_name is None:
        return NotPython(NotPythonReason.UNSUPPORTED_VERSION, "no Py_Version and no version in the file name")
    return (from_name[0], from_name[1], 0), "filename"


def _free_threaded(
    memory: MemoryReader, runtime: int, version: tuple[int, int, int], from_name: tuple[int, int, bool] | None
) -> bool | NotPython:
    """The `t` of the name, or (3.13+) `_PyRuntime.debug_offsets.free_threaded`, which says it for certain."""
    named = bool(from_name and from_name[2])
    if version[:2] < (3, 13):
        return named
    try:
        head = memory.read(runtime, len(DEBUG_COOKIE) + 16)
    except MemoryReadError as e:
        return NotPython(NotPythonReason.GONE, str(e)) if e.reason == MemoryErrorReason.GONE else named
    if head[: len(DEBUG_COOKIE)] != DEBUG_COOKIE:
        return named  # read_layout will refuse this runtime, with the reason
    return bool(struct.unpack_from("<Q", head, len(DEBUG_COOKIE) + 8)[0]) or named


def _libc_symbol(root: Path, maps: ProcessMaps, name: str, cache: SymbolCache | None) -> int:
    """The runtime address of `name` in the process's C library mapping, 0 when not found."""
    for entry in maps.mappings:
        if entry.kind is not MapKind.FILE or not _LIBC.match(os.path.basename(entry.path)):
            continue
        opened = open_mapped_file(root, maps.pid, entry)
        if opened is None:
            continue
        try:
            symbols = read_symbols(cache, opened, (name,), entry.path)
        except ElfReadError:
            continue
        segment = segment_for_offset(symbols.segments, entry.offset)
        if name in symbols.addresses and segment is not None:
            return symbols.addresses[name] + load_bias(entry, segment)
    return 0


_PYTHON_MAPPING = re.compile(rb"/(lib)?python\d+\.\d+[^/\n]*$", re.MULTILINE)


def running_pythons(proc_root: str | Path = "/proc") -> list[int]:
    """The pids of the processes running now that map a python-named ELF (libpython3.X, python3.X): the
    start-up scan's candidates, found from their maps' text alone (a CPython under another name is
    inspected at its first sample, as any process is)."""
    root = Path(proc_root)
    found: list[int] = []
    try:
        names = os.listdir(root)
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            maps = (root / name / "maps").read_bytes()
        except OSError:  # gone, or a kernel thread's empty maps denied
            continue
        if _PYTHON_MAPPING.search(maps):
            found.append(int(name))
    return sorted(found)


def read_layout(memory: MemoryReader, runtime: PythonRuntime) -> PythonLayout:
    """The runtime's layout: a table (3.10-3.12) or its debug offsets read from `_PyRuntime` (3.13+).

    Raises LayoutError (no table, bad cookie, unknown format) or MemoryReadError (unreadable).
    """
    if runtime.minor < (3, 13):
        return layout_for_version(runtime.minor)
    return layout_from_debug_offsets(memory.read(runtime.runtime, debug_offsets_size(runtime.minor)))
