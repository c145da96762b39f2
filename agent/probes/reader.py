"""Probes stage: one poll across every perf buffer of the agent's BPF object.

The profilers share one `BPF` object (`agent.probes.program`): its perf readers, gathered once, are
handed to libbcc's `perf_reader_poll` in one call (what `BPF.perf_buffer_poll` does, without building
the array again at every poll), and every buffer wakes the same thread.
"""

from __future__ import annotations

import ctypes
from typing import Protocol


class PolledProgram(Protocol):
    def readers(self) -> list[int]: ...

    def drain(self) -> None: ...


class PerfReader:
    def __init__(self, program: PolledProgram) -> None:
        from bcc.libbcc import lib

        self._lib = lib
        self._program = program
        readers = program.readers()
        self._count = len(readers)
        self._readers = (ctypes.c_void_p * self._count)(*readers)

    def poll(self, timeout_ms: int) -> None:
        self._lib.perf_reader_poll(self._count, self._readers, timeout_ms)

    def drain(self) -> None:
        self._program.drain()
