"""Python frames in the outputs: pprof Functions/Lines (read back by `go tool pprof`) and OTLP.

The profile is built by hand the way the symbolize stage makes it: Python frames of kind PYTHON at
address 0 in the interpreter's mapping with a `PythonSource`, a C extension's native frames under them,
the interpreter's own native frames between them, and a Python process with `process.runtime.*`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest

from agent._proto import profile_pb2
from agent.export.files import FileSink
from agent.export.otlp.encode import encode_request
from agent.export.otlp.resource import ResourceOptions
from agent.pprof.builder import build_pprof
from agent.symbolize.python_merge import UNKNOWN_CODE
from agent.symbolize.types import Frame, FrameKind, MappingInfo, ProcessInfo, Profile, PythonSource, Sample
from agent.types import ProfileSpec, ValueType

SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
START_NS = 1_795_363_512_123_456_789
PID = 700
# Paths that exist on no host, so `go tool pprof` cannot find and symbolize anything itself.
PYTHON = MappingInfo("/opt/fixture/bin/python3.12", 0x5600_0000_0000, 0x5600_0040_0000, 0x1000, "ab" * 20)
LIBZ = MappingInfo("/opt/fixture/lib/libz.so.1", 0x7F00_0000_0000, 0x7F00_0002_0000, 0, "cd" * 20)


def py(qualname: str, name: str, filename: str, start_line: int, line: int) -> Frame:
    return Frame(FrameKind.PYTHON, 0, qualname, PYTHON, PythonSource(name, filename, start_line, line))


WORK_14 = py("Worker.work", "work", "/srv/app/worker.py", 10, 14)
WORK_15 = py("Worker.work", "work", "/srv/app/worker.py", 10, 15)
# Another function of the same qualname in another file: a Function of its own.
OTHER_WORK = py("Worker.work", "work", "/srv/app/legacy/worker.py", 40, 41)
MODULE = py("<module>", "<module>", "/srv/app/main.py", 1, 30)
UNKNOWN = Frame(FrameKind.PYTHON, 0, UNKNOWN_CODE, PYTHON)
DEFLATE = Frame(FrameKind.NATIVE, 0x7F00_0000_1000, "deflate", LIBZ)
VECTORCALL = Frame(FrameKind.NATIVE, 0x5600_0020_0010, "_PyFunction_Vectorcall", PYTHON)
MAIN = Frame(FrameKind.NATIVE, 0x5600_0030_0000, "main", PYTHON)


def profile() -> Profile:
    samples = (
        Sample(PID, PID, 0, "python3", (WORK_14, VECTORCALL, MODULE, MAIN), (6,), (START_NS + 1,) * 6),
        Sample(PID, PID, 0, "python3", (WORK_15, VECTORCALL, MODULE, MAIN), (3,), (START_NS + 2,) * 3),
        Sample(PID, PID, 1, "python3", (DEFLATE, WORK_15, VECTORCALL, MODULE, MAIN), (2,), (START_NS + 3,) * 2),
        Sample(PID, PID, 1, "python3", (OTHER_WORK, UNKNOWN, MAIN), (1,), (START_NS + 4,)),
    )
    process = ProcessInfo(PID, "python3", PYTHON.path, runtime_name="cpython", runtime_version="3.12.1")
    return Profile(SPEC, START_NS, 10_000_000_000, samples, {PID: process})


def parse_pprof(data: bytes) -> Any:
    message = profile_pb2.Profile()
    message.ParseFromString(data)
    return message


# --- pprof ---------------------------------------------------------------------------------------------


def test_pprof_python_functions_carry_qualname_co_name_file_and_first_line_once_each() -> None:
    p = parse_pprof(build_pprof(profile()))
    s = p.string_table
    python = {
        (s[f.name], s[f.system_name], s[f.filename], f.start_line) for f in p.function if s[f.filename].endswith(".py")
    }
    # co_name equal to the qualname is left out: go tool pprof would "demangle" `<module>` to "".
    assert python == {
        ("Worker.work", "work", "/srv/app/worker.py", 10),
        ("Worker.work", "work", "/srv/app/legacy/worker.py", 40),
        ("<module>", "", "/srv/app/main.py", 1),
    }
    assert len(p.function) == len({(f.name, f.system_name, f.filename, f.start_line) for f in p.function})
    assert sum(1 for f in p.function if s[f.name] == UNKNOWN_CODE) == 1


def test_pprof_python_locations_one_per_function_and_line_in_the_interpreter_mapping() -> None:
    p = parse_pprof(build_pprof(profile()))
    s = p.string_table
    functions = {f.id: f for f in p.function}
    mapping_ids = {s[m.filename]: m.id for m in p.mapping}
    rows = []
    for location in p.location:
        (line,) = location.line
        function = functions[line.function_id]
        if s[function.filename].endswith(".py"):
            rows.append((s[function.filename], s[function.name], line.line, location.mapping_id, location.address))
    assert sorted(rows) == sorted(
        [
            ("/srv/app/worker.py", "Worker.work", 14, mapping_ids[PYTHON.path], 0),
            ("/srv/app/worker.py", "Worker.work", 15, mapping_ids[PYTHON.path], 0),
            ("/srv/app/legacy/worker.py", "Worker.work", 41, mapping_ids[PYTHON.path], 0),
            ("/srv/app/main.py", "<module>", 30, mapping_ids[PYTHON.path], 0),
        ]
    )
    # The sample with the C extension keeps deflate at its leaf, under the Python caller's line 15.
    by_id = {location.id: location for location in p.location}
    leaf_names = [
        [s[functions[by_id[i].line[0].function_id].name] for i in sample.location_id[:2]] for sample in p.sample
    ]
    assert ["deflate", "Worker.work"] in leaf_names


def test_pprof_labels_carry_the_runtime() -> None:
    p = parse_pprof(build_pprof(profile()))
    s = p.string_table
    labels = {s[label.key]: s[label.str] for label in p.sample[0].label if label.str}
    assert labels["process.runtime.name"] == "cpython"
    assert labels["process.runtime.version"] == "3.12.1"
    # A process with no runtime gets no such label (pprof drops empty string labels anyway).
    plain = Profile(SPEC, START_NS, 1, (profile().samples[0],), {PID: ProcessInfo(PID, "app", "/opt/app")})
    q = parse_pprof(build_pprof(plain))
    assert "process.runtime.name" not in {q.string_table[label.key] for label in q.sample[0].label}


GO = shutil.which("go")


@pytest.mark.skipif(GO is None, reason="`go` is not on PATH, so `go tool pprof` cannot read the output")
def test_go_pprof_top_lines_shows_python_frames_as_qualname_file_and_line(tmp_path: Path) -> None:
    assert GO is not None
    path = FileSink(tmp_path / "out", max_files=0, max_bytes=0).export(profile(), build_pprof(profile()))
    env = {**os.environ, "PPROF_BINARY_PATH": str(tmp_path / "no-binaries")}
    result = subprocess.run(
        [GO, "tool", "pprof", "-top", "-lines", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        # flat flat% sum% cum cum% name location
        match = re.match(r"\s*(\d+)\s+\S+%\s+\S+%\s+(\d+)\s+\S+%\s+(.+)$", line)
        if match:
            rows[match.group(3).strip()] = (int(match.group(1)), int(match.group(2)))
    assert rows["Worker.work /srv/app/worker.py:14"] == (6, 6)
    assert rows["Worker.work /srv/app/worker.py:15"] == (3, 5)
    assert rows["Worker.work /srv/app/legacy/worker.py:41"] == (1, 1)
    assert rows["<module> /srv/app/main.py:30"] == (0, 11)
    assert rows["deflate"] == (2, 2)


# --- OTLP ----------------------------------------------------------------------------------------------


def encoded() -> ExportProfilesServiceRequest:
    (request,) = encode_request([(profile(), b"")], ResourceOptions("host-1", "amd64"), include_pprof=False)
    # Through the wire and back: what a receiver sees.
    return ExportProfilesServiceRequest.FromString(request.SerializeToString())


def test_otlp_python_frames_round_trip_with_frame_type_function_and_line() -> None:
    request = encoded()
    d = request.dictionary
    s = d.string_table

    def attributes(indices: Any) -> dict[str, str]:
        return {s[d.attribute_table[i].key_strindex]: d.attribute_table[i].value.string_value for i in indices}

    rows = set()
    kinds = {}
    for location in list(d.location_table)[1:]:
        (line,) = location.lines
        function = d.function_table[line.function_index]
        frame_type = attributes(location.attribute_indices)["profile.frame.type"]
        kinds[s[function.name_strindex]] = frame_type
        if frame_type == "cpython" and s[function.name_strindex] != UNKNOWN_CODE:
            mapping = d.mapping_table[location.mapping_index]
            rows.add(
                (
                    s[function.name_strindex],
                    s[function.system_name_strindex],
                    s[function.filename_strindex],
                    function.start_line,
                    line.line,
                    s[mapping.filename_strindex],
                    location.address,
                )
            )
    assert rows == {
        ("Worker.work", "work", "/srv/app/worker.py", 10, 14, "python3.12", 0),
        ("Worker.work", "work", "/srv/app/worker.py", 10, 15, "python3.12", 0),
        ("Worker.work", "work", "/srv/app/legacy/worker.py", 40, 41, "python3.12", 0),
        ("<module>", "<module>", "/srv/app/main.py", 1, 30, "python3.12", 0),
    }
    assert kinds == {
        "Worker.work": "cpython",
        "<module>": "cpython",
        UNKNOWN_CODE: "cpython",
        "deflate": "native",
        "_PyFunction_Vectorcall": "native",
        "main": "native",
    }
    functions = [(f.name_strindex, f.system_name_strindex, f.filename_strindex, f.start_line) for f in d.function_table]
    assert len(functions) == len(set(functions))
    # A native function still has its name only, as before.
    (deflate,) = [f for f in d.function_table if s[f.name_strindex] == "deflate"]
    assert (deflate.system_name_strindex, deflate.filename_strindex, deflate.start_line) == (0, 0, 0)


def test_otlp_resource_carries_the_runtime() -> None:
    request = encoded()
    (resource_profiles,) = request.resource_profiles
    attrs = {kv.key: kv.value.string_value for kv in resource_profiles.resource.attributes}
    assert attrs["process.runtime.name"] == "cpython"
    assert attrs["process.runtime.version"] == "3.12.1"
