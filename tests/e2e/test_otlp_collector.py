"""OTLP sink against the real OpenTelemetry Collector (otlp receiver -> debug + file exporters).

Synthetic CPU profiles of two processes, with kernel and native frames and a known 3:1 split
between two functions, go through `OtlpSink` (encode, spool, gRPC with gzip) to the collector. The
collector must accept every request without partial success or logged errors, and its JSON file
output must name both functions in the same 3:1 proportion. A Python process's profile (Python
frames merged over the interpreter's, a C extension under one of them) must come out the same way,
with its frame types, files, lines and `process.runtime.*`.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.export.otlp import OtlpConfig, OtlpSink, ResourceOptions
from agent.export.otlp.stats import DROPPED, REQUESTS
from agent.symbolize.types import (
    KERNEL_MAPPING_NAME,
    Frame,
    FrameKind,
    MappingInfo,
    ProcessInfo,
    Profile,
    PythonSource,
    Sample,
)
from agent.types import ProfileSpec, ValueType

if TYPE_CHECKING:  # the fixture type only; pytest itself loads conftest
    from tests.support.otelcol import Collector

CPU = ProfileSpec(
    name="cpu",
    sample_types=(ValueType("samples", "count"), ValueType("cpu", "nanoseconds")),
    period_type=ValueType("cpu", "nanoseconds"),
    period=10_000_000,
)
KERNEL = MappingInfo(KERNEL_MAPPING_NAME, 0, 0, 0)
INTERVALS = 3
HOT, COLD = 30, 10  # samples per thread per interval: the 3:1 split


def _frames(exe: str, function: str) -> tuple[Frame, ...]:
    binary = MappingInfo(exe, 0x400000, 0x500000, 0, build_id="ab" * 20)
    return (
        Frame(FrameKind.KERNEL, 0xFFFFFFFF81000010, "asm_sysvec_apic_timer_interrupt", KERNEL),
        Frame(FrameKind.NATIVE, 0x401000 if function == "hot_loop" else 0x402000, function, binary),
        Frame(FrameKind.NATIVE, 0x403000, "main", binary),
    )


def _profile(interval: int) -> Profile:
    start = 1_800_000_000_000_000_000 + interval * 10_000_000_000
    samples = []
    for pid, exe in ((4242, sys.executable), (4343, "/bin/sh")):
        for function, count in (("hot_loop", HOT), ("cold_path", COLD)):
            timestamps = tuple(start + 1_000 + i * 100_000 for i in range(count))
            samples.append(
                Sample(pid, pid, 1, "worker", _frames(exe, function), (count, count * CPU.period), timestamps)
            )
    processes = {4242: ProcessInfo(4242, "python", sys.executable), 4343: ProcessInfo(4343, "sh", "/bin/sh")}
    return Profile(CPU, start, 10_000_000_000, tuple(samples), processes)


def _strings_of(document: dict[str, Any]) -> list[str]:
    return list(document["dictionary"]["stringTable"])


def _attribute(document: dict[str, Any], attribute: dict[str, Any]) -> tuple[str, Any]:
    """(key, value) of a resource or dictionary attribute, plain or string-table referenced."""
    strings = _strings_of(document)
    key = attribute.get("key") or strings[attribute.get("keyStrindex", 0)]
    value = attribute.get("value", {})
    if "stringValueStrindex" in value:
        return key, strings[value["stringValueStrindex"]]
    for kind in ("stringValue", "intValue"):
        if kind in value:
            return key, value[kind]
    return key, None


def _function_counts(documents: list[dict[str, Any]]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Samples per function name, per frame type and per pid, read through the dictionary tables."""
    functions: Counter[str] = Counter()
    frame_types: Counter[str] = Counter()
    pids: Counter[str] = Counter()
    for document in documents:
        dictionary = document["dictionary"]
        strings = _strings_of(document)
        for resource_profiles in document["resourceProfiles"]:
            resource = dict(_attribute(document, a) for a in resource_profiles["resource"]["attributes"])
            for scope in resource_profiles["scopeProfiles"]:
                for profile in scope["profiles"]:
                    for sample in profile["samples"]:
                        weight = len(sample.get("timestampsUnixNano", [])) or sum(map(int, sample.get("values", [])))
                        pids[str(resource["process.pid"])] += weight
                        stack = dictionary["stackTable"][sample.get("stackIndex", 0)]
                        for location_index in stack.get("locationIndices", []):
                            location = dictionary["locationTable"][location_index]
                            for attribute_index in location.get("attributeIndices", []):
                                attribute = dictionary["attributeTable"][attribute_index]
                                frame_types[str(_attribute(document, attribute)[1])] += weight
                            for line in location.get("lines", []):
                                function = dictionary["functionTable"][line.get("functionIndex", 0)]
                                functions[strings[function.get("nameStrindex", 0)]] += weight
    return functions, frame_types, pids


