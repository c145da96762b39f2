"""Test-wide policy for privileged tests.

Tests marked `bpf` need root and a kernel that loads BPF programs; tests marked `root` need root only
(tests/faults mounts small file systems). Where that is missing they are skipped with the reason; in
CI (env CI set, as `.ci/run` does) the same situation is an error, because CI runs as root and a
skipped privileged suite would prove nothing.
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
def _require_privileges(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("bpf") is not None:
        reason = _bpf_unavailable_reason()
    elif request.node.get_closest_marker("root") is not None:
        reason = "" if os.geteuid() == 0 else "this test needs root (run `make test` as root)"
    else:
        return
    if not reason:
        return
    if os.environ.get("CI"):
        pytest.fail(f"privileged tests must run in CI, but: {reason}", pytrace=False)
    pytest.skip(reason)
