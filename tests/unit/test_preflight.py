"""Tests for the host readiness checks (`agent.preflight`) over fake /lib/modules and /proc trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import preflight
from agent.features import KernelFeatures, task_regs_unavailable
from agent.preflight import Check, Report, check_kernel_headers, check_privileges

RELEASE = "6.12.9-test-amd64"
KHEADERS = Path("/sys/kernel/kheaders.tar.xz")


@pytest.fixture(autouse=True)
def _no_host_header_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the host's BCC_KERNEL_SOURCE and built-in kheaders, which the header check also looks at."""
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    real_exists = Path.exists

    def exists(self: Path, *args: object, **kwargs: object) -> bool:
        return False if self == KHEADERS else real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)


def headers_tree(root: Path, name: str, *, generated: bool = True, sources: bool = True) -> Path:
    """A linux-headers tree under root/usr/src: generated config, Makefile and (optionally) include/linux."""
    tree = root / "usr" / "src" / name
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text("# kernel makefile\n")
    if generated:
        (tree / "include" / "generated").mkdir(parents=True)
        (tree / "include" / "generated" / "autoconf.h").write_text("#define CONFIG_BPF 1\n")
    if sources:
        (tree / "include" / "linux").mkdir(parents=True)
    return tree


def link_build(modules: Path, release: str, target: Path, link: str = "build") -> None:
    (modules / release).mkdir(parents=True, exist_ok=True)
    (modules / release / link).symlink_to(target)


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    path = tmp_path / "lib" / "modules"
    path.mkdir(parents=True)
    return path


# Kernel headers


def test_no_headers_fails_with_a_fix_naming_make_setup(modules: Path) -> None:
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is False
    assert check.fatal is True
    assert check.detail == f"no headers for kernel {RELEASE} at {modules / RELEASE / 'build'}"
    assert "make setup" in check.fix
    assert f"linux-headers-{RELEASE}" in check.fix


def test_a_dangling_build_link_is_no_headers(modules: Path, tmp_path: Path) -> None:
    link_build(modules, RELEASE, tmp_path / "usr" / "src" / "gone")
    assert check_kernel_headers(RELEASE, modules=modules).ok is False


def test_builtin_kheaders_are_used_when_nothing_is_installed(modules: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: self == KHEADERS or real_exists(self))
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is True
    assert "kheaders" in check.detail


def test_matching_headers_are_ok(modules: Path, tmp_path: Path) -> None:
    tree = headers_tree(tmp_path, f"linux-headers-{RELEASE}")
    link_build(modules, RELEASE, tree)
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is True
    assert check.detail == str(tree.resolve())


def test_a_real_build_directory_is_the_kernels_own_headers(modules: Path) -> None:
    # Arch and self-built kernels ship /lib/modules/<release>/build as a directory, not a link.
    build = modules / RELEASE / "build"
    (build / "include" / "generated").mkdir(parents=True)
    (build / "include" / "generated" / "autoconf.h").write_text("")
    (build / "include" / "linux").mkdir()
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is True
    assert check.detail == str(build.resolve())
    assert "closest" not in check.detail


def test_closest_version_fallback_is_ok_and_says_which(modules: Path, tmp_path: Path) -> None:
    tree = headers_tree(tmp_path, "linux-headers-6.1.0-18-amd64")
    link_build(modules, RELEASE, tree)
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is True
    assert f"kernel {RELEASE} has no headers of its own" in check.detail
    assert "using linux-headers-6.1.0-18-amd64 (closest installed)" in check.detail


def test_debian_split_without_the_source_link_fails_naming_common(modules: Path, tmp_path: Path) -> None:
    arch_tree = headers_tree(tmp_path, f"linux-headers-{RELEASE}", sources=False)
    link_build(modules, RELEASE, arch_tree)
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is False
    assert check.fatal is True
    assert "Debian splits them into -<arch> and -common" in check.detail
    assert "linux-headers-*-common" in check.fix
    assert str(modules / RELEASE / "source") in check.fix


