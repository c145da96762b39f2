"""Tests for the metadata stage's process filters (`agent.metadata.filters`)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.metadata.filters import ProcessFilter
from agent.metadata.process import ProcessLabels

NGINX = ProcessLabels(
    pid=10,
    comm="nginx",
    exe_path="/usr/sbin/nginx",
    systemd_unit="nginx.service",
    cgroup_path="/system.slice/nginx.service",
)
PYTHON_IN_POD = ProcessLabels(
    pid=20,
    comm="python3",
    exe_path="/usr/local/bin/python3.12",
    container_id="9" * 64,
    cgroup_path="/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice/cri-containerd-x.scope",
)
KTHREAD = ProcessLabels(pid=2, comm="kthreadd", cgroup_path="/")


def test_no_pattern_selects_everything() -> None:
    process_filter = ProcessFilter()
    assert process_filter.selects_all
    assert all(process_filter.matches(p) for p in (NGINX, PYTHON_IN_POD, KTHREAD))


@pytest.mark.parametrize(
    ("kwargs", "selected"),
    [
        ({"include_exe": ("nginx",)}, {10}),
        ({"include_exe": ("/usr/local/bin/*",)}, {20}),
        ({"include_exe": ("python3*",)}, {20}),
        ({"include_comm": ("k*",)}, {2}),
        ({"include_unit": ("*.service",)}, {10}),
        ({"include_cgroup": ("/kubepods*",)}, {20}),
        ({"include_exe": ("nginx",), "include_comm": ("kthreadd",)}, {10, 2}),
        ({"exclude_comm": ("kthreadd",)}, {10, 20}),
        ({"exclude_cgroup": ("/system.slice/*",)}, {20, 2}),
        ({"exclude_unit": ("*",)}, {20, 2}),
        ({"include_exe": ("*",)}, {10, 20}),
    ],
    ids=[
        "exe name",
        "exe path glob",
        "exe name glob",
        "comm",
        "unit",
        "cgroup",
        "includes of different kinds are a union",
        "exclude comm",
        "exclude cgroup",
        "empty unit matches no pattern",
        "kernel thread has no executable to match",
    ],
)
def test_patterns_select_processes(kwargs: dict[str, Any], selected: set[int]) -> None:
    process_filter = ProcessFilter(**kwargs)
    assert not process_filter.selects_all
    assert {p.pid for p in (NGINX, PYTHON_IN_POD, KTHREAD) if process_filter.matches(p)} == selected


def test_exclude_wins_over_include() -> None:
    process_filter = ProcessFilter(include_unit=("nginx.service",), exclude_exe=("*/nginx",))
    assert not process_filter.matches(NGINX)


def test_explicit_cgroup_path_overrides_the_labels() -> None:
    process_filter = ProcessFilter(exclude_cgroup=("/machine.slice/*",))
    assert process_filter.matches(NGINX)
    assert not process_filter.matches(NGINX, "/machine.slice/libpod-x.scope")


def test_matching_is_case_sensitive() -> None:
    assert not ProcessFilter(include_comm=("NGINX",)).matches(NGINX)


def test_glob_metacharacters_in_brackets() -> None:
    process_filter = ProcessFilter(include_exe=("python3.1[0-2]",))
    assert process_filter.matches(PYTHON_IN_POD)
    assert not process_filter.matches(ProcessLabels(pid=1, exe_path="/usr/bin/python3.9"))


@pytest.mark.parametrize("bad", ["nginx", ("",), (1,), ["nginx"]], ids=["bare string", "empty glob", "int", "list"])
def test_patterns_must_be_tuples_of_globs(bad: Any) -> None:
    with pytest.raises(ValueError, match="include_exe"):
        ProcessFilter(include_exe=bad)


def test_filters_compare_and_hash_by_their_patterns() -> None:
    assert ProcessFilter(include_exe=("a",)) == ProcessFilter(include_exe=("a",))
    assert hash(ProcessFilter(include_exe=("a",))) == hash(ProcessFilter(include_exe=("a",)))
    assert ProcessFilter(include_exe=("a",)) != ProcessFilter(exclude_exe=("a",))
