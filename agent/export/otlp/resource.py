"""Export stage, OTLP sink: the OTLP `Resource` of each profiled process.

One `ResourceProfiles` is sent per process (per image of one, across an exec). Its resource holds,
in this order of precedence:

- the process attributes: `service.name`, `process.pid`, `process.executable.name` and
  `process.executable.path`;
- the process metadata the process registry (`agent.process.registry`) captured with it (`ProcessInfo`): `container.id`,
  `k8s.pod.uid` (both semantic conventions) and `systemd.unit`. The semantic conventions have no
  systemd attribute; `systemd.unit` follows their naming rules (a lowercase namespace, a dot, the
  property) and systemd's own word for it (journald's `_SYSTEMD_UNIT` field), and is kept in the one
  constant `SYSTEMD_UNIT` so it can follow a convention if one is ever defined;
- for a Python process whose frames are named, `process.runtime.name` ("cpython") and
  `process.runtime.version` (semantic conventions), which the symbolize stage puts in `ProcessInfo`;
- any extra attributes the caller supplies per pid (the sink's `resource_hook`), which never override
  the keys above;
- the host attributes (`agent.metadata.host.HostAttributes`): `host.name`, `host.arch`, `os.type`, and
  `k8s.node.name` when the agent runs in Kubernetes.

Empty values are left out rather than sent as "". Resource attributes use plain `key` +
`string_value`/`int_value`: receivers do not resolve string-table references there.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from agent.export.otlp.dictionary import AttrValue, any_value
from agent.metadata.host import HostAttributes
from agent.symbolize.types import ProcessInfo

UNKNOWN_SERVICE = "unknown_service"
CONTAINER_ID = "container.id"
K8S_POD_UID = "k8s.pod.uid"
SYSTEMD_UNIT = "systemd.unit"  # no semantic convention exists: see the module docstring
RUNTIME_NAME = "process.runtime.name"
RUNTIME_VERSION = "process.runtime.version"


@dataclass(frozen=True, slots=True)
class ResourceOptions:
    host_name: str
    host_arch: str
    os_type: str = "linux"
    service_name: str = ""  # "" = per process: the executable name, else the comm
    node_name: str = ""  # `k8s.node.name`; "" outside Kubernetes

    @classmethod
    def detect(cls, service_name: str = "", node_name: str = "") -> ResourceOptions:
        """The running host's attributes; `node_name` is the Kubernetes node ("" outside Kubernetes)."""
        return cls.from_host(HostAttributes.detect(node_name), service_name)

    @classmethod
    def from_host(cls, host: HostAttributes, service_name: str = "") -> ResourceOptions:
        return cls(
            host_name=host.host_name,
            host_arch=host.host_arch,
            os_type=host.os_type,
            service_name=service_name,
            node_name=host.k8s_node_name,
        )

    @property
    def host(self) -> HostAttributes:
        return HostAttributes(self.host_name, self.host_arch, self.os_type, self.node_name)


def service_name(options: ResourceOptions, process: ProcessInfo) -> str:
    if options.service_name:
        return options.service_name
    return posixpath.basename(process.exe_path) or process.comm or UNKNOWN_SERVICE


def process_resource(
    options: ResourceOptions, process: ProcessInfo, extra: Mapping[str, AttrValue] | None = None
) -> Resource:
    """The resource of one process; `extra` (the resource hook's attributes) overrides nothing it collides with."""
    attrs: dict[str, AttrValue] = {
        "service.name": service_name(options, process),
        "process.pid": process.pid,
    }
    # Kernel threads and vanished processes have no executable; omit rather than send "".
    if process.exe_path:
        attrs["process.executable.name"] = posixpath.basename(process.exe_path)
        attrs["process.executable.path"] = process.exe_path
    attrs[CONTAINER_ID] = process.container_id
    attrs[K8S_POD_UID] = process.pod_uid
    attrs[SYSTEMD_UNIT] = process.systemd_unit
    attrs[RUNTIME_NAME] = process.runtime_name
    attrs[RUNTIME_VERSION] = process.runtime_version
    for key, value in (extra or {}).items():
        if attrs.get(key, "") == "":  # an empty metadata value leaves the key to the hook
            attrs[key] = value
    attrs.update(options.host.as_attributes())
    return Resource(attributes=[KeyValue(key=k, value=any_value(v)) for k, v in attrs.items() if v != ""])
