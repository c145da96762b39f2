"""Records produced by the symbolize stage and consumed by the pprof builder and the exporters.

A `Profile` is an `IntervalProfile` whose stacks have been turned into named frames with their
mappings, and whose timestamps are Unix nanoseconds. It is the one model every output format is
built from.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.types import ProfileSpec

KERNEL_MAPPING_NAME = "[kernel.kallsyms]"


class FrameKind(enum.StrEnum):
    KERNEL = "kernel"
    NATIVE = "native"
    MARKER = "marker"  # stands for a stack that could not be captured (see `marker_name`)
    # A CPython function; the value is OTLP's `profile.frame.type` for it (semantic conventions).
    PYTHON = "cpython"
    # A Java method HotSpot interpreted (`agent.symbolize.java_merge`); OTLP's frame type for it.
    JVM = "jvm"


@dataclass(frozen=True, slots=True)
class MappingInfo:
    """A file mapping as /proc/PID/maps showed it (runtime addresses), or the kernel pseudo-mapping.

    Its hash is computed once: mappings key the dedup tables of every output format, and a frame's hash
    includes its mapping's.
    """

    path: str  # path inside the process's mount namespace, or KERNEL_MAPPING_NAME
    start: int
    limit: int
    file_offset: int
    build_id: str = ""  # lowercase hex of the GNU build id; "" when unknown
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.path, self.start, self.limit, self.file_offset, self.build_id)))

    def __hash__(self) -> int:
        return self._hash


class PythonSource(NamedTuple):
    """Where a Python (or Java) frame's code lives: what a pprof Function and Line carry besides the
    qualname (Java: `Class.method`)."""

    system_name: str  # co_name; Java: the method's name and descriptor, e.g. main([Ljava/lang/String;)V
    filename: str  # co_filename; Java: the class's source file, e.g. Lines.java
    start_line: int  # co_firstlineno; Java: the method's first line in its line number table
    line: int  # the line the frame was executing; 0 when the line table did not say


class Frame(NamedTuple):
    """One stack frame (a NamedTuple: symbolization builds millions, and tuples are ~5x cheaper to make).

    `address` follows pprof's convention: the leaf's sampled PC as is, every caller's return address
    minus one so it lands inside the call instruction. `function` is "" when the frame could not be
    named; it then keeps its mapping and address so a server can symbolize it later.

    A Python frame (`FrameKind.PYTHON`) has address 0 (it has no instruction in any mapping), the
    qualname as `function`, the interpreter's mapping (the ELF holding the eval loop it replaced) and
    its `source`; every other frame has no `source`.
    """

    kind: FrameKind
    address: int
    function: str
    mapping: MappingInfo | None
    source: PythonSource | None = None


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What the profiles say about one process; the metadata fields are "" when unknown or not applicable."""

    pid: int
    comm: str  # the process's (main thread's) comm
    exe_path: str  # /proc/PID/exe target; "" when unknown (kernel threads, vanished processes)
    container_id: str = ""  # from /proc/PID/cgroup (agent.metadata), docker/containerd/CRI-O/podman
    pod_uid: str = ""  # Kubernetes pod UID, from a kubepods cgroup path
    systemd_unit: str = ""  # the .service/.scope the process runs in
    runtime_name: str = ""  # `process.runtime.name`: "cpython" for a Python process whose frames are walked
    runtime_version: str = ""  # `process.runtime.version`, e.g. "3.12.1"


@dataclass(frozen=True, slots=True)
class Sample:
    pid: int
    tid: int
    cpu: int
    thread_name: str
    frames: tuple[Frame, ...]  # leaf first: kernel frames, then user frames
    values: tuple[int, ...]  # aligned with ProfileSpec.sample_types
    timestamps_unix_ns: tuple[int, ...]
    # The process as it was when this sample ran, when an exec has replaced its image since (its comm
    # and exe were another program's); None: the process is `Profile.processes[pid]`.
    process: ProcessInfo | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    spec: ProfileSpec
    start_unix_ns: int
    duration_ns: int
    samples: tuple[Sample, ...]
    processes: Mapping[int, ProcessInfo]  # one per pid that appears in `samples`

    def process_of(self, sample: Sample) -> ProcessInfo | None:
        """What the profile says about the process that took `sample`: the image it ran in."""
        return sample.process if sample.process is not None else self.processes.get(sample.pid)
