"""The real agent shipping OTLP to the real OpenTelemetry Collector (privileged: runs BPF).

1. A 3:1 CPU workload profiled by `profiling-agent run --otlp-endpoint`: the collector accepts every
   request, logs no error, and its file output names hot_a and hot_b in the workload's true split.
2. Outage: the collector is down for the first third of the run, and the agent is restarted in the
   middle of the outage. Every interval the agent profiled (the local pprof files, written alongside,
   are the record of which intervals exist) reaches the collector exactly once, in order.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent._proto import profile_pb2
from tests.support.agent import STARTUP_TIMEOUT_S, free_port, start_agent, wait_for_log
from tests.support.otelcol import start_collector, stop_collector
from tests.support.stats import binomial_tolerance
from tests.support.workloads import compile_workload

if TYPE_CHECKING:
    from tests.support.otelcol import Collector

pytestmark = pytest.mark.bpf


def _resource(document: dict[str, Any], resource_profiles: dict[str, Any]) -> dict[str, Any]:
    strings = document["dictionary"]["stringTable"]
    out = {}
    for attribute in resource_profiles["resource"]["attributes"]:
        key = attribute.get("key") or strings[attribute.get("keyStrindex", 0)]
        value = attribute.get("value", {})
        # The file exporter writes resource strings as string-table references.
        if "stringValueStrindex" in value:
            out[key] = strings[value["stringValueStrindex"]]
        else:
            out[key] = value.get("stringValue", value.get("intValue"))
    return out


def _profiles(documents: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(document, resource attributes, profile) for every profile in receipt order."""
    found = []
    for document in documents:
        for resource_profiles in document["resourceProfiles"]:
            resource = _resource(document, resource_profiles)
            for scope in resource_profiles["scopeProfiles"]:
                for profile in scope["profiles"]:
                    found.append((document, resource, profile))
    return found


def _inclusive_weights(documents: list[dict[str, Any]], pid: int) -> Counter[str]:
    weights: Counter[str] = Counter()
    for document, resource, profile in _profiles(documents):
        if int(resource["process.pid"]) != pid:
            continue
        dictionary, strings = document["dictionary"], document["dictionary"]["stringTable"]
        for sample in profile["samples"]:
            weight = len(sample.get("timestampsUnixNano", [])) or sum(map(int, sample.get("values", [])))
            names = set()
            for index in dictionary["stackTable"][sample.get("stackIndex", 0)].get("locationIndices", []):
                for line in dictionary["locationTable"][index].get("lines", []):
                    names.add(strings[dictionary["functionTable"][line.get("functionIndex", 0)].get("nameStrindex", 0)])
            for name in names:
                weights[name] += weight
    return weights


def _assert_clean(collector: Collector) -> None:
    log = collector.log_text()
    assert "\terror\t" not in log.lower() and "rejected" not in log.lower(), log


def test_agent_profiles_reach_the_collector_with_the_true_split(otelcol: Collector, tmp_path: Path) -> None:
    binary = compile_workload("cpu_split", tmp_path)
    log = tmp_path / "agent.log"
    agent = start_agent(
        tmp_path / "profiles",
        "--otlp-endpoint",
        otelcol.endpoint,
        "--otlp-insecure",
        "--interval",
        "2",
        "--frequency",
        "99",
        log_path=log,
    )
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        workload = subprocess.Popen([str(binary), "5", "2"], stdout=subprocess.PIPE, text=True)
        pid_line, _ = workload.communicate(timeout=60)
        assert workload.returncode == 0
        time.sleep(1)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, log.read_text()
    assert not (tmp_path / "profiles").exists(), "files are off by default when OTLP is on"
    truth = {name: float(value) for name, value in re.findall(r"(hot_[ab])=([0-9.]+)", pid_line)}

    def workload_seen(docs: list[dict[str, Any]]) -> bool:
        return any(int(r["process.pid"]) == workload.pid for _, r, _ in _profiles(docs))

    documents = otelcol.wait_for(workload_seen)
    assert workload_seen(documents), "the workload's profiles never reached the collector"
    weights = _inclusive_weights(documents, workload.pid)
    share = weights["hot_a"] / (weights["hot_a"] + weights["hot_b"])
    true_share = truth["hot_a"] / (truth["hot_a"] + truth["hot_b"])
    # 4 binomial standard errors of the samples in the two leaves (~1,000 at 99 Hz on an idle host).
    tolerance = binomial_tolerance(true_share, weights["hot_a"] + weights["hot_b"])
    assert abs(share - true_share) <= tolerance, (weights, truth, tolerance)
    _assert_clean(otelcol)
    assert "Traceback" not in log.read_text()


def _interval_starts(files_dir: Path) -> list[int]:
    starts = []
    for path in files_dir.glob("cpu-*.pb.gz"):
        profile = profile_pb2.Profile()
        profile.ParseFromString(gzip.decompress(path.read_bytes()))
        starts.append(profile.time_nanos)
    return sorted(starts)


def test_outage_and_restart_lose_nothing_and_keep_order(otelcol_binary: Path, tmp_path: Path) -> None:
    port = free_port()
    files, spool = tmp_path / "profiles", tmp_path / "spool"
    args = ("--otlp-endpoint", f"127.0.0.1:{port}", "--otlp-insecure", "--interval", "1", "--frequency", "49")
    env_files = {"PROFILING_AGENT_EXPORT_FILES_ENABLED": "true", "PROFILING_AGENT_EXPORT_OTLP_SPOOL_DIR": str(spool)}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    collector = None
    os.environ.update(env_files)
    try:
        for run, seconds in enumerate((3.0, 3.0)):  # receiver down for both; agent restarted between
            log = tmp_path / f"agent-{run}.log"
            agent = start_agent(files, *args, log_path=log)
            wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
            time.sleep(seconds)
            agent.terminate()
            agent.wait(timeout=30)
            assert agent.returncode == 0, log.read_text()
        assert any(spool.iterdir()), "the outage's requests wait in the spool"
        collector = start_collector(otelcol_binary, tmp_path / "collector", port)
        log = tmp_path / "agent-2.log"
        agent = start_agent(files, *args, log_path=log)  # the receiver is back: spool first, then new data
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        time.sleep(6.0)
        agent.terminate()
        agent.wait(timeout=30)
        assert agent.returncode == 0, log.read_text()
        expected = _interval_starts(files)
        documents = collector.wait_for(
            lambda docs: len({int(p["timeUnixNano"]) for _, _, p in _profiles(docs)}) >= len(expected)
        )
    finally:
        busy.kill()
        busy.wait()
        for key in env_files:
            os.environ.pop(key, None)
        if collector is not None:
            stop_collector(collector)
    received = [
        (int(resource["process.pid"]), int(profile["timeUnixNano"])) for _, resource, profile in _profiles(documents)
    ]
    assert len(received) == len(set(received)), "a profile arrived twice"
    starts_in_receipt_order = [start for _, start in received]
    assert starts_in_receipt_order == sorted(starts_in_receipt_order), "profiles arrived out of order"
    assert sorted(set(starts_in_receipt_order)) == expected
    assert len(expected) >= 9, expected  # about 12 one-second intervals across the three runs
    _assert_clean(collector)
