"""OTLP encoder: dictionary invariants, resource/sample/location/mapping attributes, shapes, round trip."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import struct
from pathlib import Path

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Link
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Profile as OtlpProfile
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Sample as OtlpSample

from agent.export.otlp import fileid
from agent.export.otlp.encode import encode_request
from agent.export.otlp.fileid import FileIdCache
from agent.export.otlp.resource import ResourceOptions
from agent.export.otlp.stats import HTLHASH_UNREADABLE, Counters
from agent.symbolize.types import KERNEL_MAPPING_NAME, Frame, FrameKind, MappingInfo, ProcessInfo, Profile, Sample
from agent.types import ProfileSpec, ValueType

CPU = ProfileSpec(
    "cpu", (ValueType("samples", "count"), ValueType("cpu", "nanoseconds")), ValueType("cpu", "nanoseconds"), 10_101_010
)
OFFCPU = ProfileSpec(
    "offcpu", (ValueType("samples", "count"), ValueType("off_cpu", "nanoseconds")), ValueType("", ""), 0
)
ALLOC = ProfileSpec(
    "alloc",
    (ValueType("alloc_objects", "count"), ValueType("alloc_space", "bytes")),
    ValueType("space", "bytes"),
    524288,
)
START = 1_700_000_000_000_000_000
DURATION = 10_000_000_000
RESOURCE = ResourceOptions(host_name="host-1", host_arch="amd64", os_type="linux")
KERNEL_MAP = MappingInfo(KERNEL_MAPPING_NAME, 0, 0, 0, build_id="feed" * 5)


def _binary(tmp_path: Path, name: str, size: int = 10_000) -> str:
    path = tmp_path / name
    path.write_bytes(bytes(i % 251 for i in range(size)))
    return str(path)


def _frames(exe: str, *names: str, kernel: tuple[str, ...] = ()) -> tuple[Frame, ...]:
    mapping = MappingInfo(exe, 0x55550000, 0x55560000, 0x1000, build_id="ab" * 20)
    kernel_frames = tuple(Frame(FrameKind.KERNEL, 0xFFFF0000 + i, n, KERNEL_MAP) for i, n in enumerate(kernel))
    user = tuple(Frame(FrameKind.NATIVE, 0x55551000 + 16 * i, n, mapping) for i, n in enumerate(names))
    return kernel_frames + user


def _cpu_sample(
    pid: int, tid: int, frames: tuple[Frame, ...], count: int, cpu: int = 0, name: str = "worker"
) -> Sample:
    timestamps = tuple(START + 1_000 * (i + 1) for i in range(count))
    return Sample(pid, tid, cpu, name, frames, (count, count * CPU.period), timestamps)


def _cpu_profile(tmp_path: Path) -> Profile:
    app, tool = _binary(tmp_path, "app"), _binary(tmp_path, "tool", 3000)
    samples = (
        _cpu_sample(100, 101, _frames(app, "hot", "main", kernel=("irq", "syscall")), 3, cpu=1, name="app-worker"),
        _cpu_sample(100, 102, _frames(app, "cold", "main"), 1, cpu=2, name="app-io"),
        _cpu_sample(200, 200, _frames(tool, "run", "main"), 2),
        Sample(
            300, 300, 3, "kthread", (Frame(FrameKind.MARKER, 0, "[missing user stack]", None),), (1, 1), (START + 5,)
        ),
    )
    processes = {
        100: ProcessInfo(100, "app", app),
        200: ProcessInfo(200, "tool", tool),
        300: ProcessInfo(300, "kworker/0:1", ""),
    }
    return Profile(CPU, START, DURATION, samples, processes)


def _encode_one(profile: Profile, **kwargs: object) -> ExportProfilesServiceRequest:
    requests = encode_request([(profile, b"PPROF")], RESOURCE, False, **kwargs)  # type: ignore[arg-type]
    assert len(requests) == 1
    return requests[0]


def _attrs(request: ExportProfilesServiceRequest, indices: object) -> dict[str, object]:
    d = request.dictionary
    result: dict[str, object] = {}
    for i in indices:  # type: ignore[attr-defined]
        kv = d.attribute_table[i]
        key = d.string_table[kv.key_strindex]
        assert key not in result, f"duplicate key {key} in one attribute_indices list"
        result[key] = getattr(kv.value, kv.value.WhichOneof("value"))
    return result


def _resource_attrs(resource_profiles: object) -> dict[str, str | int]:
    result: dict[str, str | int] = {}
    for kv in resource_profiles.resource.attributes:  # type: ignore[attr-defined]
        assert kv.key and kv.key_strindex == 0, "resource keys must be plain strings"
        kind = kv.value.WhichOneof("value")
        assert kind in ("string_value", "int_value"), kind
        result[kv.key] = getattr(kv.value, kind)
    return result


# (type, pid, tid, thread, cpu, frames leaf first as (kind, function, address), value, timestamps)
Row = tuple[str, object, object, object, object, tuple[tuple[object, str, int], ...], int, tuple[int, ...]]


def decode(request: ExportProfilesServiceRequest) -> list[Row]:
    """Flatten a request back to (type, pid, tid, thread, cpu, frames leaf first, value, timestamps) rows."""
    d = request.dictionary
    rows: list[Row] = []
    for rp in request.resource_profiles:
        pid = _resource_attrs(rp)["process.pid"]
        for scope in rp.scope_profiles:
            for profile in scope.profiles:
                sample_type = d.string_table[profile.sample_type.type_strindex]
                for sample in profile.samples:
                    attrs = _attrs(request, sample.attribute_indices)
                    frames = []
                    for li in d.stack_table[sample.stack_index].location_indices:
                        location = d.location_table[li]
                        kind = _attrs(request, location.attribute_indices)["profile.frame.type"]
                        names = [
                            d.string_table[d.function_table[line.function_index].name_strindex]
                            for line in location.lines
                        ]
                        frames.append((kind, names[0] if names else "", location.address))
                    value = sum(sample.values) if sample.values else len(sample.timestamps_unix_nano)
                    rows.append(
                        (
                            sample_type,
                            pid,
                            attrs["thread.id"],
                            attrs.get("thread.name", ""),
                            attrs["cpu.logical_number"],
                            tuple(frames),
                            value,
                            tuple(sorted(sample.timestamps_unix_nano)),
                        )
                    )
    return rows


def test_pinned_proto_version_and_field_numbers() -> None:
    assert importlib.metadata.version("opentelemetry-proto").startswith("1.45.")
    sample = OtlpSample.DESCRIPTOR.fields_by_name
    assert (sample["stack_index"].number, sample["attribute_indices"].number, sample["link_index"].number) == (1, 2, 3)
    assert (sample["values"].number, sample["timestamps_unix_nano"].number) == (4, 5)
    profile = OtlpProfile.DESCRIPTOR.fields_by_name
    assert profile["original_payload_format"].number == 9 and profile["original_payload"].number == 10
    assert AnyValue.DESCRIPTOR.fields_by_name["string_value_strindex"].number == 8


def test_dictionary_tables_have_zero_values_and_no_duplicates(tmp_path: Path) -> None:
    d = _encode_one(_cpu_profile(tmp_path)).dictionary
    assert d.string_table[0] == ""
    assert d.link_table[0] == Link() and d.link_table[0].ByteSize() == 0  # empty, not 16/8 zero bytes
    tables = (d.mapping_table, d.location_table, d.function_table, d.link_table, d.attribute_table, d.stack_table)
    for table in tables:
        assert len(table) >= 1 and table[0].ByteSize() == 0
        serialized = [entry.SerializeToString(deterministic=True) for entry in table]
        assert len(set(serialized)) == len(serialized)
    assert len(set(d.string_table)) == len(d.string_table)
    assert len(d.mapping_table) > 1 and len(d.function_table) > 1 and len(d.stack_table) > 1


def test_resources_one_per_process_with_host_and_process_attributes(tmp_path: Path) -> None:
    profile = _cpu_profile(tmp_path)
    request = _encode_one(profile, extra_resource={100: {"container.id": "c0ffee"}})
    resources = {_resource_attrs(rp)["process.pid"]: _resource_attrs(rp) for rp in request.resource_profiles}
    assert sorted(resources) == [100, 200, 300] and len(request.resource_profiles) == 3
    app = resources[100]
    assert app["process.executable.name"] == "app"
    assert app["process.executable.path"] == profile.processes[100].exe_path
    assert app["service.name"] == "app"
    assert app["container.id"] == "c0ffee"
    assert (app["host.name"], app["host.arch"], app["os.type"]) == ("host-1", "amd64", "linux")
    kthread = resources[300]
    assert kthread["service.name"] == "kworker/0:1"  # no executable: the comm
    assert "process.executable.name" not in kthread and "container.id" not in kthread


def test_configured_service_name_wins(tmp_path: Path) -> None:
    options = ResourceOptions(host_name="h", host_arch="arm64", service_name="checkout")
    request = encode_request([(_cpu_profile(tmp_path), b"")], options, False)[0]
    assert {_resource_attrs(rp)["service.name"] for rp in request.resource_profiles} == {"checkout"}


def test_cpu_profile_types_window_and_timestamps_only_shape(tmp_path: Path) -> None:
    request = _encode_one(_cpu_profile(tmp_path))
    d = request.dictionary
    for rp in request.resource_profiles:
        (profile,) = rp.scope_profiles[0].profiles
        assert rp.scope_profiles[0].scope.name == "profiling-agent"
        assert (
            d.string_table[profile.sample_type.type_strindex],
            d.string_table[profile.sample_type.unit_strindex],
        ) == (
            "samples",
            "count",
        )
        assert profile.HasField("period_type")
        period_type = (
            d.string_table[profile.period_type.type_strindex],
            d.string_table[profile.period_type.unit_strindex],
        )
        assert period_type == ("cpu", "nanoseconds") and profile.period == CPU.period
        assert len(profile.samples) >= 1
        assert not profile.original_payload and not profile.original_payload_format
        for sample in profile.samples:
            # every event has its timestamp: the shape opentelemetry-ebpf-profiler sends, accepted by all receivers
            assert len(sample.values) == 0 and len(sample.timestamps_unix_nano) >= 1
            for ts in sample.timestamps_unix_nano:
                assert profile.time_unix_nano <= ts < profile.time_unix_nano + profile.duration_nano


def test_window_grows_to_cover_early_and_late_timestamps(tmp_path: Path) -> None:
    frames = _frames(_binary(tmp_path, "a"), "f")
    late = Sample(1, 1, 0, "t", frames, (2, 2 * CPU.period), (START - 500, START + DURATION + 7))
    profile = Profile(CPU, START, DURATION, (late,), {1: ProcessInfo(1, "a", "")})
    (p,) = _encode_one(profile).resource_profiles[0].scope_profiles[0].profiles
    assert p.time_unix_nano == START - 500
    assert p.time_unix_nano + p.duration_nano > START + DURATION + 7


def test_incomplete_timestamps_fall_back_to_aggregated_values(tmp_path: Path) -> None:
    frames = _frames(_binary(tmp_path, "a"), "f")
    samples = (
        Sample(1, 1, 0, "t", frames, (5, 5 * CPU.period), (START + 1, START + 2)),  # 5 events, 2 timestamps kept
        Sample(1, 2, 0, "t", frames, (1, CPU.period), (START + 3,)),
    )
    profile = Profile(CPU, START, DURATION, samples, {1: ProcessInfo(1, "a", "")})
    (p,) = _encode_one(profile).resource_profiles[0].scope_profiles[0].profiles
    shapes = sorted((list(s.values), list(s.timestamps_unix_nano)) for s in p.samples)
    # one value per sample; a timestamp only where it stands for that single event (equal lengths)
    assert shapes == [([1], [START + 3]), ([5], [])]


def test_samples_with_the_same_identity_are_merged(tmp_path: Path) -> None:
    frames = _frames(_binary(tmp_path, "a"), "f")
    first = Sample(1, 1, 0, "t", frames, (1, CPU.period), (START + 1,))
    second = Sample(1, 1, 0, "t", frames, (2, 2 * CPU.period), (START + 3, START + 2))
    profile = Profile(CPU, START, DURATION, (first, second), {1: ProcessInfo(1, "a", "")})
    (p,) = _encode_one(profile).resource_profiles[0].scope_profiles[0].profiles
    assert len(p.samples) == 1
    assert list(p.samples[0].timestamps_unix_nano) == [START + 1, START + 2, START + 3]


@pytest.mark.parametrize(
    ("spec", "values", "expected_type", "expected_period"),
    [
        (OFFCPU, (3, 7_000), ("off_cpu", "nanoseconds"), (("", ""), 0)),
        (ALLOC, (3, 4096), ("alloc_space", "bytes"), (("space", "bytes"), 524288)),
    ],
)
def test_other_specs_carry_their_last_sample_type(
    tmp_path: Path, spec: ProfileSpec, values: tuple[int, int], expected_type: tuple[str, str], expected_period: object
) -> None:
    sample = Sample(1, 1, 0, "t", _frames(_binary(tmp_path, "a"), "f"), values, (START + 1, START + 2, START + 3))
    request = _encode_one(Profile(spec, START, DURATION, (sample,), {1: ProcessInfo(1, "a", "")}))
    d = request.dictionary
    (p,) = request.resource_profiles[0].scope_profiles[0].profiles
    assert (d.string_table[p.sample_type.type_strindex], d.string_table[p.sample_type.unit_strindex]) == expected_type
    assert p.HasField("period_type")  # present even when empty: Parca requires it
    period_type = (d.string_table[p.period_type.type_strindex], d.string_table[p.period_type.unit_strindex])
    assert (period_type, p.period) == expected_period
    assert list(p.samples[0].values) == [values[1]] and not p.samples[0].timestamps_unix_nano


def test_locations_mappings_and_sample_attributes(tmp_path: Path) -> None:
    profile = _cpu_profile(tmp_path)
    request = _encode_one(profile)
    d = request.dictionary
    kinds = {str(_attrs(request, loc.attribute_indices)["profile.frame.type"]) for loc in d.location_table[1:]}
    assert kinds == {"kernel", "native", "abort-marker"}
    app_path = profile.processes[100].exe_path
    data = Path(app_path).read_bytes()
    expected_htlhash = hashlib.sha256(data[:4096] + data[-4096:] + struct.pack(">Q", len(data))).hexdigest()[:32]
    by_name = {d.string_table[m.filename_strindex]: m for m in d.mapping_table[1:]}
    assert set(by_name) == {"app", "tool", KERNEL_MAPPING_NAME}  # basenames
    app = by_name["app"]
    assert (app.memory_start, app.memory_limit, app.file_offset) == (0x55550000, 0x55560000, 0x1000)
    assert _attrs(request, app.attribute_indices) == {
        "process.executable.build_id.gnu": "ab" * 20,
        "process.executable.build_id.htlhash": expected_htlhash,
    }
    assert _attrs(request, by_name[KERNEL_MAPPING_NAME].attribute_indices) == {
        "process.executable.build_id.gnu": "feed" * 5
    }
    marker = [loc for loc in d.location_table[1:] if loc.mapping_index == 0]
    assert len(marker) == 1 and d.string_table[d.function_table[marker[0].lines[0].function_index].name_strindex] == (
        "[missing user stack]"
    )
    rows = decode(request)
    assert {(r[1], r[2], r[3], r[4]) for r in rows} == {
        (100, 101, "app-worker", 1),
        (100, 102, "app-io", 2),
        (200, 200, "worker", 0),
        (300, 300, "kthread", 3),
    }


def test_unnamed_frame_keeps_mapping_and_address_without_lines(tmp_path: Path) -> None:
    mapping = MappingInfo(_binary(tmp_path, "lib.so"), 0x7000, 0x8000, 0)
    frame = Frame(FrameKind.NATIVE, 0x7123, "", mapping)
    profile = Profile(CPU, START, DURATION, (_cpu_sample(1, 1, (frame,), 1),), {1: ProcessInfo(1, "x", "")})
    d = _encode_one(profile).dictionary
    (location,) = d.location_table[1:]
    assert location.address == 0x7123 and location.mapping_index != 0 and len(location.lines) == 0


def test_round_trip_through_the_wire(tmp_path: Path) -> None:
    profile = _cpu_profile(tmp_path)
    wire = _encode_one(profile).SerializeToString()
    rows = decode(ExportProfilesServiceRequest.FromString(wire))
    expected = []
    for s in profile.samples:
        frames = tuple(
            (FrameKind(f.kind).value if f.kind is not FrameKind.MARKER else "abort-marker", f.function, f.address)
            for f in s.frames
        )
        expected.append(
            ("samples", s.pid, s.tid, s.thread_name, s.cpu, frames, s.values[0], tuple(sorted(s.timestamps_unix_ns)))
        )
    assert sorted(rows, key=repr) == sorted(expected, key=repr)


def test_original_payload_once_per_input_profile(tmp_path: Path) -> None:
    (request,) = encode_request([(_cpu_profile(tmp_path), b"PPROF-BYTES")], RESOURCE, True)
    profiles = [p for rp in request.resource_profiles for p in rp.scope_profiles[0].profiles]
    carrying = [p for p in profiles if p.original_payload]
    assert len(carrying) == 1
    assert carrying[0].original_payload == b"PPROF-BYTES" and carrying[0].original_payload_format == "pprof"
    assert all(not p.original_payload_format for p in profiles if not p.original_payload)


def test_no_empty_profiles_or_requests(tmp_path: Path) -> None:
    empty = Profile(CPU, START, DURATION, (), {})
    assert encode_request([(empty, b"x")], RESOURCE, True) == []
    assert encode_request([], RESOURCE, False) == []
    frames = _frames(_binary(tmp_path, "a"), "f")
    zero = Sample(1, 1, 0, "t", frames, (0, 0), ())
    assert encode_request([(Profile(CPU, START, DURATION, (zero,), {}), b"")], RESOURCE, False) == []


def test_two_profiles_of_one_process_share_its_resource(tmp_path: Path) -> None:
    frames = _frames(_binary(tmp_path, "a"), "f")
    cpu = Profile(CPU, START, DURATION, (_cpu_sample(7, 7, frames, 2),), {7: ProcessInfo(7, "a", "")})
    off = Profile(
        OFFCPU, START, DURATION, (Sample(7, 7, 0, "t", frames, (1, 500), (START + 9,)),), {7: ProcessInfo(7, "a", "")}
    )
    (request,) = encode_request([(cpu, b""), (off, b"")], RESOURCE, False)
    assert len(request.resource_profiles) == 1 and len(request.resource_profiles[0].scope_profiles[0].profiles) == 2


def test_samples_from_before_an_exec_have_the_old_images_resource(tmp_path: Path) -> None:
    """#17: pid 7 ran `tool`, then exec'd `app`; the interval holds samples of both images. Each image
    gets its own resource (executable, service name), as the two programs they were."""
    tool, app = _binary(tmp_path, "tool"), _binary(tmp_path, "app")
    earlier = dataclasses.replace(_cpu_sample(7, 7, _frames(tool, "run"), 2), process=ProcessInfo(7, "tool", tool))
    later = _cpu_sample(7, 7, _frames(app, "main"), 3)
    profile = Profile(CPU, START, DURATION, (earlier, later), {7: ProcessInfo(7, "app", app)})
    request = _encode_one(profile)
    resources = [_resource_attrs(rp) for rp in request.resource_profiles]
    assert [(r["process.pid"], r["service.name"], r["process.executable.path"]) for r in resources] == [
        (7, "tool", tool),
        (7, "app", app),
    ]
    counts = [len(rp.scope_profiles[0].profiles[0].samples) for rp in request.resource_profiles]
    assert counts == [1, 1]


def test_large_input_is_split_into_self_contained_requests(tmp_path: Path) -> None:
    app = _binary(tmp_path, "app")
    samples = tuple(
        _cpu_sample(pid, pid * 10 + i, _frames(app, f"fn_{pid}_{i}", "main"), 2) for pid in (1, 2, 3) for i in range(40)
    )
    profile = Profile(CPU, START, DURATION, samples, {p: ProcessInfo(p, "a", app) for p in (1, 2, 3)})
    requests = encode_request([(profile, b"")], RESOURCE, False, max_request_bytes=2000)
    assert len(requests) > 3
    rows = []
    for request in requests:
        assert request.ByteSize() <= 2000
        assert request.dictionary.string_table[0] == "" and len(request.dictionary.link_table) == 1
        rows.extend(decode(ExportProfilesServiceRequest.FromString(request.SerializeToString())))
    assert len(rows) == len(samples) and sum(r[6] for r in rows) == 2 * len(samples)


def test_htlhash_reads_through_proc_root_and_caches_by_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = tmp_path / "usr" / "lib" / "libx.so"
    host.parent.mkdir(parents=True)
    host.write_bytes(b"host" * 5000)
    proc = tmp_path / "proc"
    inside = proc / "42" / "root" / "usr" / "lib" / "libx.so"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"container" * 100)
    counters = Counters()
    cache = FileIdCache(counters, proc_root=str(proc))
    data = inside.read_bytes()
    expected = hashlib.sha256(data[:4096] + data[-4096:] + struct.pack(">Q", len(data))).hexdigest()[:32]
    opened: list[str] = []
    real = fileid.htlhash_of_file

    def counting(path: str) -> str:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(fileid, "htlhash_of_file", counting)
    assert cache.htlhash(42, "/usr/lib/libx.so") == expected  # the process's view, not the host's
    assert cache.htlhash(42, "/usr/lib/libx.so") == expected
    assert len(opened) == 1  # cached by path + stat identity
    inside.write_bytes(b"replaced" * 50)
    assert cache.htlhash(42, "/usr/lib/libx.so") != expected and len(opened) == 2
    # a process that is gone: the host path
    assert (
        cache.htlhash(43, str(host))
        == hashlib.sha256(host.read_bytes()[:4096] + host.read_bytes()[-4096:] + struct.pack(">Q", 20000)).hexdigest()[
            :32
        ]
    )
    assert cache.htlhash(43, str(tmp_path / "missing.so")) is None
    assert cache.htlhash(43, "[vdso]") is None
    assert counters.get(HTLHASH_UNREADABLE) == 1


def test_unreadable_mapping_file_omits_htlhash_only(tmp_path: Path) -> None:
    mapping = MappingInfo(str(tmp_path / "gone.so"), 0x1000, 0x2000, 0, build_id="cd" * 20)
    frame = Frame(FrameKind.NATIVE, 0x1100, "f", mapping)
    counters = Counters()
    profile = Profile(CPU, START, DURATION, (_cpu_sample(1, 1, (frame,), 1),), {1: ProcessInfo(1, "x", "")})
    request = _encode_one(profile, file_ids=FileIdCache(counters, proc_root=str(tmp_path / "noproc")))
    (mapping_entry,) = request.dictionary.mapping_table[1:]
    assert _attrs(request, mapping_entry.attribute_indices) == {"process.executable.build_id.gnu": "cd" * 20}
    assert counters.get(HTLHASH_UNREADABLE) == 1


def test_oversized_pprof_payload_is_left_out_rather_than_failing_the_request(tmp_path: Path) -> None:
    profile = _cpu_profile(tmp_path)
    requests = encode_request([(profile, b"P" * 5000)], RESOURCE, True, max_request_bytes=4000)
    profiles = [p for r in requests for rp in r.resource_profiles for p in rp.scope_profiles[0].profiles]
    assert all(not p.original_payload for p in profiles)
    assert sum(len(decode(r)) for r in requests) == len(profile.samples)