def test_debian_split_with_the_source_link_is_ok(modules: Path, tmp_path: Path) -> None:
    arch_tree = headers_tree(tmp_path, f"linux-headers-{RELEASE}", sources=False)
    common_tree = headers_tree(tmp_path, "linux-headers-6.12.9-test-common", generated=False)
    link_build(modules, RELEASE, arch_tree)
    link_build(modules, RELEASE, common_tree, link="source")
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is True
    assert check.detail == str(arch_tree.resolve())


def test_bcc_kernel_source_is_flagged(modules: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/usr/src/linux")
    link_build(modules, RELEASE, headers_tree(tmp_path, f"linux-headers-{RELEASE}"))
    check = check_kernel_headers(RELEASE, modules=modules)
    assert check.ok is True
    assert "BCC_KERNEL_SOURCE is set" in check.detail


# Report


def test_report_ok_ignores_failed_non_fatal_checks() -> None:
    assert Report((Check("a", True, "fine"), Check("b", False, "degraded", fatal=False))).ok is True
    assert Report((Check("a", True, "fine"), Check("c", False, "broken", "fix it"))).ok is False
    assert Report(()).ok is True


def test_render_marks_each_check_and_gives_fixes_of_failures_only() -> None:
    report = Report(
        (
            Check("privileges", True, "euid 0", "never shown"),
            Check("hardware PMU", False, "no cpu-cycles", "use cpu-clock", fatal=False),
            Check("tracefs", False, "not mounted", "mount -t tracefs nodev /sys/kernel/tracing"),
        )
    )
    assert report.render().splitlines() == [
        "[ok  ] privileges: euid 0",
        "[note] hardware PMU: no cpu-cycles",
        "       -> use cpu-clock",
        "[FAIL] tracefs: not mounted",
        "       -> mount -t tracefs nodev /sys/kernel/tracing",
        "not ready: fix the FAIL lines above",
    ]


def test_render_of_a_ready_host() -> None:
    report = Report((Check("BTF", False, "absent", fatal=False), Check("BCC", True, "importable")))
    assert report.render().splitlines() == ["[note] BTF: absent", "[ok  ] BCC: importable", "ready: the agent can run"]


# Privileges


def fake_proc(tmp_path: Path, status: str) -> Path:
    root = tmp_path / "proc"
    (root / "self").mkdir(parents=True)
    (root / "self" / "status").write_text(status)
    return root


def status_with_caps(cap_eff: str) -> str:
    return f"Name:\tprofiling-agent\nUid:\t1000\t1000\t1000\t1000\nCapPrm:\t{cap_eff}\nCapEff:\t{cap_eff}\n"


@pytest.mark.parametrize(
    ("cap_eff", "caps"),
    [
        ("0000000000000000", 0),
        ("000001ffffffffff", (1 << 41) - 1),
        ("0000000000200000", 1 << 21),  # CAP_SYS_ADMIN
        ("000000c000000000", (1 << 38) | (1 << 39)),  # CAP_PERFMON + CAP_BPF
    ],
)
def test_effective_caps_parses_cap_eff(tmp_path: Path, cap_eff: str, caps: int) -> None:
    assert preflight._effective_caps(fake_proc(tmp_path, status_with_caps(cap_eff))) == caps


def test_effective_caps_without_cap_eff_is_zero(tmp_path: Path) -> None:
    assert preflight._effective_caps(fake_proc(tmp_path, "Name:\tx\nCapPrm:\tffffffffff\n")) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="as root the check passes whatever the capabilities")
def test_root_passes_whatever_the_capabilities(tmp_path: Path) -> None:
    check = check_privileges(proc_root=fake_proc(tmp_path, status_with_caps("0000000000000000")))
    assert check.ok is True
    assert check.detail == "euid 0, capabilities none"


