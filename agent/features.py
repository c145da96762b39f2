"""Kernel features: what this host's kernel offers the BPF programs, probed once and shared.

Stage-neutral (it imports no stage): `agent.preflight` reports these findings in `check`, and the probes
and their registry choose their fallbacks from them (hardware cycles or the software cpu-clock, a
kprobe on the scheduler or the sched_switch tracepoint, a user stack copy for DWARF unwinding or frame
pointers only). Owns every such probe: the perf-event PMU, kprobes (and the scheduler symbol they would
hook), BTF, the task user registers (`bpf_task_pt_regs`) that a stack copy needs, and the offset of a
task's TLS base (`task_struct.thread.fsbase`, from BTF via `agent.btf`) that the Python walker needs,
and the offsets of the fields that say where a process image lies (`IMAGE_MEMBERS`: its executable's
text, its mmap region, its vDSO, its executable's inode), which a process announcement carries.
`kernel_features()` probes once per process and caches the result; the functions below take their
roots as parameters so unit tests can give fake ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.btf import Btf, BtfError, read_btf

logger = logging.getLogger(__name__)

SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES = 0, 0
PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK = 1, 0
SWITCH_SYMBOL = re.compile(r"finish_task_switch(?:\.isra\.\d+)?")
KPROBE_MARKERS = (  # any of them means kprobe events can be created (the perf PMU, else tracefs)
    "sys/bus/event_source/devices/kprobe/type",
    "sys/kernel/tracing/kprobe_events",
    "sys/kernel/debug/tracing/kprobe_events",
)
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
TASK_REGS_MIN_KERNEL = (5, 15)  # bpf_task_pt_regs
# Where x86-64 keeps a task's FS base (its TLS base; glibc's and musl's pthread_t) while it is not running.
TASK_FSBASE_MEMBERS = {"x86_64": ("thread", "fsbase")}
# -D name -> (struct, member path): what a process announcement reads to lay out a process that has
# gone before its maps could be read (agent/process/templates.py). `mm_context_t.vdso` is x86-64's
# (and arm64's) name.
IMAGE_MEMBERS = {
    "TASK_MM_OFFSET": ("task_struct", ("mm",)),
    "MM_START_CODE_OFFSET": ("mm_struct", ("start_code",)),
    "MM_MMAP_BASE_OFFSET": ("mm_struct", ("mmap_base",)),
    "MM_VDSO_OFFSET": ("mm_struct", ("context", "vdso")),
    "MM_EXE_FILE_OFFSET": ("mm_struct", ("exe_file",)),
    "FILE_INODE_OFFSET": ("file", ("f_inode",)),
    "INODE_INO_OFFSET": ("inode", ("i_ino",)),
    "INODE_SB_OFFSET": ("inode", ("i_sb",)),
    "SB_DEV_OFFSET": ("super_block", ("s_dev",)),
}


@dataclass(frozen=True, slots=True)
class KernelFeatures:
    hardware_cycles: bool  # a cpu-cycles sampling event can be opened (no PMU in most VMs)
    kprobes: bool  # the kernel can create kprobe events
    switch_symbol: str | None  # finish_task_switch as /proc/kallsyms names it, if kprobes can see it
    # Why perf-event and tracepoint programs cannot read a task's user registers (so cannot copy its
    # user stack for DWARF unwinding), or "" when they can. Uprobe programs get them as their context.
    task_regs_unavailable: str
    # task_struct.thread.fsbase's byte offset in the running kernel (the Python walker reads each
    # thread's TLS base there), or None, with the reason, when BTF cannot tell.
    task_fsbase_offset: int | None = None
    task_fsbase_unavailable: str = "not probed"
    # IMAGE_MEMBERS' offsets (by -D name) in the running kernel, or None, with the reason.
    image_offsets: dict[str, int] | None = None
    image_offsets_unavailable: str = "not probed"

    @property
    def switch_kprobe(self) -> str | None:
        """The scheduler symbol the off-CPU profiler can hook with a kprobe here, or None."""
        return self.switch_symbol if self.kprobes else None


def perf_event_open(type_: int, config: int) -> int:
    """Open (and close) a disabled sampling event on CPU 0 for any pid: 0, or -errno."""
    number = SYS_PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        return -errno.ENOSYS
    attr = (ctypes.c_uint8 * 128)()
    fields = ctypes.cast(attr, ctypes.POINTER(ctypes.c_uint32))
    fields[0], fields[1] = type_, 128  # type, size
    ctypes.cast(ctypes.byref(attr, 8), ctypes.POINTER(ctypes.c_uint64))[0] = config
    ctypes.cast(ctypes.byref(attr, 16), ctypes.POINTER(ctypes.c_uint64))[0] = 19  # sample_freq
    ctypes.cast(ctypes.byref(attr, 40), ctypes.POINTER(ctypes.c_uint64))[0] = (1 << 0) | (1 << 10)  # disabled, freq
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.syscall(number, ctypes.byref(attr), -1, 0, -1, 0)
    if fd >= 0:
        os.close(fd)
        return 0
    return -ctypes.get_errno()


def hardware_cycles_available() -> bool:
    return perf_event_open(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES) == 0


def kprobes_available(root: Path = Path("/")) -> bool:
    # os.path.exists, not Path.exists: an unprivileged `run` or `check` must get an answer (no), never a
    # PermissionError from tracefs; preflight then reports the missing privileges.
    return any(os.path.exists(root / marker) for marker in KPROBE_MARKERS)


def find_switch_symbol(kallsyms_lines: Iterable[str]) -> str | None:
    """`finish_task_switch` (or its `.isra.N` clone, which GCC may emit instead) among the text symbols."""
    found: str | None = None
    for line in kallsyms_lines:
        fields = line.split()
        if len(fields) < 3 or fields[1] not in ("t", "T") or not SWITCH_SYMBOL.fullmatch(fields[2]):
            continue
        if fields[2] == "finish_task_switch":
            return fields[2]
        found = found or fields[2]
    return found


def read_switch_symbol(root: Path = Path("/")) -> str | None:
    try:
        with open(root / "proc/kallsyms", encoding="utf-8", errors="replace") as kallsyms:
            return find_switch_symbol(kallsyms)
    except OSError as e:
        logger.warning("cannot read kallsyms to find finish_task_switch: %s", e)
        return None


def task_regs_unavailable(release: str | None = None, btf: Path = BTF_VMLINUX) -> str:
    """Why perf-event and tracepoint programs cannot read a task's user registers here, or "" if they can.

    The stack copy for DWARF unwinding needs them (bpf_get_current_task_btf and bpf_task_pt_regs):
    kernel >= 5.15 with BTF. Uprobe programs (allocations) get the user registers as their context."""
    release = release or platform.release()
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None or (int(match[1]), int(match[2])) < TASK_REGS_MIN_KERNEL:
        return f"kernel {release} is older than 5.15 (bpf_task_pt_regs)"
    if not os.path.exists(btf):
        return f"{btf} is absent (the kernel was built without CONFIG_DEBUG_INFO_BTF)"
    return ""


def task_fsbase_offset(
    btf: Path = BTF_VMLINUX, machine: str | None = None, types: Btf | None = None
) -> tuple[int | None, str]:
    """(the offset of a task's FS base in task_struct, "") from the kernel's BTF (`types`: already
    parsed from `btf`), or (None, why not)."""
    machine = machine or platform.machine()
    members = TASK_FSBASE_MEMBERS.get(machine)
    if members is None:
        return None, f"no TLS base member known for {machine}"
    try:
        return (types or read_btf(btf)).member_offset("task_struct", members), ""
    except BtfError as e:
        return None, f"task_struct.{'.'.join(members)} not found in {btf}: {e}"


def image_offsets(btf: Path = BTF_VMLINUX, types: Btf | None = None) -> tuple[dict[str, int] | None, str]:
    """(IMAGE_MEMBERS' offsets by -D name, "") from the kernel's BTF (`types`: already parsed from
    `btf`), or (None, why not)."""
    try:
        parsed = types or read_btf(btf)
        return {name: parsed.member_offset(struct, path) for name, (struct, path) in IMAGE_MEMBERS.items()}, ""
    except BtfError as e:
        return None, f"{btf}: {e}"


def read_kernel_features(root: Path = Path("/"), release: str | None = None) -> KernelFeatures:
    kprobes = kprobes_available(root)
    btf = root / BTF_VMLINUX.relative_to("/")
    try:
        types: Btf | None = read_btf(btf)  # parsed once for every offset below (~0.15 s of start-up each)
    except BtfError:
        types = None  # each lookup below reads it again and says why it cannot
    fsbase_offset, fsbase_unavailable = task_fsbase_offset(btf, types=types)
    if fsbase_offset is None:
        logger.warning("Python frames are off: %s", fsbase_unavailable)
    offsets, offsets_unavailable = image_offsets(btf, types)
    if offsets is None:
        logger.warning("processes that exit before their maps are read stay unnamed: %s", offsets_unavailable)
    return KernelFeatures(
        hardware_cycles=hardware_cycles_available(),
        kprobes=kprobes,
        switch_symbol=read_switch_symbol(root) if kprobes else None,
        task_regs_unavailable=task_regs_unavailable(release, btf),
        task_fsbase_offset=fsbase_offset,
        task_fsbase_unavailable=fsbase_unavailable,
        image_offsets=offsets,
        image_offsets_unavailable=offsets_unavailable,
    )


@functools.cache
def kernel_features() -> KernelFeatures:
    """This host's features, probed at the first call and cached for the life of the process."""
    return read_kernel_features()
