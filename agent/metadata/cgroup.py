"""Metadata stage: what a process's cgroup path says about it (container, Kubernetes pod, systemd unit).

This module owns `CgroupInfo` and `parse_cgroup`, a pure parser of the text of /proc/PID/cgroup. Each
line is `hierarchy-id:controllers:path`; cgroup v2 has the single line `0::/path`, cgroup v1 one line per
hierarchy (systemd's own is `N:name=systemd:/path`), and hybrid hosts have both. The layouts recognised,
by the path component that names the container:

- docker: `/docker/<id>` (cgroupfs driver) and `docker-<id>.scope` (systemd driver);
- containerd / CRI: `cri-containerd-<id>.scope` (systemd driver), `/kubepods/<qos>/pod<uid>/<id>` (cgroupfs);
- CRI-O: `crio-<id>.scope` (`crio-<id>` with the cgroupfs manager); `crio-conmon-<id>.scope` is the
  container's monitor, not the container;
- podman: `libpod-<id>.scope`, rootful or rootless (under `user@UID.service`); `libpod-conmon-<id>.scope`
  is the monitor.

Container ids are 64 hex digits. The pod UID comes from `kubepods-<qos>-pod<uid>.slice` (systemd driver,
dashes written as underscores) or `/kubepods/<qos>/pod<uid>` (cgroupfs). The systemd unit is the last
`.service`/`.scope` component that is not a container's own scope (a systemd --user manager, which runs
in `user@UID.service/init.scope`, is reported as `user@UID.service`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Container scopes name a container, not a unit an operator wrote: they never count as the systemd unit.
# CRI-O's cgroupfs manager names the directory without the `.scope` suffix: `crio-<id>`.
_SCOPE = re.compile(r"^(docker|cri-containerd|crio|libpod)-(conmon-)?([0-9a-f]{64})(?:\.scope)?$")
_BARE_ID = re.compile(r"^[0-9a-f]{64}$")
_RUNTIME_BY_PREFIX = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}
# kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice; guaranteed pods have no QoS
# level: kubepods.slice/kubepods-pod<uid>.slice. The UID's dashes are underscores in systemd slice names.
_POD_SLICE = re.compile(r"^kubepods(?:-(besteffort|burstable))?-pod([0-9a-f_]{36})\.slice$")
_POD_DIR = re.compile(r"^pod([0-9a-f-]{36})$")
_QOS_CLASSES = ("besteffort", "burstable")
_UNIT_SUFFIXES = (".service", ".scope")
# The systemd --user manager itself runs in user@UID.service/init.scope: name the manager's unit.
_USER_MANAGER = re.compile(r"^user@\d+\.service$")


@dataclass(frozen=True, slots=True)
class CgroupInfo:
    """What /proc/PID/cgroup says; empty strings when a layout does not say it."""

    path: str = ""  # the v1 name=systemd path, else the v2 path, else the first v1 path
    container_id: str = ""
    runtime: str = ""  # docker, containerd, cri-o, podman; "" when only a bare id says it is a container
    pod_uid: str = ""
    qos_class: str = ""  # guaranteed, burstable or besteffort, for Kubernetes pods
    systemd_unit: str = ""


@dataclass(frozen=True, slots=True)
class _Line:
    hierarchy: str
    controllers: str
    path: str


def _parse_lines(text: str) -> list[_Line]:
    lines = []
    for raw in text.splitlines():
        # The path may itself contain ':', so split only the first two.
        parts = raw.split(":", 2)
        if len(parts) == 3 and parts[2].startswith("/"):
            lines.append(_Line(*parts))
    return lines


def _systemd_path(lines: list[_Line]) -> str | None:
    """The path systemd tracks the process in: v1's name=systemd, else the unified (v2) hierarchy.

    On hybrid hosts name=systemd comes first: docker's cgroupfs driver moves a container in every v1
    hierarchy but leaves the unified one where the shim was (`/system.slice/containerd.service`).
    None when there is neither (a v1 host without systemd).
    """
    for line in lines:
        if "name=systemd" in line.controllers.split(","):
            return line.path
    for line in lines:
        if line.hierarchy == "0" and line.controllers == "":
            return line.path
    return None


def _container(components: list[str]) -> tuple[str, str]:
    """(container id, runtime) from the innermost component that names a container."""
    for index in range(len(components) - 1, -1, -1):
        component = components[index]
        scope = _SCOPE.match(component)
        if scope is not None:
            if scope.group(2):  # conmon: the monitor process of a container, outside the container
                continue
            return scope.group(3), _RUNTIME_BY_PREFIX[scope.group(1)]
        if _BARE_ID.match(component):
            parent = components[index - 1] if index > 0 else ""
            return component, "docker" if parent == "docker" else ""
    return "", ""


def _pod(components: list[str]) -> tuple[str, str]:
    """(pod UID, QoS class) from a kubepods path of either cgroup driver."""
    if not any(c == "kubepods" or c.startswith("kubepods.") for c in components):
        return "", ""
    for index, component in enumerate(components):
        pod_slice = _POD_SLICE.match(component)
        if pod_slice is not None:
            return pod_slice.group(2).replace("_", "-"), pod_slice.group(1) or "guaranteed"
        pod_dir = _POD_DIR.match(component)
        if pod_dir is not None:
            parent = components[index - 1] if index > 0 else ""
            return pod_dir.group(1), parent if parent in _QOS_CLASSES else "guaranteed"
    return "", ""


def _systemd_unit(components: list[str]) -> str:
    units = [c for c in components if c.endswith(_UNIT_SUFFIXES) and _SCOPE.match(c) is None]
    if not units:
        return ""
    if units[-1] == "init.scope" and len(units) > 1 and _USER_MANAGER.match(units[-2]):
        return units[-2]
    return units[-1]


def parse_cgroup(text: str) -> CgroupInfo:
    """Parse the text of /proc/PID/cgroup (v1, v2 or hybrid); unknown layouts give empty fields."""
    lines = _parse_lines(text)
    systemd_path = _systemd_path(lines)
    # Without systemd's hierarchy (v1 hosts without systemd) no unit can be named; the path still can.
    path = systemd_path if systemd_path is not None else (lines[0].path if lines else "")
    container_id = runtime = pod_uid = qos_class = ""
    # A v1 host may place the container in some hierarchies only; look at every line, the main one first.
    ordered = sorted(lines, key=lambda line: line.path != path)
    for line in ordered:
        components = [c for c in line.path.split("/") if c]
        if not container_id:
            container_id, runtime = _container(components)
        if not pod_uid:
            pod_uid, qos_class = _pod(components)
    unit = _systemd_unit([c for c in systemd_path.split("/") if c]) if systemd_path is not None else ""
    return CgroupInfo(path, container_id, runtime, pod_uid, qos_class, unit)
