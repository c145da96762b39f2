"""Probes stage: one poll across the perf buffers of every loaded profiler.

BCC polls the buffers of one `BPF` object at a time; each profiler is its own object, so the reader
thread hands all their perf readers to libbcc's `perf_reader_poll` in one call instead (what
`BPF.perf_buffer_poll` does for one object), and every buffer wakes the same thread.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Protocol


class PolledProbe(Protocol):
    def readers(self) -> list[int]: ...

    def drain(self) -> None: ...


class PerfReader:
    def __init__(self, probes: Sequence[PolledProbe]) -> None:
        from bcc.libbcc import lib

        self._lib = lib
        self._probes = probes
        readers = [reader for probe in probes for reader in probe.readers()]
        self._count = len(readers)
        self._readers = (ctypes.c_void_p * self._count)(*readers)

    def poll(self, timeout_ms: int) -> None:
        self._lib.perf_reader_poll(self._count, self._readers, timeout_ms)

    def drain(self) -> None:
        for probe in self._probes:
            probe.drain()
