"""Metadata stage: the attributes of the host every profile comes from.

This module owns `HostAttributes`: `host.name`, `host.arch` and `os.type` (OpenTelemetry semantic
conventions), and `k8s.node.name` when the agent runs in Kubernetes. The node name is handed in by the
caller: the config loader (`agent.config`) reads it from the environment (the DaemonSet sets it from the downward API),
since nothing outside `agent/config.py` reads `os.environ`. The `metadata` configuration section
(`MetadataConfig`) is declared here.
"""

from __future__ import annotations

import platform
import socket
from dataclasses import dataclass
from typing import ClassVar

from agent.settings import parse_str, setting


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    SECTION: ClassVar[str] = "metadata"

    node_name: str = setting(
        "",
        parse_str,
        "Kubernetes node name (k8s.node.name); the DaemonSet sets it from the downward API.",
        env_name="PROFILING_AGENT_NODE_NAME",
    )


# platform.machine() -> the semantic conventions' well-known `host.arch` values.
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


def host_arch(machine: str) -> str:
    """The `host.arch` value for a `uname -m` machine name; unknown names pass through in lower case."""
    return _ARCH.get(machine.lower(), machine.lower())


@dataclass(frozen=True, slots=True)
class HostAttributes:
    host_name: str
    host_arch: str
    os_type: str = "linux"
    k8s_node_name: str = ""

    @classmethod
    def detect(cls, node_name: str = "") -> HostAttributes:
        """The running host's attributes; `node_name` is the Kubernetes node ("" outside Kubernetes)."""
        return cls(
            host_name=socket.gethostname(),
            host_arch=host_arch(platform.machine()),
            os_type=platform.system().lower() or "linux",
            k8s_node_name=node_name.strip(),
        )

    def as_attributes(self) -> dict[str, str]:
        """Semantic-convention keys and values; empty values are left out rather than sent as ""."""
        attributes = {
            "host.name": self.host_name,
            "host.arch": self.host_arch,
            "os.type": self.os_type,
            "k8s.node.name": self.k8s_node_name,
        }
        return {key: value for key, value in attributes.items() if value}
