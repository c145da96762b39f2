"""The probes' side of Python frames: the walker's cflags (ProbeProgram) and the map writer (PythonMaps)."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from agent.features import KernelFeatures
from agent.probes.program import ProbeProgram
from agent.probes.python_maps import PYTHON_PROCS, PYTHON_THREADS, PythonMaps
from agent.probes.records import PythonProcRecord, PythonThreadKey
from agent.probes.settings import PythonSettings
from tests.support.config import PROFILING

WITH_BTF = KernelFeatures(False, False, None, "", task_fsbase_offset=3128, task_fsbase_unavailable="")
WITHOUT_BTF = KernelFeatures(
    False, False, None, "", task_fsbase_offset=None, task_fsbase_unavailable="/sys/kernel/btf/vmlinux is absent"
)


def test_the_walker_is_compiled_in_with_its_limit_and_the_kernels_offset() -> None:
    program = ProbeProgram(PROFILING, [], print, PythonSettings(enabled=True, max_frames=40), WITH_BTF)
    assert program.python_unavailable == ""
    defines = program.defines
    assert (defines["PYTHON_FRAMES"], defines["TASK_FSBASE_OFFSET"]) == (40, 3128)
    assert int(defines["PYTHON_PROCS_ENTRIES"]) > 0 and int(defines["PYTHON_THREADS_ENTRIES"]) > 0
    assert "-DPYTHON_FRAMES=40" in program.dump()


@pytest.mark.parametrize(
    ("python", "features", "reason"),
    [
        (None, WITH_BTF, "python.enabled is off"),
        (PythonSettings(enabled=False), WITH_BTF, "python.enabled is off"),
        (PythonSettings(), WITHOUT_BTF, "/sys/kernel/btf/vmlinux is absent"),
    ],
)
def test_the_walker_is_compiled_out_with_the_reason(
    python: PythonSettings | None, features: KernelFeatures, reason: str
) -> None:
    program = ProbeProgram(PROFILING, [], print, python, features)
    assert program.python_unavailable == reason
    assert program.defines["PYTHON_FRAMES"] == 0
    assert "TASK_FSBASE_OFFSET" not in program.defines


class FakeTable:
    """A bcc table as the writer uses it: keys by their bytes; a full map refuses updates."""

    def __init__(self, capacity: int) -> None:
        self.entries: dict[bytes, bytes] = {}
        self.capacity = capacity

    def __setitem__(self, key: Any, value: Any) -> None:
        if bytes(key) not in self.entries and len(self.entries) >= self.capacity:
            raise Exception("Could not update table: Argument list too long")  # what bcc raises
        self.entries[bytes(key)] = bytes(value)

    def __delitem__(self, key: Any) -> None:
        if bytes(key) not in self.entries:
            raise KeyError(key)
        del self.entries[bytes(key)]

    def __len__(self) -> int:
        return len(self.entries)


def maps(procs: int = 8, threads: int = 8) -> tuple[PythonMaps, FakeTable, FakeTable]:
    tables = {PYTHON_PROCS.encode(): FakeTable(procs), PYTHON_THREADS.encode(): FakeTable(threads)}
    return PythonMaps(tables), tables[PYTHON_PROCS.encode()], tables[PYTHON_THREADS.encode()]


def thread(pid: int, pthread: int) -> bytes:
    return bytes(PythonThreadKey(pid=pid, pthread=pthread))


def test_enable_disable_and_a_full_map() -> None:
    writer, procs, _ = maps(procs=1)
    record = PythonProcRecord(tls_offset=792, flags=1)
    assert writer.enable(10, record)
    assert procs.entries == {bytes(ctypes.c_uint32(10)): bytes(record)}
    assert writer.processes() == 1
    assert not writer.enable(11, record)  # full: counted, not raised
    assert writer.failures[PYTHON_PROCS] == 1
    writer.disable(10)
    writer.disable(10)  # already gone (the exit tracepoint may have deleted it): no error
    assert procs.entries == {} and writer.processes() == 0


def test_set_threads_replaces_that_pids_entries_only() -> None:
    writer, _, threads = maps()
    assert writer.set_threads(10, {0x7F00: 0x1000, 0x7F80: 0x2000})
    assert writer.set_threads(20, {0x7F00: 0x3000})
    assert writer.set_threads(10, {0x7F80: 0x2100, 0x7FC0: 0x4000})
    assert threads.entries == {
        thread(10, 0x7F80): bytes(ctypes.c_uint64(0x2100)),
        thread(10, 0x7FC0): bytes(ctypes.c_uint64(0x4000)),
        thread(20, 0x7F00): bytes(ctypes.c_uint64(0x3000)),
    }
    assert writer.threads_of(10) == {0x7F80, 0x7FC0}


def test_forget_drops_the_record_and_every_thread_even_those_the_kernel_deleted() -> None:
    writer, procs, threads = maps()
    writer.enable(10, PythonProcRecord())
    writer.set_threads(10, {0x7F00: 0x1000, 0x7F80: 0x2000})
    writer.set_threads(20, {0x7F00: 0x3000})
    del threads[PythonThreadKey(pid=10, pthread=0x7F00)]  # that thread exited: the tracepoint deleted it
    writer.forget(10)
    assert procs.entries == {} and threads.entries == {thread(20, 0x7F00): bytes(ctypes.c_uint64(0x3000))}
    assert writer.threads_of(10) == frozenset()


def test_a_full_thread_map_keeps_what_fit_and_counts_the_rest() -> None:
    writer, _, threads = maps(threads=2)
    assert not writer.set_threads(10, {0x1: 1, 0x2: 2, 0x3: 3})
    assert len(threads) == 2 and writer.failures[PYTHON_THREADS] == 1
    assert writer.threads_of(10) == {0x1, 0x2}
    writer.forget(10)
    assert len(threads) == 0
