"""Probes stage: the maps that tell the BPF walker which processes to walk as Python, and how.

Owns writing `python_procs` (pid -> `PythonProcRecord`, how to find and walk a validated process's
frames) and `python_threads` ((pid, pthread id) -> PyThreadState address, the walker's source of
thread states when the record says PYTHON_USE_THREAD_MAP) in the loaded program (docs/python.md). The
process stage decides what to write; this only writes it, remembers which thread keys it wrote per pid
(so a pid's threads can be replaced or forgotten without iterating the map) and counts what it could
not write. The exit tracepoint deletes an exiting process's `python_procs` entry and each exiting
thread's `python_threads` entry in the kernel, so a reused pid or pthread id is never walked with a
dead process's offsets; `forget` drops what user space still remembers of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from agent.probes.records import PythonProcRecord, PythonThreadKey

logger = logging.getLogger(__name__)

PYTHON_PROCS = "python_procs"
PYTHON_THREADS = "python_threads"
PYTHON_PROCS_ENTRIES = 4096  # Python processes walked at once
PYTHON_THREADS_ENTRIES = 65536  # threads found through the thread map, over every process
PYTHON_CODES_SEEN_ENTRIES = 16384  # code objects the walker remembers having met, over every process


class PythonMaps:
    """The writer of one loaded program's `python_procs` and `python_threads`. Not thread-safe: one
    owner (the pipeline thread) calls it. `failures` counts writes refused by the kernel, by map."""

    def __init__(self, bpf: Any) -> None:
        self._procs = bpf[PYTHON_PROCS.encode()]
        self._threads = bpf[PYTHON_THREADS.encode()]
        self._thread_keys: dict[int, set[int]] = {}  # pid -> the pthread ids written for it
        self.failures: Counter[str] = Counter({PYTHON_PROCS: 0, PYTHON_THREADS: 0})

    def processes(self) -> int:
        """Processes enabled now, as the kernel's map holds them (the exit tracepoint deletes exited ones).
        A method, not __len__: a writer with no process yet must not be falsy."""
        return len(self._procs)

    def enable(self, pid: int, record: PythonProcRecord) -> bool:
        """Walk `pid`'s Python frames from its next sample on, with `record`; False if the map is full."""
        try:
            self._procs[ctypes.c_uint32(pid)] = record
        except Exception as e:  # bcc raises bare Exception when the kernel refuses the update
            self.failures[PYTHON_PROCS] += 1
            logger.debug("cannot enable Python frames of process %d: %s", pid, e)
            return False
        return True

    def disable(self, pid: int) -> None:
        """Stop walking `pid` (its thread entries stay until `forget` or `set_threads`)."""
        _delete(self._procs, ctypes.c_uint32(pid))

    def set_threads(self, pid: int, threads: Mapping[int, int]) -> bool:
        """Replace `pid`'s thread entries with `threads` (pthread id -> PyThreadState address); False if
        some could not be written (the map is full: those threads' samples say PYTHON_NO_THREAD_STATE)."""
        previous = self._thread_keys.pop(pid, set())
        for pthread in previous - threads.keys():
            _delete(self._threads, _thread_key(pid, pthread))
        written: set[int] = set()
        complete = True
        for pthread, tstate in threads.items():
            try:
                self._threads[_thread_key(pid, pthread)] = ctypes.c_uint64(tstate)
            except Exception as e:  # as in enable
                self.failures[PYTHON_THREADS] += 1
                logger.debug("cannot write thread %#x of process %d: %s", pthread, pid, e)
                complete = False
                continue
            written.add(pthread)
        if written:
            self._thread_keys[pid] = written
        return complete

    def forget(self, pid: int) -> None:
        """`pid` exited (or is no longer Python): drop its record and every thread entry written for it."""
        self.disable(pid)
        for pthread in self._thread_keys.pop(pid, set()):
            _delete(self._threads, _thread_key(pid, pthread))

    def threads_of(self, pid: int) -> frozenset[int]:
        """The pthread ids written for `pid` (what `set_threads` last wrote)."""
        return frozenset(self._thread_keys.get(pid, ()))


def _thread_key(pid: int, pthread: int) -> PythonThreadKey:
    return PythonThreadKey(pid=pid, pthread=pthread)


def _delete(table: Any, key: ctypes.Structure | ctypes.c_uint32) -> None:
    # Already gone: the exit tracepoint deleted it, or it was never written.
    with contextlib.suppress(KeyError):
        del table[key]
