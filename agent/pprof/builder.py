"""pprof stage: turns one symbolized `Profile` into a serialized `perftools.profiles.Profile`.

The builder is pure: no I/O, no clocks, no globals, and the same input gives the same bytes. It owns
the dedup tables (strings, functions, mappings, locations) whose ids start at 1 because 0 means
"none" in pprof. Addresses follow pprof's runtime convention: locations carry the runtime address (a
caller's return address minus one, so it lands in the call instruction) and mappings the
/proc/PID/maps range and offset, exactly as the symbolize stage recorded them (`go tool pprof` derives
each symbol address from those three together). The output is uncompressed; sinks compress it.

Python frames (`FrameKind.PYTHON`) get a Function each (name = qualname, system_name = co_name when
it differs from the qualname, filename = co_filename, start_line = co_firstlineno; one per distinct
four) and a Location per (mapping, function, line) whose Line carries the line number. Their mapping
is the interpreter's, the ELF holding the eval loop they ran in, and their address is 0: they have no
instruction in it, and the Line already says everything `go tool pprof` prints (`qualname file.py:line`
with `-lines`).

Sample labels: numeric `pid`, `tid`, `cpu`; string `comm`, `thread_name`, and the process metadata
`container_id`, `pod_uid`, `systemd_unit` and, for a Python process, `process.runtime.name` and
`process.runtime.version` (the semantic conventions' names; from `Profile.processes`), each only when it
is not empty.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from itertools import compress
from operator import not_
from typing import Any, cast

from agent.pprof.strings import StringTable
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
from agent.types import ProfileSpec

try:
    from agent._proto import profile_pb2
except ImportError as exc:  # generated at set-up, never committed
    raise ImportError(
        "agent._proto.profile_pb2 is missing or does not match the installed protobuf runtime: run `make setup` "
        "to generate it from proto/profile.proto"
    ) from exc

logger = logging.getLogger(__name__)

# Kernel frames the symbolize stage left without a mapping still get one, so every kernel location is
# grouped under `[kernel.kallsyms]`. start = limit = offset = 0 is pprof's "fake" mapping: the address
# is taken as is, and the bracketed name keeps `go tool pprof` from looking for a file.
DEFAULT_KERNEL_MAPPING = MappingInfo(path=KERNEL_MAPPING_NAME, start=0, limit=0, file_offset=0)

_LocationKey = tuple[int, int, int, int]  # (mapping id, address, function id, line)
# A Python function's identity: (qualname, co_name, co_filename, co_firstlineno).
_PythonFunctionKey = tuple[str, str, str, int]
_NUMERIC_LABELS = ("pid", "tid", "cpu")
_TEXT_LABELS = (
    "comm",
    "thread_name",
    "container_id",
    "pod_uid",
    "systemd_unit",
    "process.runtime.name",
    "process.runtime.version",
)


def build_pprof(profile: Profile) -> bytes:
    """Serialize `profile` as an uncompressed pprof `Profile` message."""
    builder = ProfileBuilder(profile.spec)
    for mapping in mapping_order(profile):
        builder.add_mapping(mapping)
    for sample in profile.samples:
        process = profile.process_of(sample)  # a sample from before an exec: the image it ran in
        # A process whose comm could not be read is still best named by what its thread was called.
        comm = process.comm if process is not None and process.comm else sample.thread_name
        builder.add_sample(sample, comm, process)
    message = builder.build(profile.start_unix_ns, profile.duration_ns)
    data: bytes = message.SerializeToString(deterministic=True)
    logger.debug(
        "built pprof %s: %d samples, %d locations, %d bytes",
        profile.spec.name,
        len(profile.samples),
        builder.location_count,
        len(data),
    )
    return data


def frame_mapping(frame: Frame) -> MappingInfo | None:
    """The mapping a frame's location points at: none for markers, `[kernel.kallsyms]` for bare kernel frames."""
    if frame.kind is FrameKind.MARKER:
        return None
    if frame.kind is FrameKind.KERNEL and frame.mapping is None:
        return DEFAULT_KERNEL_MAPPING
    return frame.mapping