def _export_until_received(
    otelcol: Collector, tmp_path: Path, profile_of: Callable[[int], Profile], expected_samples: int
) -> tuple[OtlpSink, list[dict[str, Any]]]:
    """Export INTERVALS profiles through a running sink until the Collector holds `expected_samples`
    samples; the sink (shut down) and the Collector's documents."""
    config = OtlpConfig(enabled=True, endpoint=otelcol.endpoint, insecure=True, spool_dir=str(tmp_path / "spool"))
    sink = OtlpSink(config, resource=ResourceOptions(host_name="e2e-host", host_arch="amd64"))
    stop = threading.Event()
    sender = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    sender.start()
    try:
        for interval in range(INTERVALS):
            assert sink.export(profile_of(interval), b"") != ()
        documents = otelcol.wait_for(lambda docs: sum(_function_counts(docs)[2].values()) >= expected_samples)
    finally:
        stop.set()
        sink.shutdown(5.0)
        sender.join(10)
    return sink, documents


def test_collector_receives_every_profile_with_the_right_proportions(otelcol: Collector, tmp_path: Path) -> None:
    sink, documents = _export_until_received(otelcol, tmp_path, _profile, INTERVALS * 2 * (HOT + COLD))

    assert sink.counters.get(REQUESTS, "success") == INTERVALS
    assert sink.counters.total(REQUESTS) == INTERVALS  # nothing partial, rejected or expired
    assert sink.counters.total(DROPPED) == 0
    assert sink.queue_depth == 0
    log = otelcol.log_text()
    assert "\terror\t" not in log.lower(), log
    assert "rejected" not in log.lower(), log

    functions, frame_types, pids = _function_counts(documents)
    assert functions["hot_loop"] == INTERVALS * 2 * HOT
    assert functions["cold_path"] == INTERVALS * 2 * COLD
    assert functions["hot_loop"] == 3 * functions["cold_path"]
    assert functions["main"] == functions["hot_loop"] + functions["cold_path"]
    assert set(frame_types) == {"kernel", "native"}
    assert pids == {"4242": INTERVALS * (HOT + COLD), "4343": INTERVALS * (HOT + COLD)}
    # The debug exporter printed the same data in detail.
    assert "hot_loop" in log and "cold_path" in log


PYTHON_PID = 4444
INTERPRETER = MappingInfo(sys.executable, 0x400000, 0x500000, 0, build_id="cd" * 20)


def _python_frames(qualname: str, line: int, c_extension: bool) -> tuple[Frame, ...]:
    name = qualname.rsplit(".", 1)[-1]
    frames = [
        Frame(FrameKind.PYTHON, 0, qualname, INTERPRETER, PythonSource(name, "/srv/app/jobs.py", 10, line)),
        Frame(FrameKind.NATIVE, 0x401100, "_PyFunction_Vectorcall", INTERPRETER),
        Frame(FrameKind.PYTHON, 0, "<module>", INTERPRETER, PythonSource("<module>", "/srv/app/main.py", 1, 30)),
        Frame(FrameKind.NATIVE, 0x403000, "main", INTERPRETER),
    ]
    if c_extension:
        frames.insert(0, Frame(FrameKind.NATIVE, 0x401200, "compress_block", INTERPRETER))
    return tuple(frames)


