"""Preflight: can this host run the agent, and which kernel features and fallbacks will it use?

Owns the readiness checks made before BPF is touched: privileges, the bpf() syscall, perf events
(hardware PMU or the cpu-clock fallback), perf_event_paranoid, tracefs, kernel headers for BCC (and
the closest-version fallback `make setup` links), BTF, kprobes, and the BCC bindings. The kernel
features themselves are probed by `agent.features`, which the probes read too: this module only
reports them. Each check gives
one line, and one actionable line per problem. `profiling-agent check` prints the report; `run` refuses
to start on a fatal problem and prints the same report instead of a traceback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.features import (
    PERF_COUNT_HW_CPU_CYCLES,
    PERF_COUNT_SW_CPU_CLOCK,
    PERF_TYPE_HARDWARE,
    PERF_TYPE_SOFTWARE,
    kernel_features,
    perf_event_open,
)
from agent.process.python.inspect import MIN_VERSION, describe_walkable

SYS_BPF = {"x86_64": 321, "aarch64": 280}
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
TRACEFS_PATHS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do about it, when not ok
    fatal: bool = True  # a failed non-fatal check only disables a feature or a fallback is used


@dataclass(frozen=True, slots=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok or not check.fatal for check in self.checks)

    def render(self) -> str:
        lines = []
        for check in self.checks:
            mark = "ok  " if check.ok else ("FAIL" if check.fatal else "note")
            lines.append(f"[{mark}] {check.name}: {check.detail}")
            if not check.ok and check.fix:
                lines.append(f"       -> {check.fix}")
        verdict = "ready: the agent can run" if self.ok else "not ready: fix the FAIL lines above"
        return "\n".join([*lines, verdict])


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _effective_caps(proc_root: Path) -> int:
    for line in (proc_root / "self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(proc_root: Path = Path("/proc")) -> Check:
    caps = _effective_caps(proc_root)
    have = {
        name
        for name, bit in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON))
        if caps >> bit & 1
    }
    # BCC loads programs and creates maps the classic way, which needs CAP_SYS_ADMIN on most kernels
    # (or CAP_BPF + CAP_PERFMON on >= 5.8 for the operations used here).
    if os.geteuid() == 0 or "CAP_SYS_ADMIN" in have or {"CAP_BPF", "CAP_PERFMON"} <= have:
        return Check("privileges", True, f"euid {os.geteuid()}, capabilities {', '.join(sorted(have)) or 'none'}")
    return Check(
        "privileges",
        False,
        f"running as uid {os.geteuid()} without CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN",
        "run as root (sudo profiling-agent ...), or grant CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, "
        "CAP_DAC_READ_SEARCH and CAP_SYSLOG (see systemd/profiling-agent.service)",
    )


def check_bpf_syscall() -> Check:
    """Create (and close) a one-entry array map: proves the bpf() syscall exists and is permitted."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        return Check("bpf syscall", False, f"unsupported architecture {platform.machine()}", "use x86_64 or aarch64")
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3] = 2, 4, 4, 1  # BPF_MAP_TYPE_ARRAY, key 4 B, value 4 B, 1 entry
    libc = _libc()
    fd = libc.syscall(number, 0, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_MAP_CREATE
    if fd >= 0:
        os.close(fd)
        return Check("bpf syscall", True, "a BPF map could be created")
    err = ctypes.get_errno()
    fix = {
        errno.EPERM: "run as root or with CAP_BPF (check kernel.unprivileged_bpf_disabled and any LSM policy)",
        errno.ENOSYS: "the kernel was built without CONFIG_BPF_SYSCALL: use a kernel with BPF support",
    }.get(err, "see dmesg")
    return Check("bpf syscall", False, f"BPF_MAP_CREATE failed: {os.strerror(err)}", fix)


def check_perf_events(proc_root: Path = Path("/proc")) -> list[Check]:
    paranoid = (proc_root / "sys/kernel/perf_event_paranoid").read_text().strip()
    software = perf_event_open(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK)
    hardware = perf_event_open(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES)
    checks = [
        Check(
            "perf events",
            software == 0,
            f"cpu-clock sampling {'available' if software == 0 else 'refused: ' + os.strerror(-software)}"
            f" (kernel.perf_event_paranoid={paranoid})",
            "run as root or with CAP_PERFMON; or lower kernel.perf_event_paranoid",
        )
    ]
    if hardware == 0:
        checks.append(Check("hardware PMU", True, "cpu-cycles events available: used for CPU sampling"))
    else:
        checks.append(
            Check(
                "hardware PMU",
                False,
                f"no cpu-cycles events ({os.strerror(-hardware)}): falling back to "
                "the software cpu-clock event (same profiles, timer-based)",
                fatal=False,
            )
        )
    return checks


def check_tracefs() -> Check:
    for path in TRACEFS_PATHS:
        if (path / "events").is_dir():
            return Check("tracefs", True, f"mounted at {path}")
    return Check(
        "tracefs",
        False,
        "tracefs is not mounted (tracepoints cannot be attached)",
        "mount -t tracefs nodev /sys/kernel/tracing",
    )


def check_kernel_headers(release: str | None = None, modules: Path = Path("/lib/modules")) -> Check:
    release = release or platform.release()
    build, source = modules / release / "build", modules / release / "source"
    if os.environ.get("BCC_KERNEL_SOURCE"):
        note = " (BCC_KERNEL_SOURCE is set; on Debian's split -amd64/-common headers it fails: unset it)"
    else:
        note = ""
    if not (build / "include/generated/autoconf.h").is_file():
        if Path("/sys/kernel/kheaders.tar.xz").exists():
            return Check("kernel headers", True, "none installed; BCC will use the kernel's built-in kheaders" + note)
        return Check(
            "kernel headers",
            False,
            f"no headers for kernel {release} at {build}" + note,
            "run `make setup` (installs linux-headers and links the closest version into "
            f"{modules / release}/{{build,source}}), or install linux-headers-{release}",
        )
    target = build.resolve()
    if (
        (target / "Makefile").is_file()
        and not (source / "include/linux").is_dir()
        and not (target / "include/linux").is_dir()
    ):
        return Check(
            "kernel headers",
            False,
            f"{build} -> {target} has generated headers but no sources: Debian splits them into -<arch> and -common"
            + note,
            f"link the matching linux-headers-*-common tree to {source} (make setup does this)",
        )
    if release in target.name or not build.is_symlink():  # a real build/ directory is the kernel's own
        return Check("kernel headers", True, f"{target}" + note)
    return Check(
        "kernel headers",
        True,
        f"kernel {release} has no headers of its own; using {target.name} (closest installed){note}. "
        "Programs use only stable helpers and tracepoint formats, so this works across versions",
    )


def check_btf() -> Check:
    missing = kernel_features().task_regs_unavailable
    return Check(
        "DWARF unwinding",
        not missing,
        "available: user stacks are copied for unwinding with .eh_frame (unwind.* = auto or dwarf)"
        if not missing
        else f"unavailable for the CPU and off-CPU profilers: {missing}; they walk frame pointers only",
        "set unwind.cpu and unwind.offcpu to fp to silence this, or use a kernel >= 5.15 with BTF",
        fatal=False,
    )


def check_kprobes() -> Check:
    if kernel_features().kprobes:
        return Check("kprobes", True, "available: off-CPU uses a kprobe on the scheduler")
    return Check(
        "kprobes",
        False,
        "not available (kernel without CONFIG_KPROBES, or tracefs unmounted): only tracepoints and "
        "perf events are used",
        fatal=False,
    )


def check_offcpu_attach() -> Check:
    symbol = kernel_features().switch_kprobe  # what offcpu.attach = auto chooses
    hook = f"kprobe {symbol}" if symbol else "sched:sched_switch tracepoint"
    return Check("off-CPU", True, f"--profilers offcpu would attach with the {hook}")


def check_alloc_cost() -> Check:
    return Check(
        "allocations",
        True,
        "opt-in (--profilers alloc): every malloc of a traced process takes a uprobe trap (about 1-2 us on "
        "typical hosts, whatever the agent does after it); --pid attaches the uprobes to those processes only",
    )


def check_python_frames() -> Check:
    """Whether the BPF walker can find a thread's TLS base, and which CPython builds it walks."""
    features = kernel_features()
    walks = (
        f"CPython {describe_walkable()}; free-threaded builds and versions before "
        f"{MIN_VERSION[0]}.{MIN_VERSION[1]} keep native frames only"
    )
    if features.task_fsbase_offset is None:
        return Check(
            "Python frames",
            False,
            f"off: {features.task_fsbase_unavailable}",
            "use a kernel with BTF (/sys/kernel/btf/vmlinux) to see Python functions in profiles",
            fatal=False,
        )
    return Check(
        "Python frames",
        True,
        f"task_struct.thread.fsbase at {features.task_fsbase_offset:#x} (BTF); walks {walks}",
        fatal=False,
    )


def check_bcc() -> Check:
    if importlib.util.find_spec("bcc") is not None:
        return Check("BCC", True, "Python bindings importable")
    return Check(
        "BCC",
        False,
        "the bcc Python module is not importable (the PyPI package named 'bcc' is unrelated)",
        "apt-get install python3-bpfcc and use a venv made with --system-site-packages (`make setup`)",
    )


def _guard(name: str, probe: Callable[[], Check | list[Check]], fatal: bool) -> list[Check]:
    try:
        result = probe()
    except PermissionError as e:
        return [Check(name, False, f"cannot be checked: {e.filename} is not readable", "run as root", fatal)]
    except OSError as e:  # an unreadable /proc or /sys entry is a finding, not a crash
        return [Check(name, False, f"cannot be checked: {e}", "see the error above", fatal)]
    return result if isinstance(result, list) else [result]


def run_checks() -> Report:
    checks: list[Check] = []
    for name, probe, fatal in (
        ("privileges", check_privileges, True),
        ("bpf syscall", check_bpf_syscall, True),
        ("perf events", check_perf_events, True),
        ("tracefs", check_tracefs, True),
        ("kernel headers", check_kernel_headers, True),
        ("DWARF unwinding", check_btf, False),
        ("kprobes", check_kprobes, False),
        ("off-CPU", check_offcpu_attach, False),
        ("allocations", check_alloc_cost, False),
        ("Python frames", check_python_frames, False),
        ("BCC", check_bcc, True),
    ):
        checks += _guard(name, probe, fatal)
    return Report(tuple(checks))
