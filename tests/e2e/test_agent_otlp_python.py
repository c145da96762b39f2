"""The real agent shipping a Python process's profile to the real OpenTelemetry Collector (privileged).

Debian's `/usr/bin/python3.11` runs tests/workloads/python/steady.py (its CPU in `Steady.step`) under
`profiling-agent run --otlp-endpoint --pid`: the collector accepts every request and logs no error with
Python frames in them, its file output names `Steady.step` on the share of the samples the workload's
own clock gives, those frames' locations have `profile.frame.type` = `cpython`, and the resource
carries `process.runtime.name` = `cpython`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.agent import STARTUP_TIMEOUT_S, start_agent, wait_for_log
from tests.support.interpreters import DEBIAN_PYTHON, installed
from tests.support.python_agent import PythonWorkload
from tests.support.stats import binomial_tolerance

from .test_agent_otlp import _assert_clean, _inclusive_weights, _profiles

if TYPE_CHECKING:
    from tests.support.otelcol import Collector

pytestmark = pytest.mark.bpf
FREQUENCY = 99


def _attribute(document: dict[str, Any], index: int) -> tuple[str, str]:
    strings = document["dictionary"]["stringTable"]
    attribute = document["dictionary"]["attributeTable"][index]
    key = attribute.get("key") or strings[attribute.get("keyStrindex", 0)]
    value = attribute.get("value", {})
    text = strings[value["stringValueStrindex"]] if "stringValueStrindex" in value else value.get("stringValue", "")
    return key, text


def _frame_types(documents: list[dict[str, Any]], function: str) -> set[str]:
    """The profile.frame.type of every location whose line is in `function`."""
    types = set()
    for document in documents:
        dictionary, strings = document["dictionary"], document["dictionary"]["stringTable"]
        for location in dictionary.get("locationTable", []):
            names = {
                strings[dictionary["functionTable"][line.get("functionIndex", 0)].get("nameStrindex", 0)]
                for line in location.get("lines", [])
            }
            if function in names:
                attributes = dict(_attribute(document, i) for i in location.get("attributeIndices", []))
                types.add(attributes.get("profile.frame.type", ""))
    return types


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason=f"needs {DEBIAN_PYTHON}")
def test_python_frames_reach_the_collector(otelcol: Collector, tmp_path: Path) -> None:
    interpreter = next(i for i in installed() if i.executable == DEBIAN_PYTHON)
    workload = PythonWorkload(interpreter, "steady", ["4"], tmp_path)
    log = tmp_path / "agent.log"
    agent = start_agent(
        tmp_path / "profiles", "--otlp-endpoint", otelcol.endpoint, "--otlp-insecure", "--interval", "2",
        "--frequency", str(FREQUENCY), "--pid", str(workload.pid), log_path=log,
    )  # fmt: skip
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        workload.go()
        truth = workload.finish()
        time.sleep(1)
    finally:
        workload.kill()
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, log.read_text()

    def seen(docs: list[dict[str, Any]]) -> bool:
        return any(int(r["process.pid"]) == workload.pid for _, r, _ in _profiles(docs))

    documents = otelcol.wait_for(seen)
    assert seen(documents), "the Python process's profiles never reached the collector"
    weights = _inclusive_weights(documents, workload.pid)
    count = sum(
        len(s.get("timestampsUnixNano", [])) or sum(map(int, s.get("values", [])))
        for _, r, p in _profiles(documents)
        if int(r["process.pid"]) == workload.pid
        for s in p["samples"]
    )
    true_share = truth["cpu_s"] / (workload.usage.ru_utime + workload.usage.ru_stime)
    share = weights["Steady.step"] / count
    assert share >= true_share - binomial_tolerance(true_share, count), (share, true_share, count, weights)
    assert _frame_types(documents, "Steady.step") == {"cpython"}
    runtimes = {
        r.get("process.runtime.name") for _, r, _ in _profiles(documents) if int(r["process.pid"]) == workload.pid
    }
    assert runtimes == {"cpython"}, runtimes
    _assert_clean(otelcol)
    assert "Traceback" not in log.read_text()
