"""Symbolize stage: naming kernel addresses from `<proc_root>/kallsyms`.

This module owns `KernelSymbols`, the parsed table (text symbols only, in compact sorted arrays,
looked up by bisection), and `KallsymsCache`, which decides when the table is read again.

Reload policy: the table is parsed at first use and then again at most every `reload_interval_s`
(5 minutes by default). kallsyms changes when modules load or unload and when BPF programs are
JIT-compiled; a full parse of ~120k lines costs a few hundred milliseconds, too much for every
10-second interval but cheap every few minutes. Frames of code that appeared since the last parse are
named from the nearest older symbol, or left unnamed, until the next reload.
"""

from __future__ import annotations

import bisect
import logging
import time
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.symbolize.stats import ErrorReason, SymbolizerStats
from agent.symbolize.types import KERNEL_MAPPING_NAME, MappingInfo

logger = logging.getLogger(__name__)

_TEXT_TYPES = frozenset("tTwW")
_PAGE = 4096
_MAX_ADDRESS = (1 << 64) - 1


class KernelSymbols:
    """Kernel text symbols sorted by address. `usable` is False when the addresses are hidden or unreadable."""

    __slots__ = ("_addresses", "_names", "mapping", "usable")

    def __init__(self, addresses: array[int], names: tuple[str, ...]) -> None:
        self._addresses = addresses
        self._names = names
        self.usable = len(addresses) > 0
        if self.usable:
            # kallsyms gives no sizes: the last symbol is assumed to end within a page past its start.
            limit = min(((addresses[-1] // _PAGE) + 2) * _PAGE, _MAX_ADDRESS)
            self.mapping = MappingInfo(KERNEL_MAPPING_NAME, addresses[0], limit, 0)
        else:
            # Nothing is known about the kernel's layout: the pseudo-mapping spans the whole address space.
            self.mapping = MappingInfo(KERNEL_MAPPING_NAME, 0, _MAX_ADDRESS, 0)

    def lookup(self, address: int) -> str:
        """Name of the nearest text symbol at or below `address`, or "" outside the kernel text."""
        if not self.usable or not self.mapping.start <= address < self.mapping.limit:
            return ""
        i = bisect.bisect_right(self._addresses, address) - 1
        return self._names[i] if i >= 0 else ""

    def __len__(self) -> int:
        return len(self._names)


def parse_kallsyms(lines: Iterable[str]) -> tuple[KernelSymbols, bool]:
    """Parse kallsyms lines; return the table and whether the addresses were all hidden (zero).

    Lines look like `ffffffff81000000 T _stext` or `ffffffffc0201000 t name\\t[module]`; the module
    suffix is dropped and the function name kept. When several symbols share an address, the first
    one in file order is kept.
    """
    entries: list[tuple[int, int, str]] = []
    seen_text = False
    for order, line in enumerate(lines):
        parts = line.split()
        if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
            continue
        seen_text = True
        try:
            address = int(parts[0], 16)
        except ValueError:
            continue
        if address != 0:
            entries.append((address, order, parts[2]))
    hidden = seen_text and not entries
    entries.sort()
    addresses = array("Q")
    names: list[str] = []
    for address, _order, name in entries:
        if addresses and addresses[-1] == address:
            continue
        addresses.append(address)
        names.append(name)
    return KernelSymbols(addresses, tuple(names)), hidden


def load_kallsyms(path: Path, stats: SymbolizerStats) -> KernelSymbols:
    """Read and parse `path`; an unreadable or restricted file gives an unusable table, counted and logged."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            table, hidden = parse_kallsyms(f)
    except OSError as e:
        stats.errors[ErrorReason.KALLSYMS_UNREADABLE] += 1
        logger.debug("cannot read %s: %s; kernel frames stay unnamed", path, e)
        return KernelSymbols(array("Q"), ())
    stats.kallsyms_loads += 1
    if hidden:
        stats.errors[ErrorReason.KALLSYMS_RESTRICTED] += 1
        logger.debug("%s shows only zero addresses (kernel.kptr_restrict); kernel frames stay unnamed", path)
    return table


class KallsymsCache:
    """Holds the current `KernelSymbols` and re-reads kallsyms at most every `reload_interval_s`, and only
    when the loaded modules changed (`/proc/modules`, next to kallsyms): parsing kallsyms costs a quarter
    of a second of CPU, and module loads are what move or add kernel text. A kernel built without
    module support has no modules file and text that never changes: it is read once. With a modules
    file that cannot be read it re-reads on the interval alone.

    Seen without the once-only rule, on such a kernel (this VM's): the re-read every 300 s parsed 120k
    symbols again, and its transient lists grew the agent's RSS by 15 MB in one step that Python's
    allocator never handed back (#17)."""

    def __init__(
        self,
        path: Path,
        stats: SymbolizerStats,
        reload_interval_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._stats = stats
        self._reload_interval_s = reload_interval_s
        self._clock = clock
        self._table: KernelSymbols | None = None
        self._loaded_at = 0.0
        self._modules: bytes | None = None  # /proc/modules when the table was loaded

    def table(self) -> KernelSymbols:
        now = self._clock()
        if self._table is None or now - self._loaded_at >= self._reload_interval_s:
            modules = self._read_modules()
            if self._table is None or modules is None or modules != self._modules:
                self._table = load_kallsyms(self._path, self._stats)
                self._modules = modules
            self._loaded_at = now
        return self._table

    def _read_modules(self) -> bytes | None:
        """The modules file; b"" when there is none (no module support: the same every time), None when
        it cannot be read (never the same)."""
        try:
            return (self._path.parent / "modules").read_bytes()
        except FileNotFoundError:
            return b""
        except OSError:
            return None

    def size(self) -> int:
        return len(self._table) if self._table is not None else 0
