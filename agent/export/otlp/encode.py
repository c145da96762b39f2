"""Export stage, OTLP sink: `Profile`s -> OTLP `ExportProfilesServiceRequest`s (profiles v1development).

Pure apart from the htlhash file reads (see `fileid`). For each request:
* one `ProfilesDictionary` shared by everything in it (`dictionary.DictionaryBuilder`);
* one `ResourceProfiles` per process (pid; per image, when samples from before an exec are in the
  interval: `Profile.process_of`), with a single `ScopeProfiles` naming this agent, holding
  one OTLP `Profile` per input profile that has samples of that process; its resource carries the
  process, its metadata (`container.id`, `k8s.pod.uid`, `systemd.unit` from `ProcessInfo`) and the
  host (`k8s.node.name` included when set), as `resource.process_resource` documents;
* value types and per-sample shapes as `shapes` documents; samples with the same stack and
  attributes are merged, as the spec asks;
* locations carry `profile.frame.type`: `kernel`, `native`, `cpython` for Python frames, or
  `abort-marker` for the marker frames that stand for a stack that could not be captured (the value
  opentelemetry-ebpf-profiler uses for its "unwinding aborted" frames; the marker text is the frame's
  function name);
* a Python frame's Function has name = qualname, system_name = co_name, filename = co_filename and
  start_line = co_firstlineno, and its Line the line number; its Location has the interpreter's
  mapping and address 0 (see `agent.pprof.builder`);
* mappings use the runtime-address convention of the input (pprof's), their filename is the file's
  basename (as opentelemetry-ebpf-profiler sends it: the build ids, not the path, identify the
  file, and a path inside a container means little elsewhere), and they carry
  `process.executable.build_id.gnu` when known and `.htlhash` when the file is readable;
* samples carry `thread.id`, `thread.name` (when known) and `cpu.logical_number`.

The pprof bytes, when asked for, ride as `original_payload` on the first OTLP profile made from
their input profile. A profile without samples is never emitted and an empty request never
returned. Requests larger than `max_request_bytes` (the collector's default gRPC receive limit is
4 MiB) are split by process, and a single process's samples in halves; a pprof copy too large to
fit is left out (logged) rather than costing the samples.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Profile as OtlpProfile
from opentelemetry.proto.profiles.v1development.profiles_pb2 import ScopeProfiles
from opentelemetry.proto.profiles.v1development.profiles_pb2 import ValueType as OtlpValueType

from agent import __version__
from agent.export.otlp.dictionary import AttrValue, DictionaryBuilder
from agent.export.otlp.fileid import FileIdCache
from agent.export.otlp.resource import ResourceOptions, process_resource
from agent.export.otlp.shapes import Shape, ValueMapping, choose_shape, profile_window, value_mapping
from agent.export.otlp.stats import Counters
from agent.symbolize.types import KERNEL_MAPPING_NAME, Frame, FrameKind, MappingInfo, ProcessInfo, Profile, Sample
from agent.types import ValueType

logger = logging.getLogger(__name__)

SCOPE_NAME = "profiling-agent"
PPROF_FORMAT = "pprof"
# Below the 4 MiB default receive limit of grpc servers (the collector's otlp receiver included).
MAX_REQUEST_BYTES = 3 * 1024 * 1024 + 512 * 1024
FRAME_TYPE_KEY = "profile.frame.type"
FRAME_TYPES = {
    FrameKind.KERNEL: "kernel",
    FrameKind.NATIVE: "native",
    FrameKind.MARKER: "abort-marker",
    FrameKind.PYTHON: "cpython",
    FrameKind.JVM: "jvm",
}
BUILD_ID_GNU = "process.executable.build_id.gnu"
BUILD_ID_HTLHASH = "process.executable.build_id.htlhash"


# Samples by OTLP identity (stack index, attribute indices): summed value and every timestamp.
_Merged = dict[tuple[int, tuple[int, ...]], tuple[int, list[int]]]


@dataclass(frozen=True, slots=True)
class _Unit:
    """The samples of one process (one image of it: an exec makes another) from one input profile: the
    unit requests are split by."""

    profile: Profile
    pid: int
    process: ProcessInfo
    samples: tuple[Sample, ...]
    payload: bytes  # pprof bytes to attach, or b""


def encode_request(
    profiles: Sequence[tuple[Profile, bytes]],
    resource: ResourceOptions,
    include_pprof: bool,
    *,
    extra_resource: Mapping[int, Mapping[str, AttrValue]] | None = None,
    file_ids: FileIdCache | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> list[ExportProfilesServiceRequest]:
    """Encode one interval's profiles (each with its pprof bytes) into as few requests as fit.

    `extra_resource` adds resource attributes per pid (they never override the process's own, see
    `resource.process_resource`); `file_ids` caches htlhashes across calls (a private cache is used
    when omitted).
    """
    units: list[_Unit] = []
    for profile, pprof in profiles:
        # By process as each sample ran: samples from before an exec have the old image's resource.
        by_process: dict[ProcessInfo, list[Sample]] = {}
        for sample in profile.samples:
            process = profile.process_of(sample) or ProcessInfo(sample.pid, "", "")
            by_process.setdefault(process, []).append(sample)
        payload = pprof if include_pprof else b""
        for process, samples in by_process.items():
            units.append(_Unit(profile, process.pid, process, tuple(samples), payload))
            payload = b""  # once per input profile
    context = _Context(resource, extra_resource or {}, file_ids or FileIdCache(Counters()), max_request_bytes)
    return _encode_split(units, context)


@dataclass(frozen=True, slots=True)
class _Context:
    resource: ResourceOptions
    extra_resource: Mapping[int, Mapping[str, AttrValue]]
    file_ids: FileIdCache
    max_request_bytes: int


def _encode_split(units: list[_Unit], context: _Context) -> list[ExportProfilesServiceRequest]:
    if not units:
        return []
    encoder = _RequestEncoder(context)
    for unit in units:
        encoder.add(unit)
    request = encoder.request()
    if request is None:
        return []
    size = request.ByteSize()
    if size <= context.max_request_bytes:
        return [request]
    if len(units) > 1:
        half = len(units) // 2
        return _encode_split(units[:half], context) + _encode_split(units[half:], context)
    unit = units[0]
    if unit.payload and len(unit.payload) >= context.max_request_bytes // 2:
        # The optional pprof copy alone would crowd out the samples: send the samples without it.
        logger.warning("pprof original_payload of %d bytes left out of an OTLP request", len(unit.payload))
        return _encode_split([_Unit(unit.profile, unit.pid, unit.process, unit.samples, b"")], context)
    if len(unit.samples) == 1:
        logger.warning("OTLP request of one sample is %d bytes, above the %d limit", size, context.max_request_bytes)
        return [request]
    half = len(unit.samples) // 2
    first = _Unit(unit.profile, unit.pid, unit.process, unit.samples[:half], unit.payload)
    second = _Unit(unit.profile, unit.pid, unit.process, unit.samples[half:], b"")
    return _encode_split([first], context) + _encode_split([second], context)


class _RequestEncoder:
    """Builds one request: its dictionary, and one ResourceProfiles per pid in first-seen order."""

    def __init__(self, context: _Context) -> None:
        self._context = context
        # Everything is built in place inside the request: constructing a message from sub-messages
        # copies them, and the samples would otherwise be copied three times.
        self._request = ExportProfilesServiceRequest()
        self._dict = DictionaryBuilder(self._request.dictionary)
        self._resources: dict[ProcessInfo, ScopeProfiles] = {}
        self._mappings: dict[tuple[int, MappingInfo], int] = {}
        self._locations: dict[tuple[int, Frame], int] = {}
        # Per pid, location index by frame object: the symbolizer shares one object per (process,
        # address), so an id lookup replaces hashing the frame and its mapping. `_frames` keeps the
        # objects alive so ids stay unique.
        self._location_by_frame: dict[int, dict[int, int]] = {}
        self._frames: list[Frame] = []

    def add(self, unit: _Unit) -> None:
        mapping = value_mapping(unit.profile.spec)
        merged = self._merge(unit, mapping)
        if not merged:
            return
        profile = self._scope(unit.process).profiles.add()
        # The value types' strings are interned after the stacks', as they always were.
        self._value_type(profile.sample_type, mapping.sample_type)
        self._value_type(profile.period_type, mapping.period_type)
        self._fill(profile, unit, mapping, merged)

    def request(self) -> ExportProfilesServiceRequest | None:
        return self._request if self._resources else None

    def _scope(self, process: ProcessInfo) -> ScopeProfiles:
        scope = self._resources.get(process)
        if scope is None:
            extra = self._context.extra_resource.get(process.pid)
            resource = self._request.resource_profiles.add()
            resource.resource.CopyFrom(process_resource(self._context.resource, process, extra))
            scope = resource.scope_profiles.add()
            scope.scope.name = SCOPE_NAME
            scope.scope.version = __version__
            self._resources[process] = scope
        return scope

    def _fill(self, result: OtlpProfile, unit: _Unit, mapping: ValueMapping, merged: _Merged) -> None:
        shape = choose_shape(mapping, [(value, len(ts)) for value, ts in merged.values()])
        samples = result.samples
        timestamps: list[int] = []
        for (stack_index, attributes), (value, ts) in merged.items():
            sample = samples.add(stack_index=stack_index, attribute_indices=attributes)
            if shape is Shape.TIMESTAMPS:
                ts = sorted(ts)
                sample.timestamps_unix_nano.extend(ts)
                timestamps.extend(ts)
            else:
                sample.values.append(value)
                if len(ts) == 1:
                    sample.timestamps_unix_nano.append(ts[0])
                    timestamps.append(ts[0])
        result.time_unix_nano, result.duration_nano = profile_window(
            unit.profile.start_unix_ns, unit.profile.duration_ns, timestamps
        )
        result.period = mapping.period
        if unit.payload:
            result.original_payload_format = PPROF_FORMAT
            result.original_payload = unit.payload

    def _merge(self, unit: _Unit, mapping: ValueMapping) -> _Merged:
        """Samples keyed by OTLP identity (stack, attributes): summed value and all timestamps."""
        spec = unit.profile.spec
        merged: _Merged = {}
        for sample in unit.samples:
            if len(sample.values) != len(spec.sample_types):
                raise ValueError(
                    f"{spec.name} sample has {len(sample.values)} values for {len(spec.sample_types)} types"
                )
            value = sample.values[mapping.value_index]
            if value <= 0 and not sample.timestamps_unix_ns:
                continue  # nothing to say; receivers skip zero values anyway
            stack = self._dict.stack(self._location_indices(unit.pid, sample.frames))
            key = (stack, self._sample_attributes(sample))
            previous, ts = merged.get(key, (0, []))
            ts.extend(sample.timestamps_unix_ns)
            merged[key] = (previous + value, ts)
        return merged

    def _sample_attributes(self, sample: Sample) -> tuple[int, ...]:
        attributes = [self._dict.attribute("thread.id", sample.tid)]
        if sample.thread_name:
            attributes.append(self._dict.attribute("thread.name", sample.thread_name))
        if sample.cpu >= 0:
            attributes.append(self._dict.attribute("cpu.logical_number", sample.cpu))
        return tuple(attributes)

    def _value_type(self, message: OtlpValueType, value_type: ValueType) -> None:
        message.SetInParent()  # present even when empty, like a constructed one
        message.type_strindex = self._dict.string(value_type.type)
        message.unit_strindex = self._dict.string(value_type.unit)

    def _location_indices(self, pid: int, frames: tuple[Frame, ...]) -> tuple[int, ...]:
        by_frame = self._location_by_frame.get(pid)
        if by_frame is None:
            by_frame = self._location_by_frame[pid] = {}
        known = tuple(map(by_frame.get, map(id, frames)))  # the common case, every frame known, stays in C
        if None not in known:
            return cast(tuple[int, ...], known)
        return tuple(
            index or self._location_index(by_frame, pid, frame) for index, frame in zip(known, frames, strict=True)
        )

    def _location_index(self, by_frame: dict[int, int], pid: int, frame: Frame) -> int:
        index = by_frame.get(id(frame))
        if index is None:
            if frame.kind is FrameKind.KERNEL:  # the same in every process (see `_location`): -1 holds them
                kernel = self._location_by_frame.setdefault(-1, {})
                index = kernel.get(id(frame))
                if index is None:
                    index = kernel[id(frame)] = self._location(pid, frame)
            else:
                index = self._location(pid, frame)
            by_frame[id(frame)] = index
            self._frames.append(frame)
        return index

    def _location(self, pid: int, frame: Frame) -> int:
        # The kernel is the same in every process, so its frames are resolved once per request.
        key = (-1 if frame.kind is FrameKind.KERNEL else pid, frame)
        index = self._locations.get(key)
        if index is None:
            mapping_index = self._mapping(pid, frame.mapping) if frame.mapping is not None else 0
            source = frame.source
            if source is not None:
                function_index = self._dict.function(
                    frame.function, source.system_name, source.filename, source.start_line
                )
            else:
                function_index = self._dict.function(frame.function) if frame.function else 0
            frame_type = self._dict.attribute(FRAME_TYPE_KEY, FRAME_TYPES[frame.kind])
            line = source.line if source is not None else 0
            index = self._dict.location(mapping_index, frame.address, function_index, (frame_type,), line)
            self._locations[key] = index
        return index

    def _mapping(self, pid: int, info: MappingInfo) -> int:
        key = (-1 if info.path == KERNEL_MAPPING_NAME else pid, info)
        index = self._mappings.get(key)
        if index is None:
            attributes: list[int] = []
            if info.build_id:
                attributes.append(self._dict.attribute(BUILD_ID_GNU, info.build_id))
            htlhash = None if info.path == KERNEL_MAPPING_NAME else self._context.file_ids.htlhash(pid, info.path)
            if htlhash:
                attributes.append(self._dict.attribute(BUILD_ID_HTLHASH, htlhash))
            filename = posixpath.basename(info.path) or info.path
            index = self._dict.mapping(info.start, info.limit, info.file_offset, filename, tuple(attributes))
            self._mappings[key] = index
        return index