def mapping_order(profile: Profile) -> list[MappingInfo]:
    """Every distinct mapping in the order pprof wants them listed.

    pprof takes mapping[0] to be the main binary, so the executable of the first process (in sample
    order) whose executable shows up in its own frames comes first; the other user mappings follow in
    first-seen order and kernel mappings come last.
    """
    user: dict[MappingInfo, None] = {}  # dicts as ordered sets
    kernel: dict[MappingInfo, None] = {}
    exe_mapping_by_pid: dict[int, MappingInfo] = {}
    # A frame object seen before in the same process adds nothing: the symbolizer shares one object per
    # (process, address), so most frames are skipped with one set lookup instead of hashing a mapping.
    # Likewise for a mapping object, which the symbolizer shares between frames (all kernel frames, and a
    # process's frames in one mapping).
    seen_by_pid: dict[int, set[int]] = {}
    for sample in profile.samples:
        process = profile.process_of(sample)
        exe_path = process.exe_path if process is not None else ""
        seen = seen_by_pid.setdefault(sample.pid, set())
        ids = [*map(id, sample.frames)]  # the profile keeps every frame alive: ids stay unique
        if seen.issuperset(ids):
            continue
        for frame in compress(sample.frames, map(not_, map(seen.__contains__, ids))):  # new ones, in C
            if id(frame) in seen:
                continue
            seen.add(id(frame))
            mapping = frame_mapping(frame)
            if mapping is None or id(mapping) in seen:
                continue
            seen.add(id(mapping))
            if frame.kind is FrameKind.KERNEL or mapping.path == KERNEL_MAPPING_NAME:
                kernel.setdefault(mapping, None)
                continue
            user.setdefault(mapping, None)
            if exe_path and mapping.path == exe_path:
                exe_mapping_by_pid.setdefault(sample.pid, mapping)
    main = _first_main(profile.samples, exe_mapping_by_pid)
    ordered = [main] if main is not None else []
    ordered.extend(m for m in user if m != main)
    ordered.extend(m for m in kernel if m not in user)
    return ordered


def _first_main(samples: Iterable[Sample], exe_mapping_by_pid: dict[int, MappingInfo]) -> MappingInfo | None:
    for sample in samples:
        found = exe_mapping_by_pid.get(sample.pid)
        if found is not None:
            return found
    return None


