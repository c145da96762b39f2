"""Types of the session fixtures in tests/unit/conftest.py (compiled binaries, fake /proc), for the test
modules that annotate their fixture arguments: one definition instead of one per module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

NmFunctions = Callable[..., dict[str, tuple[int, int]]]  # binary -> {function: (address, size)}
LoadRow = tuple[int, int, int, int, str]  # offset, vaddr, filesz, memsz, readelf flags ("R E")
ReadelfLoads = Callable[[Path], list[LoadRow]]
MapsFor = Callable[[Path, int], list[str]]  # (binary, base) -> /proc/PID/maps lines
AddFakeProcess = Callable[..., Path]
