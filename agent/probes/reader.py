"""Probes stage: one poll across every perf buffer of the agent's BPF object.

The profilers share one `BPF` object (`agent.probes.program`); its perf readers are gathered once and
every buffer wakes the same thread.

The reader waits for a wakeup with `select.epoll` (the GIL released), then drains every ready buffer
with libbcc's `perf_reader_consume` called through `ctypes.PyDLL`, which keeps the GIL across the call.
libbcc calls back into Python once per record; through a `CDLL` (what `BPF.perf_buffer_poll` uses) each
callback must take the GIL anew, and while another thread of the agent is busy (the report thread
symbolizing an interval) every record then waits for a switch interval and two context switches. On a
host whose CPUs are busy those waits stretch to milliseconds and the reader fell behind the kernel:
measured here beside `stress-ng --cpu 2`, 10% of the CPU samples of a 99 Hz run were lost to full
buffers while the first interval was symbolized. Holding the GIL from libbcc's side, the callbacks'
Python code still hands the GIL over at every switch interval, as any thread's does, but a batch of
records costs one acquisition instead of one each.

`read_announcements` reads the process-event buffers alone, from inside another buffer's callback: a
record can be read before its process's announcement, which sits in another CPU's buffer (libbcc reads
the buffers in turn), and the unwinder then needs the mappings that announcement makes the registry
read or lay out. Only on the thread that reads: libbcc's readers are not shared between threads.
"""

from __future__ import annotations

import ctypes
import select
import threading
from typing import Protocol

LIBBCC = "libbcc.so.0"


class PolledProgram(Protocol):
    def readers(self) -> list[int]: ...

    def announcement_readers(self) -> list[int]: ...

    def read_kernel_counts(self) -> None: ...


class PerfReader:
    def __init__(self, program: PolledProgram) -> None:
        from bcc.libbcc import lib

        self._program = program
        readers = program.readers()
        self._count = len(readers)
        self._readers = (ctypes.c_void_p * self._count)(*readers)
        consume = ctypes.PyDLL(LIBBCC).perf_reader_consume  # PyDLL: the GIL stays held during the call
        consume.restype = ctypes.c_int
        consume.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
        self._consume = consume
        announcements = program.announcement_readers()
        self._announcements = (ctypes.c_void_p * len(announcements))(*announcements)
        self._thread: int | None = None  # the thread that polls (the only one that may read)
        self._epoll = select.epoll()
        for reader in readers:
            self._epoll.register(lib.perf_reader_fd(ctypes.c_void_p(reader)), select.EPOLLIN)

    def poll(self, timeout_ms: int, read_on_timeout: bool = False) -> None:
        """Wait up to `timeout_ms` for a buffer to wake the reader, then read every buffer; with
        `read_on_timeout`, read them after a timeout too (records below the wakeup threshold)."""
        self._thread = threading.get_ident()
        if self._epoll.poll(timeout_ms / 1000.0) or read_on_timeout:
            self._consume(self._count, self._readers)

    def drain(self) -> None:
        """Read whatever sits in the buffers below the wakeup threshold, then the in-kernel counts."""
        self._thread = threading.get_ident()
        self._consume(self._count, self._readers)
        self._program.read_kernel_counts()

    def read_announcements(self) -> None:
        """Read the process events waiting now (see the module docstring); elsewhere than on the
        reading thread, nothing."""
        if threading.get_ident() == self._thread and len(self._announcements):
            self._consume(len(self._announcements), self._announcements)

    def close(self) -> None:
        self._epoll.close()
