"""Tests for the reader->pipeline queue (`agent.flow.queue`) and event routing (`agent.flow.pipeline`)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from agent.aggregate.types import IntervalProfile, SampleKey
from agent.flow.pipeline import Pipeline
from agent.flow.queue import DropOldestQueue
from agent.probes.events import IntervalMark, ProcessEvent, ProcessEventKind, StackEvent, UserStackCopy
from agent.sampling.keep import KeepSampler
from agent.types import EMPTY_STACK, ProfileSpec, Stack, StackStatus, ValueType

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


def lazy_event(n: int = 0) -> StackEvent:
    return StackEvent("cpu", n, 1, 1, 0, False, "w", EMPTY_STACK, EMPTY_STACK, (1,))


def test_stack_events_wait_for_wake_at_items_or_the_timeout() -> None:
    queue: DropOldestQueue[object] = DropOldestQueue(100, wake_at=3)
    queue.put(lazy_event(1))
    queue.put(lazy_event(2))
    started = time.monotonic()
    assert queue.get_batch(timeout=0.05) == [lazy_event(1), lazy_event(2)]  # not woken: taken at the timeout
    assert time.monotonic() - started >= 0.04
    for n in range(3):
        queue.put(lazy_event(n))
    started = time.monotonic()
    assert len(queue.get_batch(timeout=5.0)) == 3  # the third woke the consumer
    assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("urgent", [IntervalMark(5), ProcessEvent(1, 2, ProcessEventKind.NEW), "anything else"])
def test_other_items_wake_the_consumer_at_once(urgent: object) -> None:
    queue: DropOldestQueue[object] = DropOldestQueue(100)
    queue.put(lazy_event())
    queue.put(urgent)
    started = time.monotonic()
    assert queue.get_batch(timeout=5.0) == [lazy_event(), urgent]
    assert time.monotonic() - started < 4.0


def test_wake_at_is_bounded_by_the_capacity() -> None:
    queue: DropOldestQueue[object] = DropOldestQueue(8, wake_at=1000)
    for n in range(2):  # a quarter of the capacity
        queue.put(lazy_event(n))
    started = time.monotonic()
    assert len(queue.get_batch(timeout=5.0)) == 2
    assert time.monotonic() - started < 4.0


def test_lazy_items_are_dropped_and_counted_like_any_other() -> None:
    queue: DropOldestQueue[object] = DropOldestQueue(3, lazy=(int,), wake_at=100)
    for item in range(1, 6):
        queue.put(item)
    assert queue.dropped == 2
    assert queue.get_batch(timeout=0) == [3, 4, 5]


def test_a_producer_thread_loses_nothing_while_batches_are_taken() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(1 << 20, lazy=(int,), wake_at=64)
    count = 200_000

    def produce() -> None:
        for item in range(count):
            queue.put(item)
        queue.put(-1)  # not lazy: wakes the consumer for the end

    producer = threading.Thread(target=produce)
    producer.start()
    taken: list[int] = []
    while not taken or taken[-1] != -1:
        taken += queue.get_batch(timeout=5.0)
    producer.join()
    assert taken == [*range(count), -1]
    assert queue.dropped == 0 and len(queue) == 0


# Pipeline

PERIOD = 52_631_578
SPEC = ProfileSpec(
    "cpu", (ValueType("samples", "count"), ValueType("cpu", "nanoseconds")), ValueType("cpu", "nanoseconds"), PERIOD
)
OTHER_SPEC = ProfileSpec("other", (ValueType("bytes", "bytes"),), ValueType("space", "bytes"), 1)
USER = Stack(StackStatus.OK, (0x401000, 0x402000))
KERNEL = Stack(StackStatus.OK, (0xFFFFFFFF81000000, 0xFFFFFFFF81000100))


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def observe_process(self, pid: int) -> None:
        self.calls.append(("observe_process", pid))


class Harness:
    def __init__(self) -> None:
        self.observer = RecordingObserver()
        self.delivered: list[IntervalProfile] = []
        self.pipeline = Pipeline({"cpu": SPEC, "other": OTHER_SPEC}, self.observer, self.delivered.append)

    def delivered_for(self, name: str) -> list[IntervalProfile]:
        return [profile for profile in self.delivered if profile.spec.name == name]


@pytest.fixture
def h() -> Harness:
    return Harness()


def cpu_event(
    pid: int = 100,
    *,
    tid: int | None = None,
    timestamp_ns: int = 0,
    user: Stack = USER,
    kernel: Stack = EMPTY_STACK,
    kernel_thread: bool = False,
    comm: str = "worker",
    profiler: str = "cpu",
    values: tuple[int, ...] = (1, PERIOD),
) -> StackEvent:
    return StackEvent(
        profiler=profiler,
        timestamp_ns=timestamp_ns or time.monotonic_ns(),
        pid=pid,
        tid=pid if tid is None else tid,
        cpu=2,
        kernel_thread=kernel_thread,
        comm=comm,
        kernel=kernel,
        user=user,
        values=values,
    )


def mark(final: bool = False) -> IntervalMark:
    return IntervalMark(time.monotonic_ns(), final=final)


def test_cpu_events_are_aggregated_with_one_sample_and_one_period(h: Harness) -> None:
    assert h.pipeline.handle(cpu_event(100, kernel=KERNEL)) is False
    h.pipeline.handle(cpu_event(100, kernel=Stack(StackStatus.OK, KERNEL.addresses)))  # equal, not identical
    h.pipeline.handle(cpu_event(100, tid=101, comm="helper"))
    h.pipeline.handle(mark())
    (profile,) = h.delivered_for("cpu")
    assert profile.spec is SPEC
    samples = {sample.key: sample for sample in profile.samples}
    main_key = SampleKey(100, 100, 2, KERNEL, USER)
    helper_key = SampleKey(100, 101, 2, EMPTY_STACK, USER)
    assert set(samples) == {main_key, helper_key}
    assert samples[main_key].values == (2, 2 * PERIOD)
    assert samples[helper_key].values == (1, PERIOD)
    assert samples[helper_key].thread_name == "helper"


def test_events_values_are_summed_as_given(h: Harness) -> None:
    h.pipeline.handle(cpu_event(100, values=(1, 10), timestamp_ns=5))
    h.pipeline.handle(cpu_event(100, values=(2, 30), timestamp_ns=3))
    h.pipeline.handle(mark())
    (sample,) = h.delivered_for("cpu")[0].samples
    assert sample.values == (3, 40)
    assert sample.timestamps_mono_ns == (3, 5)


def test_events_keep_their_stacks_as_they_are(h: Harness) -> None:
    missing, truncated = Stack(StackStatus.MISSING), Stack(StackStatus.TRUNCATED, (0x1, 0x2))
    h.pipeline.handle(cpu_event(100, kernel=KERNEL, user=missing))
    h.pipeline.handle(cpu_event(100, user=truncated))
    h.pipeline.handle(mark())
    keys = {sample.key for sample in h.delivered_for("cpu")[0].samples}
    assert keys == {SampleKey(100, 100, 2, KERNEL, missing), SampleKey(100, 100, 2, EMPTY_STACK, truncated)}


def test_kernel_thread_events_are_aggregated_without_a_user_stack(h: Harness) -> None:
    h.pipeline.handle(cpu_event(2, user=EMPTY_STACK, kernel=KERNEL, kernel_thread=True))
    h.pipeline.handle(mark())
    (sample,) = h.delivered_for("cpu")[0].samples
    assert sample.key.user is EMPTY_STACK
    assert sample.key.kernel == KERNEL


def test_each_profiler_aggregates_into_its_own_interval(h: Harness) -> None:
    h.pipeline.handle(cpu_event(100))
    h.pipeline.handle(cpu_event(100, profiler="other", values=(4096,)))
    h.pipeline.handle(cpu_event(100, profiler="other", values=(100,)))
    h.pipeline.handle(cpu_event(200, profiler="other", values=(7,)))
    h.pipeline.handle(mark())
    assert sorted(profile.spec.name for profile in h.delivered) == ["cpu", "other"]
    (cpu,) = h.delivered_for("cpu")
    (other,) = h.delivered_for("other")
    assert cpu.spec is SPEC and other.spec is OTHER_SPEC
    assert [(s.key.pid, s.values) for s in cpu.samples] == [(100, (1, PERIOD))]
    assert sorted((s.key.pid, s.values) for s in other.samples) == [(100, (4196,)), (200, (7,))]
    # A process is observed once, whichever profiler saw it first.
    assert h.observer.calls == [("observe_process", 100), ("observe_process", 200)]


def test_new_process_event_observes_the_process_once(h: Harness) -> None:
    # The registry captured it as the reader read the event (ProcessRegistry.announced): the pipeline
    # only marks it seen, which tells the registry's observers (the perf-map store).
    h.pipeline.handle(ProcessEvent(1, 300, ProcessEventKind.NEW))
    assert h.observer.calls == [("observe_process", 300)]
    h.pipeline.handle(cpu_event(300))  # already observed: not again
    assert h.observer.calls == [("observe_process", 300)]


def test_exec_event_makes_the_next_sample_observe_the_process_again(h: Harness) -> None:
    h.pipeline.handle(cpu_event(300))
    h.observer.calls.clear()
    h.pipeline.handle(ProcessEvent(1, 300, ProcessEventKind.EXEC))
    assert h.observer.calls == []
    h.pipeline.handle(cpu_event(300))  # covers a new image whose announcement was lost
    assert h.observer.calls == [("observe_process", 300)]


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
    h.pipeline.handle(cpu_event(2, user=EMPTY_STACK, kernel=KERNEL, kernel_thread=True))
    assert h.observer.calls == []
    assert len(h.delivered) == 0


def test_interval_mark_delivers_every_profilers_interval_and_returns_final(h: Harness) -> None:
    h.pipeline.handle(cpu_event(100))
    end = time.monotonic_ns()
    assert h.pipeline.handle(IntervalMark(end)) is False
    assert sorted(profile.spec.name for profile in h.delivered) == ["cpu", "other"]
    (cpu,) = h.delivered_for("cpu")
    (other,) = h.delivered_for("other")
    assert cpu.end_mono_ns >= end
    assert len(cpu.samples) == 1
    assert other.samples == ()  # a profiler without events still delivers its (empty) interval
    assert other.end_mono_ns == end

    assert h.pipeline.handle(mark(final=True)) is True
    assert len(h.delivered) == 4
    cpu_next = h.delivered_for("cpu")[1]
    assert cpu_next.samples == ()  # the first interval's samples went with it
    assert cpu_next.start_mono_ns == cpu.end_mono_ns
    assert h.delivered_for("other")[1].start_mono_ns == other.end_mono_ns


def test_unknown_items_are_counted_and_ignored(h: Harness) -> None:
    assert h.pipeline.handle("surprise") is False
    assert h.pipeline.handle(None) is False
    assert h.pipeline.unknown_items == 2
    assert h.observer.calls == [] and h.delivered == []


def test_events_of_an_unknown_profiler_are_counted_and_ignored(h: Harness) -> None:
    assert h.pipeline.handle(cpu_event(100, profiler="offcpu")) is False
    assert h.pipeline.unknown_items == 1
    assert h.observer.calls == []  # not even observed: nothing would ever use the mappings
    h.pipeline.handle(mark())
    assert all(profile.samples == () for profile in h.delivered)


def test_events_with_an_identity_are_summed_as_any_other(h: Harness) -> None:
    for comm in ("worker", "worker", "renamed"):  # a new comm, a new record: one sample still
        h.pipeline.handle(cpu_event(100, kernel=KERNEL, comm=comm)._replace(identity=comm.encode()))
    h.pipeline.handle(cpu_event(100, kernel=KERNEL))
    h.pipeline.handle(mark())
    (sample,) = h.delivered_for("cpu")[0].samples
    assert sample.key == SampleKey(100, 100, 2, KERNEL, USER)
    assert sample.values == (4, 4 * PERIOD)
    assert sample.thread_name == "worker"  # the last event's


def test_the_keep_sampler_is_asked_only_below_probability_one() -> None:
    keep = KeepSampler(random.Random(5))
    delivered: list[IntervalProfile] = []
    pipeline = Pipeline({"cpu": SPEC}, RecordingObserver(), delivered.append, keep=keep)
    pipeline.handle(cpu_event(100))
    keep.set_probability("cpu", 0.5)
    for _ in range(2000):
        pipeline.handle(cpu_event(100))
    pipeline.handle(mark())
    (sample,) = delivered[0].samples
    assert 0 < keep.dropped["cpu"] < 2000
    assert sample.values[0] == 1 + 2 * (2000 - keep.dropped["cpu"])  # each kept one stands for two
    assert pipeline.last_rates["cpu"] > 0


class StubUnwinder:
    """Stands for the unwind stage: what a copy unwinds to, and which events it was asked about."""

    def __init__(self, unwound: Stack) -> None:
        self.unwound = unwound
        self.asked: list[StackEvent] = []

    def unwind(self, event: StackEvent) -> Stack:
        self.asked.append(event)
        return self.unwound

    def forget(self, pid: int) -> None:
        pass


def test_events_still_carrying_a_copy_are_unwound_here_the_others_keep_their_stack() -> None:
    """A bursty profiler's events arrive with their stack copy (the reader did not unwind them): the
    pipeline unwinds those; events unwound in the reader, or without a copy, keep their user stack."""
    unwound = Stack(StackStatus.OK, (0x7000, 0x7100))
    unwinder = StubUnwinder(unwound)
    delivered: list[IntervalProfile] = []
    pipeline = Pipeline({"cpu": SPEC}, RecordingObserver(), delivered.append, unwinder=unwinder)
    copied = cpu_event(100)._replace(user_copy=UserStackCopy(0x7000, 0x10, 0x20, 0x0, b"\0" * 64))
    pipeline.handle(copied)
    pipeline.handle(cpu_event(101))
    pipeline.handle(mark())
    users = {sample.key.pid: sample.key.user for sample in delivered[0].samples}
    assert users == {100: unwound, 101: USER}
    assert unwinder.asked == [copied]
