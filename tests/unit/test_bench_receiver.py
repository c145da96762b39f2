"""bench.receiver: events are counted by the second of their timestamps, in both OTLP sample shapes."""

from __future__ import annotations

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2

from bench.receiver import NS, events_by_second


def request_with(*samples: tuple[list[int], list[int]], start_ns: int = 0) -> object:
    request = profiles_service_pb2.ExportProfilesServiceRequest()
    profile = request.resource_profiles.add().scope_profiles.add().profiles.add()
    profile.time_unix_nano = start_ns
    for values, stamps in samples:
        sample = profile.samples.add()
        sample.values.extend(values)
        sample.timestamps_unix_nano.extend(stamps)
    return request


def test_timestamps_only_samples_count_one_event_per_timestamp_in_its_second() -> None:
    stamps = [100 * NS + 5, 100 * NS + NS - 1, 101 * NS]
    assert events_by_second(request_with(([], stamps))) == {100: 2, 101: 1}


def test_a_sample_with_a_value_counts_the_value_at_its_first_timestamp_or_the_profiles_start() -> None:
    request = request_with(([7], [205 * NS + 1]), ([3], []), start_ns=200 * NS + 10)
    assert events_by_second(request) == {205: 7, 200: 3}


def test_a_request_without_samples_counts_nothing() -> None:
    assert events_by_second(request_with()) == {}
