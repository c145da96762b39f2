"""Flow: the pipeline's Python wiring (`agent.flow.python.PythonFrames`) with a fake inspector, maps and cache.

A NEW announcement inspects the pid and enables it in BPF with the record built from the verdict (and
the thread map for a thread-map process); a first sample of a process without a verdict inspects it once;
an EXEC retires the BPF entries, the verdict and the cached code objects; every kept event's code objects
are resolved at once (shims skipped); a thread-map process's threads are rewritten at interval ends and,
rate-limited, when a sample found no thread state; exited pids are dropped at interval ends.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from agent.flow.pipeline import Pipeline
from agent.flow.python import PythonFrames, record_of
from agent.probes.events import IntervalMark, ProcessEvent, ProcessEventKind, StackEvent
from agent.probes.records import PythonProcRecord
from agent.process.python.layouts import PY312
from agent.process.python.proc import PythonProcess, PythonState, spec_of_layout
from agent.process.python.threads import TlsSlot
from agent.types import (
    EMPTY_STACK,
    PYTHON_FRAME_SHIM,
    InterpreterStack,
    InterpreterStatus,
    ProfileSpec,
    ValueType,
)

SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 1)
PID, OTHER = 4242, 5151


class FakeInspector:
    def __init__(self, verdicts: dict[int, PythonProcess]) -> None:
        self.verdicts = verdicts
        self.current: dict[int, PythonProcess] = {}
        self.inspections: list[int] = []
        self.refreshes: list[int] = []

    def inspect(self, pid: int) -> PythonProcess:
        self.inspections.append(pid)
        result = self.verdicts.get(pid, PythonProcess(pid, PythonState.NOT_PYTHON, "no_runtime"))
        self.current[pid] = result
        return result

    def get(self, pid: int) -> PythonProcess | None:
        return self.current.get(pid)

    def forget(self, pid: int) -> None:
        self.current.pop(pid, None)

    def refresh_threads(self, pid: int) -> Mapping[int, int] | None:
        self.refreshes.append(pid)
        return MappingProxyType({0x7000: 0x9000, 0x7100: 0x9100})

    def pids(self) -> frozenset[int]:
        return frozenset(self.current)


class FakeMaps:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, object]] = []

    def enable(self, pid: int, record: PythonProcRecord) -> bool:
        self.calls.append(("enable", pid, bytes(record)))
        return True

    def disable(self, pid: int) -> None:
        self.calls.append(("disable", pid, None))

    def set_threads(self, pid: int, threads: Mapping[int, int]) -> bool:
        self.calls.append(("set_threads", pid, dict(threads)))
        return True

    def forget(self, pid: int) -> None:
        self.calls.append(("forget", pid, None))


class FakeCodes:
    def __init__(self) -> None:
        self.resolved: Counter[tuple[int, int]] = Counter()
        self.forgotten: list[int] = []
        self.released: list[int] = []

    def resolve(self, pid: int, address: int) -> object:
        self.resolved[(pid, address)] += 1
        return None

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)

    def release(self, pid: int) -> None:
        self.released.append(pid)


class Observer:
    def observe_process(self, pid: int) -> None:
        pass

    def on_exec(self, pid: int) -> None:
        pass


ENABLED = PythonProcess(
    PID, PythonState.ENABLED, version=(3, 12), layout=PY312, spec=spec_of_layout(PY312, TlsSlot(792))
)
THREAD_MAP = dataclasses.replace(
    ENABLED,
    state=PythonState.THREAD_MAP,
    reason="tss_mismatch",
    spec=spec_of_layout(PY312, None),
    threads=MappingProxyType({0x7000: 0x9000}),
)


def _event(pid: int, python: InterpreterStack) -> StackEvent:
    return StackEvent("cpu", 1, pid, pid, 0, False, "python3", EMPTY_STACK, EMPTY_STACK, (1.0,), python=python)


class Harness:
    def __init__(self, verdict: PythonProcess, proc_root: Path, clock: list[float] | None = None) -> None:
        self.inspector = FakeInspector({PID: verdict})
        self.maps = FakeMaps()
        self.codes = FakeCodes()
        self.clock = clock if clock is not None else [0.0]
        self.frames = PythonFrames(self.inspector, self.maps, self.codes, proc_root, lambda: self.clock[0])
        self.delivered: list[object] = []
        self.pipeline = Pipeline({"cpu": SPEC}, Observer(), self.delivered.append, python=self.frames)


def _alive(tmp_path: Path, *pids: int) -> Path:
    for pid in pids:
        (tmp_path / str(pid)).mkdir(exist_ok=True)
    return tmp_path


def test_announced_process_is_inspected_and_enabled(tmp_path: Path) -> None:
    h = Harness(ENABLED, _alive(tmp_path, PID))
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    assert h.inspector.inspections == [PID]
    assert ENABLED.spec is not None
    assert h.maps.calls == [("enable", PID, bytes(record_of(ENABLED.spec)))]
    record = PythonProcRecord.from_buffer_copy(h.maps.calls[0][2])  # type: ignore[arg-type]
    assert (record.tls_offset, record.tstate_frame, record.frame_owner) == (792, PY312.tstate_frame, PY312.frame_owner)
    # Its samples do not inspect it again, in this interval or the next.
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x1000, 7))))
    h.pipeline.handle(IntervalMark(10))
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x1000, 7))))
    assert h.inspector.inspections == [PID]


def test_a_process_running_before_the_agent_is_inspected_at_its_first_sample(tmp_path: Path) -> None:
    h = Harness(ENABLED, _alive(tmp_path, PID))
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.NONE)))
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.NONE)))
    h.pipeline.handle(_event(OTHER, InterpreterStack(InterpreterStatus.NONE)))
    assert h.inspector.inspections == [PID, OTHER]
    assert [call[:2] for call in h.maps.calls] == [("enable", PID)]  # OTHER is not Python


def test_code_objects_are_resolved_on_arrival_and_shims_skipped(tmp_path: Path) -> None:
    h = Harness(ENABLED, _alive(tmp_path, PID))
    frames = (0x1000 | 1, 40, 0x7FF0 | PYTHON_FRAME_SHIM, 0, 0x2000, 12)  # entry-flagged, shim, plain
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, frames)))
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.TRUNCATED, frames)))
    assert h.codes.resolved == Counter({(PID, 0x1000): 2, (PID, 0x2000): 2})


def test_exec_retires_the_bpf_entries_the_verdict_and_the_code_cache(tmp_path: Path) -> None:
    h = Harness(ENABLED, _alive(tmp_path, PID))
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    h.pipeline.handle(ProcessEvent(1, PID, ProcessEventKind.EXEC))
    assert h.maps.calls[-1] == ("forget", PID, None)
    assert h.inspector.get(PID) is None
    assert h.codes.forgotten == [PID]
    h.pipeline.handle(ProcessEvent(2, PID, ProcessEventKind.NEW))  # the new image's announcement
    assert h.inspector.inspections == [PID, PID]
    assert h.maps.calls[-1][:2] == ("enable", PID)


def test_thread_map_process_gets_its_threads_and_refreshes(tmp_path: Path) -> None:
    clock = [100.0]
    h = Harness(THREAD_MAP, _alive(tmp_path, PID), clock)
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    assert h.maps.calls[-1] == ("set_threads", PID, {0x7000: 0x9000})
    missing = _event(PID, InterpreterStack(InterpreterStatus.NO_THREAD_STATE))
    h.pipeline.handle(missing)
    h.pipeline.handle(missing)  # within the second: no second walk
    assert h.inspector.refreshes == [PID]
    clock[0] += 1.5
    h.pipeline.handle(missing)
    assert h.inspector.refreshes == [PID, PID]
    h.pipeline.handle(IntervalMark(10))  # every interval end refreshes
    assert h.inspector.refreshes == [PID, PID, PID]
    assert h.maps.calls[-1] == ("set_threads", PID, {0x7000: 0x9000, 0x7100: 0x9100})
    assert h.frames.stats["thread_refreshes"] == 3


def test_a_tss_process_never_walks_its_threads_again(tmp_path: Path) -> None:
    h = Harness(ENABLED, _alive(tmp_path, PID))
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.NO_THREAD_STATE)))
    h.pipeline.handle(IntervalMark(10))
    assert h.inspector.refreshes == []


def test_exited_pids_are_dropped_one_interval_end_later(tmp_path: Path) -> None:
    h = Harness(ENABLED, _alive(tmp_path, PID))
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    (tmp_path / str(PID)).rmdir()
    h.pipeline.handle(IntervalMark(10))
    assert h.inspector.get(PID) is not None  # the interval it left in is still being named
    h.pipeline.handle(IntervalMark(20))
    assert h.inspector.get(PID) is None
    assert h.maps.calls[-1] == ("forget", PID, None)
    assert (h.codes.released, h.codes.forgotten) == ([PID], [])  # its code objects stay for the report


def test_without_python_frames_nothing_is_inspected(tmp_path: Path) -> None:
    delivered: list[object] = []
    pipeline = Pipeline({"cpu": SPEC}, Observer(), delivered.append)
    pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x1000, 1))))
    pipeline.handle(IntervalMark(10))
    assert len(delivered) == 1
