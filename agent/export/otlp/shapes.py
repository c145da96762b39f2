"""Export stage, OTLP sink: which value of a profile OTLP carries, and in what per-sample shape.

A pprof profile has several sample types (CPU: `samples/count` and `cpu/nanoseconds`); an OTLP
profile has exactly one `sample_type`. The choice is table-driven:

1. Count-with-period forms (`COUNT_WITH_PERIOD`): when the spec's sample types and period type are
   a row of the table and its period is positive, OTLP carries the event count under its count
   type, with the spec's period type and period, so that count x period gives the other value.

   | pprof sample types               | pprof period type | OTLP sample_type | OTLP period            |
   |----------------------------------|-------------------|------------------|------------------------|
   | samples/count, cpu/nanoseconds   | cpu/nanoseconds   | samples/count    | cpu/nanoseconds, 1e9/Hz|

   This is what opentelemetry-ebpf-profiler sends and what Pyroscope names `process_cpu`.
2. Otherwise the spec's last sample type (pprof's default sample type), with the spec's period type
   and period (an empty `ValueType` and 0 when it has none). E.g. off-CPU `off_cpu/nanoseconds`
   (Pyroscope names it `off_cpu`), allocations `alloc_space/bytes`. Pyroscope derives the series
   name from the period type for other types, so such specs should declare one.

Per-sample shapes accepted by the OTel Collector, Pyroscope (one value per sample, or timestamps
only, when a period is set) and Parca (values and timestamps of equal length):
* `TIMESTAMPS`: no values, one timestamp per event (each implies value 1). Used when the carried
  value counts events and every sample has exactly one timestamp per event.
* `AGGREGATED`: `values=[v]`, with the one timestamp only when the sample stands for a single event
  (so lengths match); otherwise no timestamps, because a summed value cannot be split per event.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from agent.types import ProfileSpec, ValueType

NO_VALUE_TYPE = ValueType("", "")


@dataclass(frozen=True, slots=True)
class CountWithPeriodForm:
    sample_types: tuple[ValueType, ...]
    period_type: ValueType
    count_index: int  # which of sample_types is the event count OTLP carries


COUNT_WITH_PERIOD: tuple[CountWithPeriodForm, ...] = (
    CountWithPeriodForm(
        sample_types=(ValueType("samples", "count"), ValueType("cpu", "nanoseconds")),
        period_type=ValueType("cpu", "nanoseconds"),
        count_index=0,
    ),
)


class Shape(enum.Enum):
    TIMESTAMPS = "timestamps"
    AGGREGATED = "aggregated"


@dataclass(frozen=True, slots=True)
class ValueMapping:
    value_index: int  # index into the pprof sample's values
    sample_type: ValueType
    period_type: ValueType
    period: int
    counts_events: bool  # the value is a number of events, so timestamps can stand in for it


def value_mapping(spec: ProfileSpec) -> ValueMapping:
    """How `spec`'s samples are carried in OTLP (see the module docstring)."""
    if not spec.sample_types:
        raise ValueError(f"profile spec {spec.name!r} has no sample types")
    for form in COUNT_WITH_PERIOD:
        if spec.period > 0 and spec.sample_types == form.sample_types and spec.period_type == form.period_type:
            count_type = form.sample_types[form.count_index]
            return ValueMapping(form.count_index, count_type, form.period_type, spec.period, counts_events=True)
    last = len(spec.sample_types) - 1
    has_period = bool(spec.period_type.type or spec.period_type.unit)
    return ValueMapping(
        value_index=last,
        sample_type=spec.sample_types[last],
        period_type=spec.period_type if has_period else NO_VALUE_TYPE,
        period=max(spec.period, 0) if has_period else 0,
        counts_events=spec.sample_types[last].unit == "count",
    )


def choose_shape(mapping: ValueMapping, events: Sequence[tuple[int, int]]) -> Shape:
    """`events` holds (value, number of timestamps) per sample of one OTLP profile."""
    if mapping.counts_events and events and all(n > 0 and value == n for value, n in events):
        return Shape.TIMESTAMPS
    return Shape.AGGREGATED


def profile_window(start_ns: int, duration_ns: int, timestamps: Sequence[int]) -> tuple[int, int]:
    """(time_unix_nano, duration_nano) covering the interval and every timestamp.

    Receivers require each timestamp in [time, time + duration] (Parca rejects the request
    otherwise); the spec says the end is exclusive, so the window reaches one past the last one.
    """
    if not timestamps:
        return start_ns, max(duration_ns, 0)
    begin = min(start_ns, min(timestamps))
    end = max(start_ns + duration_ns, max(timestamps) + 1)
    return begin, end - begin