class ProfileBuilder:
    """Accumulates samples into one pprof `Profile`, deduplicating strings, functions, mappings and locations.

    Ids are assigned 1, 2, 3, ... in first-use order, so call `add_mapping` first for the mappings
    whose position matters. One builder makes one profile.
    """

    def __init__(self, spec: ProfileSpec) -> None:
        self._spec = spec
        self._strings = StringTable()
        self._message: Any = profile_pb2.Profile()
        self._functions: dict[str | _PythonFunctionKey, int] = {}  # native by name, Python by identity
        self._mappings: dict[MappingInfo, int] = {}
        self._mapping_messages: list[Any] = []
        self._unnamed_mapping_ids: set[int] = set()
        self._locations: dict[_LocationKey, int] = {}
        # Location id by frame object: frames repeat by identity far more than by value, and an id lookup
        # costs no hashing of the frame's mapping. `_frames` keeps the objects alive so ids stay unique.
        self._location_by_frame: dict[int, int] = {}
        self._frames: list[Frame] = []
        self._label_sets: dict[tuple[int | str, ...], Any] = {}
        # Interned first so the value-type names head the string table, which makes dumps easier to read.
        for value_type in spec.sample_types:
            self._message.sample_type.add(type=self._s(value_type.type), unit=self._s(value_type.unit))

    @property
    def location_count(self) -> int:
        return len(self._locations)

    def add_mapping(self, mapping: MappingInfo) -> int:
        """The id of `mapping`, creating its entry the first time this exact tuple is seen."""
        found = self._mappings.get(mapping)
        if found is not None:
            return found
        mapping_id = len(self._mappings) + 1
        self._mappings[mapping] = mapping_id
        self._mapping_messages.append(
            self._message.mapping.add(
                id=mapping_id,
                memory_start=mapping.start,
                memory_limit=mapping.limit,
                file_offset=mapping.file_offset,
                filename=self._s(mapping.path),
                build_id=self._s(mapping.build_id),
            )
        )
        return mapping_id

    def add_sample(self, sample: Sample, comm: str, process: ProcessInfo | None = None) -> None:
        """Add one sample; `comm` is the process's name for the `comm` label, `process` gives the
        metadata labels (`container_id`, `pod_uid`, `systemd_unit`)."""
        if len(sample.values) != len(self._spec.sample_types):
            raise ValueError(
                f"sample of pid {sample.pid} has {len(sample.values)} values but profile {self._spec.name!r} "
                f"has {len(self._spec.sample_types)} sample types"
            )
        location_ids = self._location_ids(sample.frames)  # interns the function names before the labels'
        message = self._message.sample.add(location_id=location_ids, value=sample.values)
        message.MergeFrom(self._labels(sample, comm, process))

    def _labels(self, sample: Sample, comm: str, process: ProcessInfo | None) -> Any:
        """A `Sample` message holding only the labels of `sample`; samples with equal labels share one."""
        metadata = (
            (process.container_id, process.pod_uid, process.systemd_unit, process.runtime_name, process.runtime_version)
            if process is not None
            else ("",) * 5
        )
        key = (sample.pid, sample.tid, sample.cpu, comm, sample.thread_name, *metadata)
        labels = self._label_sets.get(key)
        if labels is None:
            labels = self._label_sets[key] = profile_pb2.Sample()
            # Numeric labels carry no unit: pid, tid and cpu are identifiers, not quantities.
            for name, number in zip(_NUMERIC_LABELS, key[:3], strict=True):
                labels.label.add(key=self._s(name), num=number)
            for name, text in zip(_TEXT_LABELS, key[3:], strict=True):
                # pprof reads str == 0 as "not a string label" and drops it, so don't spend bytes on it.
                if text:
                    labels.label.add(key=self._s(name), str=self._s(text))
        return labels

    def build(self, start_unix_ns: int, duration_ns: int) -> Any:
        """The finished `profile_pb2.Profile` message."""
        message = self._message
        for mapping_message in self._mapping_messages:
            # Claim functions only when every location got a name, so `go tool pprof` still symbolizes
            # mappings that have unnamed frames. Filenames and line numbers are never claimed: native
            # frames have none, and only Python frames (which carry their own) share a mapping with them.
            mapping_message.has_functions = mapping_message.id not in self._unnamed_mapping_ids
        spec = self._spec
        message.period_type.type = self._s(spec.period_type.type)
        message.period_type.unit = self._s(spec.period_type.unit)
        message.period = spec.period
        message.time_nanos = start_unix_ns
        message.duration_nanos = duration_ns
        if spec.sample_types:
            message.default_sample_type = self._s(spec.sample_types[-1].type)
        del message.string_table[:]
        message.string_table.extend(self._strings.strings())
        return message

    def _s(self, value: str) -> int:
        return self._strings.index(value)

    def _function(self, name: str) -> int:
        found = self._functions.get(name)
        if found is not None:
            return found
        function_id = len(self._functions) + 1
        self._functions[name] = function_id
        # Kernel and native symbols have no separate mangled form here and no source file is known.
        index = self._s(name)
        self._message.function.add(id=function_id, name=index, system_name=index)
        return function_id

    def _python_function(self, name: str, source: PythonSource) -> int:
        key = (name, source.system_name, source.filename, source.start_line)
        found = self._functions.get(key)
        if found is not None:
            return found
        function_id = len(self._functions) + 1
        self._functions[key] = function_id
        # A system_name equal to the name is left out: `go tool pprof` takes name == system_name for "not
        # demangled yet", and its C++ heuristic then strips `<module>`, `<lambda>` or `<genexpr>` to "".
        self._message.function.add(
            id=function_id,
            name=self._s(name),
            system_name=self._s(source.system_name if source.system_name != name else ""),
            filename=self._s(source.filename),
            start_line=source.start_line,
        )
        return function_id

    def _location_ids(self, frames: tuple[Frame, ...]) -> list[int]:
        known = [*map(self._location_by_frame.get, map(id, frames))]  # the common case stays in C
        if None not in known:
            return cast(list[int], known)
        return [known_id or self._location_id(frame) for known_id, frame in zip(known, frames, strict=True)]

    def _location_id(self, frame: Frame) -> int:
        location_id = self._location_by_frame.get(id(frame))
        if location_id is None:
            location_id = self._location_by_frame[id(frame)] = self._location(frame)
            self._frames.append(frame)
        return location_id

    def _location(self, frame: Frame) -> int:
        mapping = frame_mapping(frame)
        mapping_id = self.add_mapping(mapping) if mapping is not None else 0
        source = frame.source
        line = source.line if source is not None else 0
        if source is not None:
            function_id = self._python_function(frame.function, source)
        else:
            function_id = self._function(frame.function) if frame.function else 0
        key = (mapping_id, frame.address, function_id, line)
        found = self._locations.get(key)
        if found is not None:
            return found
        location_id = len(self._locations) + 1
        self._locations[key] = location_id
        location = self._message.location.add(id=location_id, mapping_id=mapping_id, address=frame.address)
        if function_id:
            location.line.add(function_id=function_id, line=line)
        elif mapping_id:
            self._unnamed_mapping_ids.add(mapping_id)
        return location_id
