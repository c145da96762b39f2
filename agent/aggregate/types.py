"""Aggregate stage: the records it produces, which the symbolize stage consumes.

An `IntervalProfile` is one profiler's data for one reporting interval: unique
(pid, tid, cpu, kernel stack, user stack, Python frames) keys with summed values and the monotonic
timestamps of the events that made them. Stacks are still raw instruction pointers here; naming them is the
symbolize stage's job. The stacks and profile specs these records hold are shared by every stage and
live in `agent.types`.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.types import NO_INTERPRETER_STACK, InterpreterStack, ProfileSpec, Stack


@dataclass(frozen=True, slots=True)
class SampleKey:
    pid: int
    tid: int
    cpu: int
    kernel: Stack
    user: Stack
    # The Python frames the BPF walker sent with the event (docs/python.md); none for other processes.
    python: InterpreterStack = NO_INTERPRETER_STACK


@dataclass(frozen=True, slots=True)
class AggregatedSample:
    key: SampleKey
    thread_name: str  # the thread's comm as the kernel saw it at the last event
    values: tuple[int, ...]  # aligned with ProfileSpec.sample_types
    timestamps_mono_ns: tuple[int, ...]  # CLOCK_MONOTONIC of each event, ascending


@dataclass(frozen=True, slots=True)
class IntervalProfile:
    spec: ProfileSpec
    start_mono_ns: int
    end_mono_ns: int
    # CLOCK_REALTIME - CLOCK_MONOTONIC at the interval end, to turn event timestamps into Unix time.
    mono_to_unix_offset_ns: int
    samples: tuple[AggregatedSample, ...]
