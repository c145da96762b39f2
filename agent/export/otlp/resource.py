"""Export stage, OTLP sink: the OTLP `Resource` of each profiled process.

One `ResourceProfiles` is sent per process. Its resource holds the host attributes (`host.name`,
`host.arch`, `os.type`), the process attributes (`process.pid`, `process.executable.name`,
`process.executable.path`), `service.name`, and any extra attributes the caller supplies per pid (the
hook through which the metadata stage will add `container.id`). Resource attributes use plain
`key` + `string_value`/`int_value`: receivers do not resolve string-table references there.
"""

from __future__ import annotations

import platform
import posixpath
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from agent.export.otlp.dictionary import AttrValue, any_value
from agent.symbolize.types import ProcessInfo

# platform.machine() -> semantic-conventions `host.arch` well-known values.
_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "x86",
    "i686": "x86",
    "armv7l": "arm32",
    "armv6l": "arm32",
    "ppc64le": "ppc64",
    "ppc64": "ppc64",
    "s390x": "s390x",
}
UNKNOWN_SERVICE = "unknown_service"


@dataclass(frozen=True, slots=True)
class ResourceOptions:
    host_name: str
    host_arch: str
    os_type: str = "linux"
    service_name: str = ""  # "" = per process: the executable name, else the comm

    @classmethod
    def detect(cls, service_name: str = "") -> ResourceOptions:
        """The running host's attributes."""
        machine = platform.machine()
        return cls(
            host_name=socket.gethostname(),
            host_arch=_ARCH.get(machine, machine.lower()),
            os_type=platform.system().lower() or "linux",
            service_name=service_name,
        )


def service_name(options: ResourceOptions, process: ProcessInfo) -> str:
    if options.service_name:
        return options.service_name
    return posixpath.basename(process.exe_path) or process.comm or UNKNOWN_SERVICE


def process_resource(
    options: ResourceOptions, process: ProcessInfo, extra: Mapping[str, AttrValue] | None = None
) -> Resource:
    """The resource of one process; `extra` (e.g. `container.id`) overrides nothing it collides with."""
    attrs: dict[str, AttrValue] = {
        "service.name": service_name(options, process),
        "process.pid": process.pid,
    }
    # Kernel threads and vanished processes have no executable; omit rather than send "".
    if process.exe_path:
        attrs["process.executable.name"] = posixpath.basename(process.exe_path)
        attrs["process.executable.path"] = process.exe_path
    for key, value in (extra or {}).items():
        attrs.setdefault(key, value)
    attrs["host.name"] = options.host_name
    attrs["host.arch"] = options.host_arch
    attrs["os.type"] = options.os_type
    return Resource(attributes=[KeyValue(key=k, value=any_value(v)) for k, v in attrs.items() if v != ""])
