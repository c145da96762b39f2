"""End-to-end fixtures: a real OpenTelemetry Collector (tests/support/otelcol.py) receiving OTLP
profiles on 127.0.0.1. Each test gets its own collector process writing into its tmp directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.otelcol import Collector, build, start_collector, stop_collector


@pytest.fixture(scope="session")
def otelcol_binary() -> Path:
    """The collector binary, built (or found up to date) by the ocb script."""
    try:
        return build()
    except AssertionError as e:
        pytest.fail(str(e))


@pytest.fixture
def otelcol(otelcol_binary: Path, tmp_path: Path) -> Iterator[Collector]:
    """A running collector; stopped (and its log kept in tmp_path) after the test."""
    collector = start_collector(otelcol_binary, tmp_path)
    try:
        yield collector
    finally:
        stop_collector(collector)
