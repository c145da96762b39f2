"""Tests for the per-interval aggregator (`agent.aggregate.interval`)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from agent.aggregate.interval import IntervalAggregator, mono_to_unix_offset_ns
from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.types import (
    EMPTY_STACK,
    NO_INTERPRETER_STACK,
    InterpreterStack,
    InterpreterStatus,
    ProfileSpec,
    Stack,
    StackStatus,
    ValueType,
)

SPEC = ProfileSpec(
    "cpu", (ValueType("samples", "count"), ValueType("cpu", "nanoseconds")), ValueType("cpu", "nanoseconds"), 10
)
USER_A = Stack(StackStatus.OK, (0x401000, 0x402000))
USER_B = Stack(StackStatus.OK, (0x401000, 0x403000))
KERNEL = Stack(StackStatus.OK, (0xFFFFFFFF81000000,))
START = 1_000_000


def add(
    aggregator: IntervalAggregator,
    timestamp_ns: int,
    *,
    pid: int = 100,
    tid: int = 101,
    cpu: int = 0,
    kernel: Stack = EMPTY_STACK,
    user: Stack = USER_A,
    thread_name: str = "worker",
    values: tuple[float, ...] = (1, 10),
    python: InterpreterStack = NO_INTERPRETER_STACK,
) -> None:
    aggregator.add(
        pid=pid,
        tid=tid,
        cpu=cpu,
        kernel=kernel,
        user=user,
        thread_name=thread_name,
        values=values,
        timestamp_ns=timestamp_ns,
        python=python,
    )


def by_key(profile: IntervalProfile) -> dict[SampleKey, AggregatedSample]:
    return {sample.key: sample for sample in profile.samples}


def test_sums_values_per_key() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    add(aggregator, START + 1)
    add(aggregator, START + 2, values=(2, 20))
    add(aggregator, START + 3, user=USER_B)
    add(aggregator, START + 4, cpu=1)
    add(aggregator, START + 5, kernel=KERNEL)
    add(aggregator, START + 6, tid=102)
    add(aggregator, START + 7, pid=200, tid=200)
    assert len(aggregator) == 6
    assert aggregator.events == 7
    samples = by_key(aggregator.finish(START + 100))
    assert samples[SampleKey(100, 101, 0, EMPTY_STACK, USER_A)].values == (3, 30)
    assert samples[SampleKey(100, 101, 0, EMPTY_STACK, USER_B)].values == (1, 10)
    assert samples[SampleKey(100, 101, 1, EMPTY_STACK, USER_A)].values == (1, 10)
    assert samples[SampleKey(100, 101, 0, KERNEL, USER_A)].values == (1, 10)
    assert samples[SampleKey(100, 102, 0, EMPTY_STACK, USER_A)].values == (1, 10)
    assert samples[SampleKey(200, 200, 0, EMPTY_STACK, USER_A)].values == (1, 10)


def test_equal_stacks_from_different_lookups_share_a_key() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    add(aggregator, START + 1, user=Stack(StackStatus.OK, (1, 2)))
    add(aggregator, START + 2, user=Stack(StackStatus.OK, (1, 2)))
    add(aggregator, START + 3, user=Stack(StackStatus.TRUNCATED, (1, 2)))
    assert len(aggregator) == 2


def test_values_of_the_caller_are_not_aliased() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    values = (1, 10)
    add(aggregator, START + 1, values=values)
    add(aggregator, START + 2, values=values)
    assert values == (1, 10)
    assert aggregator.finish(START + 10).samples[0].values == (2, 20)


def test_timestamps_are_kept_and_sorted() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    for timestamp in (START + 30, START + 10, START + 20, START + 10):
        add(aggregator, timestamp)
    (sample,) = aggregator.finish(START + 100).samples
    assert sample.timestamps_mono_ns == (START + 10, START + 10, START + 20, START + 30)


def test_latest_thread_name_wins() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    add(aggregator, START + 1, thread_name="python3")
    add(aggregator, START + 2, thread_name="gunicorn: worker")
    (sample,) = aggregator.finish(START + 100).samples
    assert sample.thread_name == "gunicorn: worker"


def test_finish_returns_an_immutable_profile_and_resets() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    add(aggregator, START + 1)
    profile = aggregator.finish(START + 100)
    assert profile.spec is SPEC
    assert isinstance(profile.samples, tuple)
    assert isinstance(profile.samples[0].values, tuple)
    assert isinstance(profile.samples[0].timestamps_mono_ns, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.samples = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.samples[0].values = (9, 9)  # type: ignore[misc]
    assert len(aggregator) == 0
    assert aggregator.events == 0
    add(aggregator, START + 150)  # the next interval does not touch the finished one
    assert profile.samples[0].values == (1, 10)
    assert profile.samples[0].timestamps_mono_ns == (START + 1,)
    assert aggregator.finish(START + 200).samples[0].timestamps_mono_ns == (START + 150,)


def test_window_is_start_to_end_when_events_fall_inside() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    add(aggregator, START + 50)
    profile = aggregator.finish(START + 100)
    assert (profile.start_mono_ns, profile.end_mono_ns) == (START, START + 100)


def test_window_stretches_to_include_late_and_early_events() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    add(aggregator, START + 250)  # read after the interval's end was taken
    add(aggregator, START - 40, user=USER_B)  # sampled before the interval started
    profile = aggregator.finish(START + 100)
    assert profile.start_mono_ns == START - 40
    assert profile.end_mono_ns == START + 251  # the end is exclusive: the late event lies inside
    for sample in profile.samples:
        assert all(profile.start_mono_ns <= t < profile.end_mono_ns for t in sample.timestamps_mono_ns)


def test_next_interval_starts_where_the_last_ended() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    first = aggregator.finish(START + 100)
    second = aggregator.finish(START + 200)
    assert (first.start_mono_ns, first.end_mono_ns) == (START, START + 100)
    assert (second.start_mono_ns, second.end_mono_ns) == (START + 100, START + 200)
    assert second.samples == ()
    add(aggregator, START + 500)
    stretched = aggregator.finish(START + 300)
    assert aggregator.finish(START + 1000).start_mono_ns == stretched.end_mono_ns == START + 501


def test_default_start_is_now() -> None:
    before = time.monotonic_ns()
    aggregator = IntervalAggregator(SPEC)
    after = time.monotonic_ns()
    assert before <= aggregator.finish(after + 1).start_mono_ns <= after


def test_mono_to_unix_offset_is_sane() -> None:
    expected = time.time_ns() - time.monotonic_ns()
    assert abs(mono_to_unix_offset_ns() - expected) < 1_000_000_000
    profile = IntervalAggregator(SPEC, start_mono_ns=START).finish(START + 1)
    assert abs(profile.mono_to_unix_offset_ns - expected) < 1_000_000_000


class Event:
    """What the pipeline hands `add_event` (a StackEvent's fields)."""

    def __init__(
        self,
        timestamp_ns: int,
        comm: str = "worker",
        values: tuple[float, ...] = (1, 10),
        python: InterpreterStack = NO_INTERPRETER_STACK,
    ) -> None:
        self.pid, self.tid, self.cpu, self.kernel = 100, 101, 0, EMPTY_STACK
        self.comm, self.values, self.timestamp_ns, self.python = comm, values, timestamp_ns, python


PYTHON_A = InterpreterStack(InterpreterStatus.OK, (0x7F0000001000, 0x7F0000002040, 0x7F0000003000, 12))
PYTHON_B = InterpreterStack(InterpreterStatus.OK, (0x7F0000001000, 0x7F0000002042, 0x7F0000003000, 12))


def test_python_frames_are_part_of_the_sample_key() -> None:
    """Two events alike in their native stacks but not in their Python frames are two samples; events
    with equal Python frames (equal, not the same object) are one."""
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    add(aggregator, START + 1, user=USER_A, python=PYTHON_A)
    add(aggregator, START + 2, user=USER_A, python=PYTHON_B)
    add(aggregator, START + 3, user=USER_A, python=InterpreterStack(InterpreterStatus.OK, PYTHON_A.frames))
    add(aggregator, START + 4, user=USER_A)
    add(aggregator, START + 5, user=USER_A, python=InterpreterStack(InterpreterStatus.READ_FAILED))
    aggregator.add_event(Event(START + 6, python=PYTHON_B), USER_A)  # keyed on its fields, Python frames too
    samples = by_key(aggregator.finish(START + 100))
    key = SampleKey(100, 101, 0, EMPTY_STACK, USER_A)
    assert {sample_key.python: sample.values for sample_key, sample in samples.items()} == {
        PYTHON_A: (2, 20),
        PYTHON_B: (2, 20),
        NO_INTERPRETER_STACK: (1, 10),
        InterpreterStack(InterpreterStatus.READ_FAILED): (1, 10),
    }
    assert samples[key].key.python is NO_INTERPRETER_STACK  # the default: a native-only key is unchanged


def test_events_with_an_identity_are_keyed_on_it() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    for timestamp in (START + 3, START + 1, START + 2):
        aggregator.add_event(Event(timestamp), USER_A, b"record-a")
    aggregator.add_event(Event(START + 4), USER_B, b"record-b")
    assert len(aggregator) == 2 and aggregator.events == 4
    samples = by_key(aggregator.finish(START + 100))
    assert samples[SampleKey(100, 101, 0, EMPTY_STACK, USER_A)] == AggregatedSample(
        SampleKey(100, 101, 0, EMPTY_STACK, USER_A), "worker", (3, 30), (START + 1, START + 2, START + 3)
    )
    assert samples[SampleKey(100, 101, 0, EMPTY_STACK, USER_B)].values == (1, 10)


def test_one_sample_under_several_identities_is_merged_with_the_latest_thread_name() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    aggregator.add_event(Event(START + 5, "old"), USER_A, b"as old")
    aggregator.add_event(Event(START + 1, "new"), USER_A, b"as new")  # renamed (arrived later, stamped earlier)
    aggregator.add_event(Event(START + 9, "old"), USER_A, b"as old")
    aggregator.add_event(Event(START + 7, "new", (2, 20)), USER_A, b"as new")
    add(aggregator, START + 3, user=USER_A, thread_name="newest")  # no identity: keyed on the fields
    add(aggregator, START + 8, user=USER_B)
    profile = aggregator.finish(START + 100)
    assert [sample.key.user for sample in profile.samples] == [USER_A, USER_B]  # in order of first arrival
    merged = profile.samples[0]
    assert merged.thread_name == "newest"
    assert merged.values == (6, 60)
    assert merged.timestamps_mono_ns == (START + 1, START + 3, START + 5, START + 7, START + 9)


def test_the_thread_name_of_the_last_arrival_wins_between_identities() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    aggregator.add_event(Event(START + 1, "a"), USER_A, b"a")
    aggregator.add_event(Event(START + 2, "b"), USER_A, b"b")
    aggregator.add_event(Event(START + 3, "a"), USER_A, b"a")  # renamed back
    (sample,) = aggregator.finish(START + 100).samples
    assert sample.thread_name == "a"


def test_fractional_values_are_summed_in_arrival_order_then_rounded() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    for value in (0.4, 0.4, 0.4, 1e16, -1e16):
        add(aggregator, START + 1, values=(value, 2 * value))
    (sample,) = aggregator.finish(START + 100).samples
    total = 0.0
    for value in (0.4, 0.4, 0.4, 1e16, -1e16):
        total += value  # what a running total gives (not math.fsum's 1.2)
    assert sample.values == (round(total), round(2 * total))


def test_equal_integer_values_are_multiplied_exactly() -> None:
    aggregator = IntervalAggregator(SPEC, start_mono_ns=START)
    values = (1, 52_631_578)
    for i in range(1000):
        add(aggregator, START + i, values=values)
    (sample,) = aggregator.finish(START + 10_000).samples
    assert sample.values == (1000, 52_631_578_000)
