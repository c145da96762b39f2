"""Tests for the metadata stage's host attributes (`agent.metadata.host`)."""

from __future__ import annotations

import platform
import socket

import pytest

from agent.metadata.host import HostAttributes, host_arch


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "amd64"), ("aarch64", "arm64"), ("i686", "x86"), ("armv7l", "arm32"), ("ppc64le", "ppc64"),
     ("riscv64", "riscv64"), ("X86_64", "amd64")],
)  # fmt: skip
def test_host_arch_uses_the_semantic_convention_values(machine: str, arch: str) -> None:
    assert host_arch(machine) == arch


def test_detect_reads_this_host_and_takes_the_node_name_as_given() -> None:
    attrs = HostAttributes.detect(node_name="node-a\n")
    assert attrs.host_name == socket.gethostname()
    assert attrs.host_arch == host_arch(platform.machine())
    assert attrs.os_type == "linux"
    assert attrs.k8s_node_name == "node-a"


def test_attributes_use_semantic_convention_keys() -> None:
    attrs = HostAttributes(host_name="h1", host_arch="arm64", k8s_node_name="n1")
    assert attrs.as_attributes() == {"host.name": "h1", "host.arch": "arm64", "os.type": "linux", "k8s.node.name": "n1"}


def test_outside_kubernetes_the_node_name_is_left_out() -> None:
    assert "k8s.node.name" not in HostAttributes.detect().as_attributes()