@pytest.mark.parametrize(
    ("cap_eff", "ok", "named"),
    [
        ("0000000000000000", False, ""),
        ("0000000000200000", True, "CAP_SYS_ADMIN"),
        ("000000c000000000", True, "CAP_BPF, CAP_PERFMON"),
        ("0000004000000000", False, ""),  # CAP_PERFMON alone is not enough
        ("0000008000000000", False, ""),  # nor CAP_BPF alone
    ],
)
def test_non_root_needs_sys_admin_or_bpf_and_perfmon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap_eff: str, ok: bool, named: str
) -> None:
    # Pretend not to be root (tests run as root here) so the capability logic is what decides.
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    check = check_privileges(proc_root=fake_proc(tmp_path, status_with_caps(cap_eff)))
    assert check.ok is ok
    if ok:
        assert check.detail == f"euid 1000, capabilities {named}"
    else:
        assert check.detail == "running as uid 1000 without CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN"
        assert "CAP_BPF, CAP_PERFMON" in check.fix


# _guard


def test_guard_turns_an_os_error_into_a_failed_check() -> None:
    def probe() -> Check:
        raise FileNotFoundError(2, "No such file or directory", "/proc/sys/kernel/perf_event_paranoid")

    (check,) = preflight._guard("perf events", probe, True)
    assert check.name == "perf events"
    assert check.ok is False
    assert check.fatal is True
    assert check.detail.startswith("cannot be checked: ")
    assert "perf_event_paranoid" in check.detail


def test_guard_keeps_the_checks_fatality() -> None:
    def probe() -> Check:
        raise OSError(5, "Input/output error")

    (check,) = preflight._guard("BTF", probe, False)
    assert (check.ok, check.fatal) == (False, False)
    assert Report((check,)).ok is True


def test_guard_reports_an_unreadable_file_with_a_fix() -> None:
    def probe() -> Check:
        raise PermissionError(13, "Permission denied", "/proc/self/status")

    (check,) = preflight._guard("privileges", probe, True)
    assert check.ok is False
    assert "/proc/self/status is not readable" in check.detail
    assert check.fix == "run as root"


def test_guard_passes_results_through() -> None:
    single = Check("tracefs", True, "mounted")
    several = [Check("perf events", True, "ok"), Check("hardware PMU", False, "none", fatal=False)]
    assert preflight._guard("tracefs", lambda: single, True) == [single]
    assert preflight._guard("perf events", lambda: several, True) == several


def test_guard_does_not_hide_programming_errors() -> None:
    def probe() -> Check:
        raise TypeError("bug")

    with pytest.raises(TypeError):
        preflight._guard("BCC", probe, True)


def test_task_regs_need_kernel_5_15_and_btf(tmp_path: Path) -> None:
    """DWARF unwinding for perf-event/tracepoint programs is reported unavailable, with the reason."""
    btf = tmp_path / "vmlinux"
    assert "older than 5.15" in task_regs_unavailable("5.10.0-28-amd64", btf)
    assert "absent" in task_regs_unavailable("6.1.0-18-amd64", btf)
    btf.write_bytes(b"")
    assert task_regs_unavailable("6.1.0-18-amd64", btf) == ""
    assert task_regs_unavailable("5.15.0", btf) == ""
    assert "older" in task_regs_unavailable("weird", btf)


def test_python_frames_line(monkeypatch: pytest.MonkeyPatch) -> None:
    found = KernelFeatures(False, False, None, "", task_fsbase_offset=0xC38, task_fsbase_unavailable="")
    monkeypatch.setattr(preflight, "kernel_features", lambda: found)
    check = preflight.check_python_frames()
    assert check.ok and not check.fatal
    assert "fsbase at 0xc38" in check.detail and "3.10-3.13 through the TSS slot" in check.detail
    missing = KernelFeatures(False, False, None, "", task_fsbase_unavailable="task_struct.thread.fsbase not found")
    monkeypatch.setattr(preflight, "kernel_features", lambda: missing)
    check = preflight.check_python_frames()
    assert (check.ok, check.fatal) == (False, False)
    assert "task_struct.thread.fsbase not found" in check.detail