def _python_profile(interval: int) -> Profile:
    start = 1_800_000_000_000_000_000 + interval * 10_000_000_000
    samples = []
    for qualname, line, count, c_extension in (("Job.run", 14, HOT, False), ("Job.pack", 22, COLD, True)):
        timestamps = tuple(start + 1_000 + i * 100_000 for i in range(count))
        frames = _python_frames(qualname, line, c_extension)
        samples.append(Sample(PYTHON_PID, PYTHON_PID, 0, "python3", frames, (count, count * CPU.period), timestamps))
    process = ProcessInfo(PYTHON_PID, "python3", sys.executable, runtime_name="cpython", runtime_version="3.12.1")
    return Profile(CPU, start, 10_000_000_000, tuple(samples), {PYTHON_PID: process})


def _python_details(documents: list[dict[str, Any]]) -> tuple[set[tuple[str, str, str, int, int]], dict[str, Any]]:
    """(qualname, co_name, file, first line, line) of each cpython location, and the resource attributes."""
    rows: set[tuple[str, str, str, int, int]] = set()
    resource: dict[str, Any] = {}
    for document in documents:
        dictionary = document["dictionary"]
        strings = _strings_of(document)
        for resource_profiles in document["resourceProfiles"]:
            resource.update(_attribute(document, a) for a in resource_profiles["resource"]["attributes"])
        for location in dictionary["locationTable"]:
            kinds = {
                _attribute(document, dictionary["attributeTable"][i]) for i in location.get("attributeIndices", [])
            }
            if ("profile.frame.type", "cpython") not in kinds:
                continue
            for line in location.get("lines", []):
                function = dictionary["functionTable"][line.get("functionIndex", 0)]
                rows.add(
                    (
                        strings[function.get("nameStrindex", 0)],
                        strings[function.get("systemNameStrindex", 0)],
                        strings[function.get("filenameStrindex", 0)],
                        int(function.get("startLine", 0)),
                        int(line.get("line", 0)),
                    )
                )
    return rows, resource


def test_collector_receives_python_frames_with_their_files_lines_and_runtime(
    otelcol: Collector, tmp_path: Path
) -> None:
    sink, documents = _export_until_received(otelcol, tmp_path, _python_profile, INTERVALS * (HOT + COLD))

    assert sink.counters.get(REQUESTS, "success") == INTERVALS
    assert sink.counters.total(REQUESTS) == INTERVALS
    log = otelcol.log_text()
    assert "\terror\t" not in log.lower(), log
    assert "rejected" not in log.lower(), log

    functions, frame_types, pids = _function_counts(documents)
    assert functions["Job.run"] == INTERVALS * HOT
    assert functions["Job.pack"] == functions["compress_block"] == INTERVALS * COLD
    assert functions["<module>"] == functions["main"] == INTERVALS * (HOT + COLD)
    assert set(frame_types) == {"cpython", "native"}
    assert frame_types["cpython"] == 2 * INTERVALS * (HOT + COLD)
    assert pids == {str(PYTHON_PID): INTERVALS * (HOT + COLD)}
    rows, resource = _python_details(documents)
    assert rows == {
        ("Job.run", "run", "/srv/app/jobs.py", 10, 14),
        ("Job.pack", "pack", "/srv/app/jobs.py", 10, 22),
        ("<module>", "<module>", "/srv/app/main.py", 1, 30),
    }
    assert resource["process.runtime.name"] == "cpython"
    assert resource["process.runtime.version"] == "3.12.1"
