"""The report stage (agent.flow.report.Reporter): symbolize, build pprof only when a sink needs it, export."""

from __future__ import annotations

import pytest

from agent.aggregate.types import IntervalProfile
from agent.flow import report
from agent.symbolize.types import Profile
from agent.types import ProfileSpec, ValueType

SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 1)


class FakeSink:
    def __init__(self, name: str, needs_pprof: bool) -> None:
        self.name, self.needs_pprof = name, needs_pprof
        self.received: list[bytes] = []

    def export(self, profile: Profile, pprof: bytes) -> None:
        self.received.append(pprof)

    def shutdown(self, deadline_s: float) -> None:
        del deadline_s


class FakeSymbolizer:
    def symbolize(self, interval: IntervalProfile) -> Profile:
        return Profile(spec=interval.spec, start_unix_ns=1, duration_ns=2, samples=(), processes={})


def interval() -> IntervalProfile:
    return IntervalProfile(SPEC, 0, 10, 0, samples=(object(),))  # type: ignore[arg-type]


def test_pprof_is_not_built_when_no_sink_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Profile] = []

    def build_pprof(profile: Profile) -> bytes:
        built.append(profile)
        return b"pprof"

    monkeypatch.setattr(report, "build_pprof", build_pprof)
    otlp = FakeSink("otlp", needs_pprof=False)
    reporter = report.Reporter(FakeSymbolizer(), [otlp])
    reporter.report(interval())
    assert built == [] and otlp.received == [b""]
    files = FakeSink("files", needs_pprof=True)
    reporter.set_sinks([otlp, files])
    reporter.report(interval())
    assert len(built) == 1 and files.received == [b"pprof"] and otlp.received == [b"", b"pprof"]
    assert reporter.exported == {"otlp": 2, "files": 1}
