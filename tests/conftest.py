"""Test-wide policy for privileged tests.

Tests marked `bpf` need root and a kernel that loads BPF programs. Where that is missing they are
skipped with the preflight's reason; in CI (env CI set, as `.ci/run` does) the same situation is an
error, because CI runs as root and a skipped BPF suite would prove nothing.
"""

from __future__ import annotations

import functools
import os

import pytest


@functools.cache
def _bpf_unavailable_reason() -> str:
    if os.geteuid() != 0:
        return "BPF tests need root (run `make test` as root)"
    from agent.preflight import run_checks

    report = run_checks()
    if not report.ok:
        return "this host cannot run BPF programs:\n" + report.render()
    return ""


@pytest.fixture(autouse=True)
def _require_bpf(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("bpf") is None:
        return
    reason = _bpf_unavailable_reason()
    if not reason:
        return
    if os.environ.get("CI"):
        pytest.fail(f"BPF tests must run in CI, but: {reason}", pytrace=False)
    pytest.skip(reason)
