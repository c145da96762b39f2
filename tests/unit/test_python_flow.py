"""Flow: the pipeline's Python wiring (`agent.flow.python.PythonFrames`) with a fake inspector, maps and cache.

A NEW announcement inspects the pid and enables it in BPF with the record built from the verdict (and
the thread map for a thread-map process); a first sample of a process without a verdict inspects it once;
an EXEC retires the BPF entries, the verdict and the cached code objects; every kept event's code objects
are resolved at once (shims skipped); a thread-map process's threads are rewritten at interval ends and,
rate-limited, when a sample found no thread state; exited pids are dropped at interval ends. A verdict
marked `retry` (a runtime not ready yet) is inspected again on the backoff from `poll`, bounded, the
last attempt final; a garbage verdict is final at once; the start-up scan inspects running processes
before their first sample, whose announcement then keeps the verdict of the same image.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest

from agent.flow.pipeline import Pipeline
from agent.flow.python import EAGER_S, RESOLVE_LAG_S, RETRY_DELAYS_S, PythonFrames, record_of
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
    """Gives each pid its verdict; a list of verdicts is given in turn (the last one from then on), as
    a process whose runtime becomes ready would get them. An attempt that may not be retried turns a
    `retry` verdict into the final one the real inspector would give (validation_failed)."""

    def __init__(self, verdicts: Mapping[int, PythonProcess | list[PythonProcess]]) -> None:
        self.verdicts = dict(verdicts)
        self.current: dict[int, PythonProcess] = {}
        self.inspections: list[int] = []
        self.retry_flags: list[bool] = []  # the `retry` argument of each inspection
        self.refreshes: list[int] = []
        self.same: set[int] = set()  # pids whose process image is the one their verdict is about

    def inspect(self, pid: int, retry: bool = False) -> PythonProcess:
        self.inspections.append(pid)
        self.retry_flags.append(retry)
        verdict = self.verdicts.get(pid, PythonProcess(pid, PythonState.NOT_PYTHON, "no_runtime"))
        if isinstance(verdict, list):
            verdict = verdict.pop(0) if len(verdict) > 1 else verdict[0]
        if verdict.retry and not retry:
            verdict = dataclasses.replace(verdict, state=PythonState.VALIDATION_FAILED, retry=False)
        self.current[pid] = verdict
        return verdict

    def get(self, pid: int) -> PythonProcess | None:
        return self.current.get(pid)

    def same_image(self, pid: int) -> bool:
        return pid in self.current and pid in self.same

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
        self.reads = 0

    def resolve(self, pid: int, address: int) -> object:
        if (pid, address) not in self.resolved:
            self.reads += 1  # as the real resolver: the first time, it reads the process's memory
        self.resolved[(pid, address)] += 1
        return None

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)

    def release(self, pid: int) -> None:
        self.released.append(pid)


class Observer:
    def observe_process(self, pid: int) -> None:
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
    def __init__(
        self, verdict: PythonProcess | list[PythonProcess], proc_root: Path, clock: list[float] | None = None
    ) -> None:
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


NOT_READY = PythonProcess(PID, PythonState.INITIALIZING, "no_threads", version=(3, 12), retry=True)
GARBAGE = PythonProcess(PID, PythonState.VALIDATION_FAILED, "bad_pointer", version=(3, 12))


def _poll_at(h: Harness, now: float) -> float:
    h.clock[0] = now
    return h.pipeline.poll(1.0)


def test_an_interpreter_not_ready_yet_is_inspected_again_until_enabled(tmp_path: Path) -> None:
    """Announced before its runtime was set up: not a verdict. It is inspected again on the backoff, from
    `poll` (the pipeline thread between batches), until it is enabled; then never again."""
    h = Harness([NOT_READY, NOT_READY, ENABLED], _alive(tmp_path, PID), [100.0])
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    assert (h.inspector.inspections, h.maps.calls) == ([PID], [])
    # The pipeline may wait only until the first retry is due.
    assert _poll_at(h, 100.0) == pytest.approx(RETRY_DELAYS_S[0])
    assert h.inspector.inspections == [PID]  # not due yet
    _poll_at(h, 100.0 + RETRY_DELAYS_S[0])
    assert h.inspector.inspections == [PID, PID] and h.maps.calls == []
    second = 100.0 + RETRY_DELAYS_S[0] + RETRY_DELAYS_S[1]
    wait = _poll_at(h, second)
    assert h.inspector.inspections == [PID, PID, PID]
    assert ENABLED.spec is not None
    assert h.maps.calls == [("enable", PID, bytes(record_of(ENABLED.spec)))]
    assert all(h.inspector.retry_flags)  # none of them was the last attempt
    assert wait == pytest.approx(RESOLVE_LAG_S)  # a walked process's events are resolved soon after they arrive
    for later in (1.0, 10.0, 100.0):
        _poll_at(h, second + later)
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x1000, 7))))
    assert h.inspector.inspections == [PID, PID, PID]
    assert h.frames.stats["retries"] == 2


def test_a_garbage_interpreter_is_a_final_verdict(tmp_path: Path) -> None:
    h = Harness(GARBAGE, _alive(tmp_path, PID), [100.0])
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    for now in (100.01, 100.1, 101.0, 110.0):
        assert _poll_at(h, now) == 1.0  # nothing to wait for: no retry, nothing walked
    assert h.inspector.inspections == [PID] and h.maps.calls == []


def test_retries_are_bounded_and_the_last_verdict_is_final(tmp_path: Path) -> None:
    h = Harness(NOT_READY, _alive(tmp_path, PID), [0.0])
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    for _ in range(3 * len(RETRY_DELAYS_S)):
        _poll_at(h, h.clock[0] + max(RETRY_DELAYS_S))
    assert len(h.inspector.inspections) == len(RETRY_DELAYS_S) + 1
    assert h.inspector.retry_flags == [True] * len(RETRY_DELAYS_S) + [False]
    verdict = h.inspector.get(PID)
    assert verdict is not None and (verdict.state, verdict.retry) == (PythonState.VALIDATION_FAILED, False)
    assert h.maps.calls == []


def test_an_exec_or_exit_cancels_the_retries(tmp_path: Path) -> None:
    h = Harness(NOT_READY, _alive(tmp_path, PID), [0.0])
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    h.pipeline.handle(ProcessEvent(1, PID, ProcessEventKind.EXEC))
    _poll_at(h, 60.0)
    assert h.inspector.inspections == [PID]
    h.pipeline.handle(ProcessEvent(2, PID, ProcessEventKind.NEW))  # the new image: inspected, retried
    (tmp_path / str(PID)).rmdir()
    h.inspector.verdicts[PID] = dataclasses.replace(GARBAGE, state=PythonState.READ_FAILED, reason="gone")
    _poll_at(h, 60.0 + RETRY_DELAYS_S[0])  # the retry finds it gone: final
    _poll_at(h, 120.0)
    assert h.inspector.inspections == [PID, PID, PID]


def test_a_thread_map_fallback_is_walked_meanwhile_and_replaced_by_the_tss_slot(tmp_path: Path) -> None:
    """Its main thread's TSS slot was not set yet: walked through the thread map until a retry finds
    the slot, when its thread entries go."""
    unsettled = dataclasses.replace(THREAD_MAP, reason="tls_slot_not_found", retry=True)
    h = Harness([unsettled, ENABLED], _alive(tmp_path, PID), [0.0])
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    assert [call[0] for call in h.maps.calls] == ["enable", "set_threads"]
    _poll_at(h, RETRY_DELAYS_S[0])
    assert ENABLED.spec is not None
    assert h.maps.calls[2:] == [("enable", PID, bytes(record_of(ENABLED.spec))), ("set_threads", PID, {})]


def test_the_startup_scan_inspects_running_processes_before_they_are_sampled(tmp_path: Path) -> None:
    """Processes running before the agent are inspected from `poll` (the pipeline may not wait while
    some are left); the announcement at their first sample keeps the verdict of the same image, and
    their BPF entries, instead of inspecting them again."""
    h = Harness(ENABLED, _alive(tmp_path, PID, OTHER), [0.0])
    h.pipeline.scan_python([PID, OTHER])
    assert h.inspector.inspections == []
    _poll_at(h, 0.0)
    assert h.inspector.inspections == [PID, OTHER]
    assert [call[:2] for call in h.maps.calls] == [("enable", PID)]
    h.inspector.same.add(PID)
    h.pipeline.handle(ProcessEvent(1, PID, ProcessEventKind.NEW))
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x1000, 7))))
    assert h.inspector.inspections == [PID, OTHER]
    assert [call[:2] for call in h.maps.calls] == [("enable", PID)]  # never forgotten in between
    # Another image under the pid (its announcement after a reuse): inspected afresh.
    h.inspector.same.discard(PID)
    h.pipeline.handle(ProcessEvent(2, PID, ProcessEventKind.NEW))
    assert h.inspector.inspections == [PID, OTHER, PID]
    assert [call[:2] for call in h.maps.calls] == [("enable", PID), ("forget", PID), ("enable", PID)]


def test_events_are_resolved_promptly_only_while_new_code_comes(tmp_path: Path) -> None:
    """Eager for EAGER_S after the enable and after each first read of a code object; a steady process
    whose code objects are all cached lets the pipeline wait for its batches as without the walker."""
    h = Harness(ENABLED, _alive(tmp_path, PID), [50.0])
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    assert h.frames.eager() and _poll_at(h, 50.0) == pytest.approx(RESOLVE_LAG_S)
    h.clock[0] = 50.0 + EAGER_S / 2
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x1000, 7))))  # new code: re-armed
    h.clock[0] = 50.0 + EAGER_S * 1.2
    assert h.frames.eager()
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x1000, 9))))  # cached: no re-arm
    assert _poll_at(h, 50.0 + EAGER_S * 1.6) == pytest.approx(1.0)
    assert not h.frames.eager()
    h.pipeline.handle(_event(PID, InterpreterStack(InterpreterStatus.OK, (0x2000, 3))))
    assert h.frames.eager()


def test_nothing_walked_is_never_eager(tmp_path: Path) -> None:
    h = Harness(GARBAGE, _alive(tmp_path, PID), [5.0])
    h.pipeline.handle(ProcessEvent(0, PID, ProcessEventKind.NEW))
    assert not h.frames.eager()
