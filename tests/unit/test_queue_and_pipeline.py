"""Tests for the reader->pipeline queue (`agent.probes.queue`) and event routing (`agent.pipeline`)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterable

import pytest

from agent.aggregate.types import EMPTY_STACK, IntervalProfile, ProfileSpec, SampleKey, Stack, StackStatus, ValueType
from agent.pipeline import Pipeline, Stream
from agent.probes.events import StackEvent, IntervalMark, ProcessEvent, ProcessEventKind
from agent.probes.queue import DropOldestQueue
from agent.probes.stacks import StackResolver

# DropOldestQueue


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DropOldestQueue[int](0)


def test_batch_preserves_order() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(10)
    for item in (3, 1, 2):
        queue.put(item)
    assert len(queue) == 3
    assert queue.get_batch(timeout=0) == [3, 1, 2]
    assert len(queue) == 0
    assert queue.dropped == 0


def test_full_queue_drops_the_oldest_and_counts() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(3)
    for item in range(1, 6):
        queue.put(item)
    assert queue.dropped == 2
    assert queue.get_batch(timeout=0) == [3, 4, 5]
    queue.put(6)
    assert queue.dropped == 2  # room again after the batch was taken
    assert queue.get_batch(timeout=0) == [6]


def test_get_batch_on_an_empty_queue_returns_empty_after_the_timeout() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(3)
    started = time.monotonic()
    assert queue.get_batch(timeout=0.05) == []
    assert time.monotonic() - started >= 0.04


def test_get_batch_after_draining_waits_again() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(3)
    queue.put(1)
    assert queue.get_batch(timeout=0) == [1]
    assert queue.get_batch(timeout=0) == []


def test_put_from_another_thread_wakes_the_consumer() -> None:
    queue: DropOldestQueue[str] = DropOldestQueue(3)
    timer = threading.Timer(0.02, queue.put, args=("late",))
    timer.start()
    try:
        started = time.monotonic()
        assert queue.get_batch(timeout=5.0) == ["late"]
        assert time.monotonic() - started < 4.0
    finally:
        timer.cancel()
        timer.join()


# Pipeline

PERIOD = 52_631_578
SPEC = ProfileSpec(
    "cpu", (ValueType("samples", "count"), ValueType("cpu", "nanoseconds")), ValueType("cpu", "nanoseconds"), PERIOD
)
USER = (0x401000, 0x402000)
KERNEL = (0xFFFFFFFF81000000, 0xFFFFFFFF81000100)


class FakeStackTable:
    def __init__(self, stacks: dict[int, tuple[int, ...]]) -> None:
        self.stacks = stacks
        self.clears = 0

    def walk(self, stack_id: int) -> Iterable[int]:
        return iter(self.stacks[stack_id])

    def clear(self) -> None:
        self.clears += 1


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def observe_process(self, pid: int) -> None:
        self.calls.append(("observe_process", pid))

    def on_exec(self, pid: int) -> None:
        self.calls.append(("on_exec", pid))


class Harness:
    def __init__(self) -> None:
        self.tables = (FakeStackTable({1: USER, 2: KERNEL}), FakeStackTable({1: (0xABC,)}))
        self.generations: list[int] = []
        self.stacks = StackResolver(self.tables, self.generations.append)
        self.observer = RecordingObserver()
        self.delivered: list[IntervalProfile] = []
        self.pipeline = Pipeline({"cpu": Stream(SPEC, self.stacks)}, self.observer, self.delivered.append)


@pytest.fixture
def h() -> Harness:
    return Harness()


def cpu_event(
    pid: int = 100,
    *,
    tid: int | None = None,
    timestamp_ns: int = 0,
    user_stack_id: int = 1,
    kernel_stack_id: int = -errno.EFAULT,
    stack_gen: int = 0,
    kernel_thread: bool = False,
    comm: str = "worker",
) -> StackEvent:
    return StackEvent(
        profiler="cpu",
        timestamp_ns=timestamp_ns or time.monotonic_ns(),
        pid=pid,
        tid=pid if tid is None else tid,
        cpu=2,
        user_stack_id=user_stack_id,
        kernel_stack_id=kernel_stack_id,
        stack_gen=stack_gen,
        kernel_thread=kernel_thread,
        comm=comm,
        values=(1, SPEC.period),
    )


def mark(final: bool = False) -> IntervalMark:
    return IntervalMark(time.monotonic_ns(), final=final)


def test_cpu_events_are_aggregated_with_one_sample_and_one_period(h: Harness) -> None:
    assert h.pipeline.handle(cpu_event(100, kernel_stack_id=2)) is False
    h.pipeline.handle(cpu_event(100, kernel_stack_id=2))
    h.pipeline.handle(cpu_event(100, tid=101, comm="helper"))
    h.pipeline.handle(mark())
    (profile,) = h.delivered
    assert profile.spec is SPEC
    samples = {sample.key: sample for sample in profile.samples}
    user = Stack(StackStatus.OK, USER)
    main_key = SampleKey(100, 100, 2, Stack(StackStatus.OK, KERNEL), user)
    helper_key = SampleKey(100, 101, 2, EMPTY_STACK, user)
    assert set(samples) == {main_key, helper_key}
    assert samples[main_key].values == (2, 2 * PERIOD)
    assert samples[helper_key].values == (1, PERIOD)
    assert samples[helper_key].thread_name == "helper"


def test_kernel_thread_events_resolve_without_a_user_stack(h: Harness) -> None:
    h.pipeline.handle(cpu_event(2, user_stack_id=-errno.EFAULT, kernel_stack_id=2, kernel_thread=True))
    h.pipeline.handle(mark())
    (sample,) = h.delivered[0].samples
    assert sample.key.user is EMPTY_STACK
    assert sample.key.kernel == Stack(StackStatus.OK, KERNEL)


def test_stack_ids_are_resolved_in_the_events_generation(h: Harness) -> None:
    h.pipeline.handle(cpu_event(100, stack_gen=1))
    h.pipeline.handle(mark())
    assert h.delivered[0].samples[0].key.user == Stack(StackStatus.OK, (0xABC,))


def test_new_process_event_calls_on_exec_then_observe_process(h: Harness) -> None:
    h.pipeline.handle(ProcessEvent(1, 300, ProcessEventKind.NEW))
    assert h.observer.calls == [("on_exec", 300), ("observe_process", 300)]
    h.pipeline.handle(cpu_event(300))  # already captured: not again
    assert h.observer.calls == [("on_exec", 300), ("observe_process", 300)]


def test_exec_event_calls_on_exec_only(h: Harness) -> None:
    h.pipeline.handle(cpu_event(300))
    h.observer.calls.clear()
    h.pipeline.handle(ProcessEvent(1, 300, ProcessEventKind.EXEC))
    assert h.observer.calls == [("on_exec", 300)]
    h.pipeline.handle(cpu_event(300))  # the new image's mappings are captured on its next sample
    assert h.observer.calls == [("on_exec", 300), ("observe_process", 300)]


def test_first_cpu_event_of_an_unseen_pid_observes_it_once_per_interval(h: Harness) -> None:
    for _ in range(3):
        h.pipeline.handle(cpu_event(400))
    h.pipeline.handle(cpu_event(401))
    assert h.observer.calls == [("observe_process", 400), ("observe_process", 401)]
    h.pipeline.handle(mark())
    h.pipeline.handle(cpu_event(400))
    h.pipeline.handle(cpu_event(400))
    assert h.observer.calls == [("observe_process", 400), ("observe_process", 401), ("observe_process", 400)]


def test_kernel_thread_events_do_not_observe_the_process(h: Harness) -> None:
    h.pipeline.handle(cpu_event(2, user_stack_id=-errno.EFAULT, kernel_thread=True))
    assert h.observer.calls == []
    assert len(h.delivered) == 0


def test_interval_mark_delivers_rotates_and_returns_final(h: Harness) -> None:
    h.pipeline.handle(cpu_event(100))
    end = time.monotonic_ns()
    assert h.pipeline.handle(IntervalMark(end)) is False
    assert len(h.delivered) == 1
    assert h.delivered[0].end_mono_ns >= end
    assert len(h.delivered[0].samples) == 1
    assert h.generations == [0, 1]
    assert (h.tables[0].clears, h.tables[1].clears) == (0, 1)
    assert h.stacks.active_generation == 1

    assert h.pipeline.handle(mark(final=True)) is True
    assert len(h.delivered) == 2
    assert h.delivered[1].samples == ()  # the first interval's samples went with it
    assert h.delivered[1].start_mono_ns == h.delivered[0].end_mono_ns
    assert h.generations == [0, 1, 0]


def test_unknown_items_are_counted_and_ignored(h: Harness) -> None:
    assert h.pipeline.handle("surprise") is False
    assert h.pipeline.handle(None) is False
    assert h.pipeline.unknown_items == 2
    assert h.observer.calls == [] and h.delivered == []
