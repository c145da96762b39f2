"""Process stage: is this process a HotSpot JVM, which release, and its vmStructs.

This module owns `discover_hotspot(pid)`, which finds `libjvm.so` among a process's executable
mappings, opens the very file mapped (`agent.process.runtime_files`), looks up the 24 vmStructs
variables it exports, and reads the tables from the process's memory (`agent.process.jvm.vmstructs`).
It returns a `HotSpot` (the release string the JVM reports, e.g. "17.0.15+6-Debian-1deb12u1", its
libjvm path and load bias, and the tables), or a `NotHotSpot` with a reason: most processes are not
JVMs, and a JVM still starting is worth another look later.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from agent.process.elf import ElfReadError, segment_for_offset
from agent.process.jvm.vmstructs import VM_SYMBOLS, VmStructs, VmStructsError, VmStructsReason, read_vmstructs
from agent.process.maps import MapEntry, MapKind, load_bias, printable, read_process_maps
from agent.process.memory import MemoryReader, MemoryReadError, ProcessMemory
from agent.process.runtime_files import SymbolCache, open_mapped_file, read_symbols

LIBJVM = "libjvm.so"
MAX_RELEASE = 128


class NotHotSpotReason(enum.StrEnum):
    NOT_JVM = "not_jvm"  # no libjvm.so mapped
    GONE = "gone"  # the process exited
    UNREADABLE = "unreadable"  # its maps, its libjvm.so or its memory could not be read
    NO_SYMBOLS = "no_symbols"  # a libjvm.so without the vmStructs exports (not HotSpot, or stripped)
    NOT_READY = "not_ready"  # HotSpot, still starting: the tables are not filled in yet
    MALFORMED = "malformed"  # tables out of every bound: not a layout this reader knows


@dataclass(frozen=True, slots=True)
class NotHotSpot:
    reason: NotHotSpotReason
    detail: str


@dataclass(frozen=True, slots=True)
class HotSpot:
    pid: int
    libjvm: str  # the mapped path, as /proc/PID/maps shows it
    bias: int  # libjvm.so's load bias: runtime address minus link-time address
    release: str  # Abstract_VM_Version::_s_vm_release, e.g. "25+36-LTS"; "" when unreadable
    vmstructs: VmStructs

    @property
    def feature(self) -> int:
        """The JDK feature release (17, 25, ...) from the release string; 0 when it has none."""
        head = self.release.split(".", 1)[0].split("+", 1)[0].split("-", 1)[0]
        return int(head) if head.isdigit() else 0


def discover_hotspot(
    pid: int, proc_root: str | Path = "/proc", memory: MemoryReader | None = None, symbols: SymbolCache | None = None
) -> HotSpot | NotHotSpot:
    """What HotSpot JVM (if any) process `pid` runs; `memory` reads it (default: a ProcessMemory of
    `pid`); `symbols` keeps what was read of each libjvm.so (default: parsed afresh)."""
    root = Path(proc_root)
    try:
        maps = read_process_maps(root, pid)
    except (FileNotFoundError, ProcessLookupError) as e:
        return NotHotSpot(NotHotSpotReason.GONE, f"maps: {e}")
    except OSError as e:
        return NotHotSpot(NotHotSpotReason.UNREADABLE, f"maps: {e}")
    entry = _libjvm(maps.mappings)
    if entry is None:
        return NotHotSpot(NotHotSpotReason.NOT_JVM, f"no {LIBJVM} among {len(maps.mappings)} executable mappings")
    opened = open_mapped_file(root, pid, entry)
    if opened is None:
        return NotHotSpot(NotHotSpotReason.UNREADABLE, f"{printable(entry.path)}: cannot be opened")
    try:
        named = read_symbols(symbols, opened, VM_SYMBOLS, entry.path)
    except ElfReadError as e:
        return NotHotSpot(NotHotSpotReason.UNREADABLE, str(e))
    if "gHotSpotVMStructs" not in named.addresses:
        return NotHotSpot(NotHotSpotReason.NO_SYMBOLS, f"{printable(entry.path)}: no gHotSpotVMStructs")
    segment = segment_for_offset(named.segments, entry.offset)
    if segment is None:
        return NotHotSpot(NotHotSpotReason.UNREADABLE, f"{entry.path}: no load segment at offset {entry.offset:#x}")
    bias = load_bias(entry, segment)
    reader = memory if memory is not None else ProcessMemory(pid, root)
    try:
        tables = read_vmstructs(reader, {name: value + bias for name, value in named.addresses.items()})
    except VmStructsError as e:
        if not (root / str(pid)).exists():
            return NotHotSpot(NotHotSpotReason.GONE, "exited while its vmStructs were read")
        return NotHotSpot(_REASONS[e.reason], str(e))
    return HotSpot(pid, printable(entry.path), bias, _release(reader, tables), tables)


_REASONS = {
    VmStructsReason.NOT_READY: NotHotSpotReason.NOT_READY,
    VmStructsReason.UNREADABLE: NotHotSpotReason.UNREADABLE,
    VmStructsReason.MALFORMED: NotHotSpotReason.MALFORMED,
}


def _libjvm(mappings: tuple[MapEntry, ...]) -> MapEntry | None:
    for entry in mappings:
        shown = entry.path.removesuffix(" (deleted)")
        if entry.kind in (MapKind.FILE, MapKind.DELETED) and os.path.basename(shown) == LIBJVM:
            return entry
    return None


def _release(memory: MemoryReader, tables: VmStructs) -> str:
    """The release string HotSpot reports (`java -version`'s build), through its static char*."""
    try:
        pointer = int.from_bytes(
            memory.read(tables.static_address("Abstract_VM_Version", "_s_vm_release"), 8), "little"
        )
        raw = memory.read(pointer, MAX_RELEASE) if pointer else b""
    except (KeyError, MemoryReadError):
        return ""
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")
